"""The native lane: plain POST /models queries answered by C (app/_lane.c).

A new composite model costs the Python path about a hundred microseconds under load
(parsing and validating the body, resolving the query, the id, the assembly's per-query
pieces, the headers, three caches), three times a cached answer's. Most queries are
plain: whole primitive tasks, optionally softmax and a weight format. For those,
app._lane joins the same bytes from pieces the Assembler prepared once per pool
version (Assembler.plain_pieces), with the id and headers the Python path would write,
in a few microseconds and without touching a cache: the model is a function of the
query, so there is nothing to remember. Whatever is not plain (class-level queries,
widths, budgets, mask, reject output, ORT, an error to explain) the table declines and
the Python path answers as before.

The extension is built by `pip install` (setup.py; optional, so an install without a C
compiler still works, slower): `available()` says whether it is here; POE_NATIVE_LANE=false
(Settings.native_lane) turns the lane off.
"""

from __future__ import annotations

import hashlib

from poe_core.formats import FORMATS
from poe_core.taxonomy import TaskError

try:
    from app import _lane
except ImportError:  # built without a C compiler: the Python path answers everything
    _lane = None

OUTPUTS = ("logits", "probabilities")  # the order of app/_lane.c's tables, as FORMATS is


def available() -> bool:
    """Whether the extension is built."""
    return _lane is not None


def table(served):
    """The native table of a served pool version (an app._lane.Table), or None where the
    lane cannot answer for it: not built, a damaged expert (its queries must answer 503),
    tasks that share classes, a default width the pool lacks."""
    from app.serving.models import UNSAFE_IN_NAME  # which imports this module's importer

    if not available() or served.damaged:
        return None
    pool, assembler = served.pool, served.assembler
    taxonomy = pool.taxonomy
    names = taxonomy.task_names
    if float(pool.default_width) not in pool.widths:
        return None
    try:
        taxonomy.check_disjoint(names)
    except TaskError:  # a query of two tasks that share a class must be refused, by the Python path
        return None
    pieces = assembler.plain_pieces()
    by_format = [pieces.fragments.get(w) for w in FORMATS]
    tasks = []
    for t in sorted(names, key=lambda t: t.encode()):
        tasks.append((t, served.positions[t], pieces.concat_inputs[t], pieces.labels[t].encode(),
                      len(taxonomy.tasks[t]), pieces.task_json[t].encode(), pieces.task_classes[t].encode(),
                      pieces.width_items[t].encode(), UNSAFE_IN_NAME.sub("_", t).encode(),
                      UNSAFE_IN_NAME.sub("_", "+".join(taxonomy.class_names(t))).encode(),
                      tuple(None if f is None else f[t] for f in by_format)))
    classes = len(taxonomy.classes)
    return _lane.Table(
        tasks=tasks,
        id_prefix=f"{served.version}-{served.pool_id[:8]}-".encode(),
        etag_tail=f".{served.pool_id}".encode(),
        headers=tuple(pieces.headers.get(w) for w in FORMATS),
        library=tuple(None if f is None else f["library"] for f in by_format),
        concat_rest=pieces.concat_rest, softmax_field=pieces.softmax_field, input_field=pieces.input_field,
        output_fields=tuple(tuple(assembler.output_field(o, n) for n in range(classes + 1)) for o in OUTPUTS),
        pool_entries=pieces.pool_entries,
        choice_entries=tuple(tuple(pieces.choice_entries[o, w] if w in pieces.headers else None for w in FORMATS)
                             for o in OUTPUTS),
        version_entry=pieces.version_entry, widths_entry=pieces.widths_entry, digest=_digest,
    )


def _digest(ident: bytes) -> bytes:
    """What a download's name says of its id when its tasks do not fit (app.serving.models.file_name)."""
    return hashlib.sha256(ident).hexdigest()[:8].encode()
