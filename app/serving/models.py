"""Composite models as functions of the query: no bytes and no rows per query.

A model is determined by (pool version, the resolved query, output, weights, reject
output), and so is its id, which spells that query out:

    <version>-<pool id[:8]>-<subject>-<output>-<weights>[-mask][-w<ks>_<ks>...][-reject]

The subject is the set of whole primitive tasks, in sorted order, as a hex bit mask over
the pool's tasks (the only form before class-level queries, so those ids never changed),
or else "c", the output classes in order as class indices joined by dots, "t" and the
experts' task mask (primitive tasks may share classes, so the classes alone do not name
the experts; their order is that of their first class among the outputs, as
poe_core.query orders them). "-mask" is SMART's baseline; "-w" the expert width (ks) of every task
in order, present only when one differs from the pool's default; "-reject" the graph's
`accepted` output. A budget is resolved to widths before the id is made. Any id ever
issued therefore resolves after any restart, on any replica: the model is assembled again
(a few memory copies) and has the same bytes and ETag. The ETag is the id and the full
pool id (the pool is content-addressed), so no file is hashed to answer; the ORT
conversion's ETag adds the onnxruntime version that made it, and is weak: onnxruntime
writes equivalent, not identical, bytes on every conversion. Bytes live only in bounded
in-memory LRU caches; `.ort` conversions (tens of milliseconds in onnxruntime) run on a
small executor of their own, so they never hold up the event loop or the requests that
need no conversion.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime

import onnxruntime
from cachetools import LRUCache

from app.metrics import ASSEMBLY_SECONDS, CACHE_HIT, CACHE_MISS, TALLY
from app.serving.registry import ServedPool
from app.store.db import Database
from app.store.rows import add_task_requests
from poe_core.budget import Budget, BudgetError, fit_budget
from poe_core.formats import FORMATS, Unavailable, to_ort
from poe_core.query import Query as Composite
from poe_core.reject import RejectRule
from poe_core.taxonomy import TaskError

OUTPUTS = ("logits", "probabilities")
ONNX = "application/octet-stream"
ONNX_BYTES = ONNX.encode()
# A model's bytes never change under its ETag (its id and the content-addressed pool's).
IMMUTABLE = b"public, max-age=31536000, immutable"
# A model file answer's headers (ServedModel.raw_headers), and the same as HTTP/1.1 lines to fill in.
FILE_HEADERS = (b"content-type", b"content-length", b"etag", b"cache-control", b"x-model-id", b"content-disposition")
FILE_HEAD = b"".join(name + b": %s\r\n" for name in FILE_HEADERS)
MAX_VERSION = 2**31 - 1  # the pools.version column's range
MAX_ID = 4096  # characters: a class subject of about a thousand classes
_WIDTH = r"\d{1,3}(?:\.\d{1,6})?"
MODEL_ID = re.compile(
    r"(\d{1,10})-([0-9a-f]{8})-([0-9a-f]{1,64}|c\d{1,6}(?:\.\d{1,6})*t[0-9a-f]{1,64})-(logits|probabilities)"
    r"-(fp32|fp16|int8)"
    rf"(-mask)?(?:-w({_WIDTH}(?:_{_WIDTH})*))?(-reject)?")


UNSAFE_IN_NAME = re.compile(r"[^A-Za-z0-9_.+-]+")


class once:
    """functools.cached_property without its lock (before Python 3.12 it takes an RLock on
    every first access: several per uncached answer). Two threads computing the same
    value at once compute it twice, and one of two equal values is kept."""

    def __init__(self, func) -> None:
        self.func = func
        self.name = func.__name__
        self.__doc__ = func.__doc__

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.func(instance)
        return value


class ServerBusy(Exception):
    """Too much conversion work queued; the client should retry shortly."""


@dataclass(frozen=True)
class Query:
    """A validated query: the composite model poe_core resolved (experts, widths, output
    classes, method) and the options of its file."""

    model: Composite
    output: str = "logits"
    weights: str = "fp32"
    reject_output: bool = False

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.tasks


def resolve(served: ServedPool, tasks: Sequence[str] = (), classes: Sequence[str] = (), *,
            softmax: bool = False, weights: str = "fp32", method: str = "poe",
            widths: Mapping[str, float] | None = None, budget: Budget | None = None,
            reject_output: bool = False) -> Query:
    """The Query of a request. Tasks are a set (sorted here: outputs follow the sorted
    task order), classes a list. A budget picks the widths (poe_core.budget.fit_budget).
    Raises TaskError (bad names, contradicting options), Unavailable (what the pool does
    not offer, and why) or BudgetError (stating the smallest possible)."""
    pool = served.pool
    if not isinstance(tasks, str):
        tasks = sorted(tasks)
    if budget is not None and method == "mask":
        raise TaskError("a budget chooses expert widths; the mask method has no experts")
    if budget is not None and widths:
        raise TaskError("give widths or a budget, not both")
    model = pool.query(tasks, classes, method=method, widths=widths)
    pool.require_format(weights)
    if budget is not None:
        try:
            model = fit_budget(served.assembler, model, budget, weights).query
        except (Unavailable, BudgetError):
            raise
        except ValueError as e:  # too many candidates to enumerate
            raise TaskError(str(e)) from None
    return Query(model, OUTPUTS[softmax], weights, reject_output)


def _whole_tasks(served: ServedPool, model: Composite) -> bool:
    """Whether a model is the union of whole tasks in sorted order: the queries of
    before class-level queries, whose ids are a task mask."""
    return (list(model.tasks) == sorted(model.tasks)
            and list(model.classes) == served.pool.taxonomy.composite_classes(model.tasks))


def subject(served: ServedPool, m: Composite) -> str:
    """What a model id says of its composite model: the task mask, and its classes when it
    outputs other than whole tasks."""
    position = served.positions
    mask = f"{sum(1 << position[t] for t in m.tasks):x}"
    return mask if _whole_tasks(served, m) else "c" + ".".join(map(str, m.classes)) + "t" + mask


@dataclass(frozen=True)
class Names:
    """What a model id and a file name say of a composite model, whatever the file's
    options: ServedPool.names remembers them per composite model."""

    id_head: str  # "<version>-<pool id[:8]>-<subject>"
    id_tail: str  # "-mask", "-w<ks>_<ks>..." where they apply
    file_stem: str | None  # its tasks, or its classes, joined by "+"; None when too long (see file_name)
    file_tail: str  # "-mask", "-ks<ks>_<ks>..." where they apply
    count: int  # how many tasks or classes the stem names
    by_class: bool  # whether it names classes


def names(served: ServedPool, m: Composite) -> Names:
    """The Names of composite model `m` in this pool version (ServedPool.names remembers them)."""
    subject_ = subject(served, m)
    by_class = subject_.startswith("c")  # see file_name
    mask = "-mask" if m.method == "mask" else ""
    default = served.pool.default_width
    widths = "_".join(f"{w:g}" for w in m.widths) if any(w != default for w in m.widths) else None
    named = [served.pool.taxonomy.classes[c] for c in m.classes] if by_class else m.tasks
    stem = UNSAFE_IN_NAME.sub("_", "+".join(named))
    return Names(f"{served.version}-{served.pool_id[:8]}-{subject_}", mask + ("" if widths is None else
                 f"-w{widths}"), stem if len(stem) <= 80 else None, mask + ("" if widths is None else f"-ks{widths}"),
                 len(named), by_class)


def model_id(served: ServedPool, query: Query) -> str:
    n = served.names(query.model)
    return f"{n.id_head}-{query.output}-{query.weights}{n.id_tail}{'-reject' if query.reject_output else ''}"


@dataclass(frozen=True)
class ParsedId:
    version: int
    pool_prefix: str
    subject: str  # hex task mask, or "c" + class indices
    output: str
    weights: str
    mask: bool
    widths: tuple[float, ...] | None
    reject_output: bool


def parse_model_id(ident: str) -> ParsedId | None:
    """The parts of a well-formed id, else None."""
    found = MODEL_ID.fullmatch(ident) if len(ident) <= MAX_ID else None
    if found is None or int(found[1]) > MAX_VERSION:
        return None
    widths = tuple(float(w) for w in found[7].split("_")) if found[7] else None
    return ParsedId(int(found[1]), found[2], found[3], found[4], found[5], bool(found[6]), widths, bool(found[8]))


def _tasks(served: ServedPool, mask: str) -> list[str] | None:
    bits = int(mask, 16)
    return [t for i, t in enumerate(served.tasks) if bits >> i & 1] if 0 < bits < 1 << len(served.tasks) else None


def _class_query(served: ServedPool, classes: list[int], tasks: list[str], method: str) -> Composite | None:
    """The model outputting `classes` from the experts of `tasks`, ordered as poe_core.query
    orders them (by their first class among the outputs), if that is a model at all."""
    taxonomy = served.pool.taxonomy
    where = {c: k for k, c in enumerate(classes)}
    first = {t: min((where[c] for c in taxonomy.tasks[t] if c in where), default=None) for t in tasks}
    if len(where) != len(classes) or max(classes) >= len(taxonomy.classes) or None in first.values():
        return None
    tasks = sorted(tasks, key=first.__getitem__)
    taxonomy.check_disjoint(tasks)
    if not set(classes) <= set(taxonomy.composite_classes(tasks)):
        return None
    return Composite(tuple(tasks), (), tuple(classes), method)


def query_of(served: ServedPool, ident: str) -> Query | None:
    """The query an id names in this pool version, or None if it names none (ids are
    canonical: one id per model)."""
    p = parse_model_id(ident)
    if p is None or p.version != served.version or p.pool_prefix != served.pool_id[:8]:
        return None
    pool, method = served.pool, "mask" if p.mask else "poe"
    classes, _, mask = p.subject[1:].partition("t") if "t" in p.subject else ("", "", p.subject)
    tasks = _tasks(served, mask)
    if tasks is None:
        return None
    try:
        if not classes:  # whole tasks
            model = pool.query(sorted(tasks), method=method)
        else:
            model = _class_query(served, [int(c) for c in classes.split(".")], tasks, method)
            if model is None:
                return None
            # pool.query checks what the pool offers (the student head, the widths).
            pool.query(model.tasks, method=method)
        if method == "poe":
            widths = p.widths or (pool.default_width,) * len(model.tasks)
            if len(widths) != len(model.tasks):
                return None
            pool.query(model.tasks, widths=dict(zip(model.tasks, widths, strict=True)))
            model = replace(model, widths=tuple(widths))
        elif p.widths is not None:
            return None
        pool.require_format(p.weights)
    except (TaskError, Unavailable):
        return None
    query = Query(model, p.output, p.weights, p.reject_output)
    return query if model_id(served, query) == ident else None


@dataclass(frozen=True)
class ModelInfo:
    """Everything told about a model file except its bytes."""

    id: str
    pool_version: int
    pool_id: str
    tasks: tuple[str, ...]
    output: str
    weights: str
    format: str
    sha256: str
    size: int
    labels: tuple[str, ...]
    params: int
    flops: int
    val_acc: float
    val_acc_by_format: dict[str, float | None]
    val_acc_by_class: dict[str, float]
    normalization: dict
    image_shape: list[int]
    preprocess: dict | None  # the pool's dataset.preprocess: how a photo becomes the input
    created_at: datetime
    method: str
    widths: dict[str, float]
    reject: RejectRule
    reject_output: bool
    mask: dict | None  # what SMART's mask would score for the query ("poe" answers)


def file_name(served: ServedPool, query: Query, ident: str, file_format: str) -> str:
    """The download's name: its tasks, or its classes when the id's subject starts with
    "c" (class-level queries; also a whole-task mask that starts with hex digit c, as it
    always has been), their number and a hash of the id when that is over 80 characters,
    and its options, as the id says them (see model_id)."""
    n = served.names(query.model)
    stem = n.file_stem or (f"{n.count}-{'classes' if n.by_class else 'tasks'}-"
                           f"{hashlib.sha256(ident.encode()).hexdigest()[:8]}")
    return (f"poe-{stem}{n.file_tail}{'-softmax' if query.output == 'probabilities' else ''}"
            f"{'' if query.weights == 'fp32' else '-' + query.weights}{'-reject' if query.reject_output else ''}"
            f".{file_format}")


@dataclass
class ServedModel:
    """A model file (ONNX, or its ORT conversion) and what is told about it. The file is
    `chunks` end to end (an assembled model's pieces, the pool's shared fragments among
    them, not copied); `data` joins them when first asked."""

    served: ServedPool
    query: Query
    id: str
    chunks: tuple[bytes, ...] = field(repr=False)
    labels: tuple[str, ...]
    format: str = "onnx"
    rule: RejectRule | None = field(default=None, repr=False)  # the one in the graph, if any
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(map(len, self.chunks))

    @once
    def data(self) -> bytes:
        """The file as one bytes object (an ORT conversion, a Starlette response, the ASGI
        lane); app.http's lane writes `chunks` as they are."""
        return self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)

    @once
    def sha256(self) -> str:
        """Computed when asked (metadata): the ETag needs no hash of the bytes."""
        digest = hashlib.sha256()
        for chunk in self.chunks:
            digest.update(chunk)
        return digest.hexdigest()

    @once
    def etag(self) -> str:
        tag = f"{self.id}.{self.served.pool_id}"
        return tag if self.format == "onnx" else f"{tag}.{self.format}-onnxruntime-{onnxruntime.__version__}"

    @once
    def _header_values(self) -> tuple[bytes, ...]:
        # onnxruntime does not write an ORT file byte for byte the same twice: equivalent, so a weak ETag.
        etag = f'"{self.etag}"' if self.format == "onnx" else f'W/"{self.etag}"'
        name = file_name(self.served, self.query, self.id, self.format)
        return (ONNX_BYTES, b"%d" % self.size, etag.encode(), IMMUTABLE, self.id.encode(),
                f'attachment; filename="{name}"'.encode("latin-1"))

    @once
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The file answer's headers, encoded once: the hot path sends them as they are."""
        return tuple(zip(FILE_HEADERS, self._header_values, strict=True))

    @once
    def head(self) -> bytes:
        """raw_headers as HTTP/1.1 header lines, for app.http's lane (which adds the status
        line, the server's own headers and the request id)."""
        return FILE_HEAD % self._header_values

    @once
    def headers(self) -> dict[str, str]:
        """raw_headers but the type and length, for a Starlette Response (which sets those)."""
        return {k.decode(): v.decode("latin-1") for k, v in self.raw_headers[2:]}

    @once
    def info(self) -> ModelInfo:
        """Computed when asked (a metadata answer), once: the file answer needs none of it."""
        pool, q = self.served.pool, self.query
        m = q.model
        by_format = {w: pool.accuracy(m, w) if pool.format_info(w)["available"] else None for w in FORMATS}
        mask = None
        if m.method == "poe":
            baseline = replace(m, method="mask", widths=())
            reason = pool.unavailable("mask")
            mask = ({"val_acc": None, "params": None, "unavailable": reason} if reason else
                    {"val_acc": pool.accuracy(baseline, q.weights), "params": pool.params(baseline),
                     "unavailable": None})
        return ModelInfo(
            id=self.id, pool_version=self.served.version, pool_id=self.served.pool_id, tasks=q.tasks,
            output=q.output, weights=q.weights, format=self.format, sha256=self.sha256, size=self.size,
            labels=self.labels, params=pool.params(m), flops=pool.flops(m),
            val_acc=by_format[q.weights], val_acc_by_format=by_format,
            val_acc_by_class=pool.accuracy_by_class(m, q.weights),
            normalization={"mean": pool.mean, "std": pool.std}, image_shape=pool.image_shape,
            preprocess=pool.spec.dataset.preprocess,
            # The model exists, as a function, since its pool version does.
            created_at=self.served.created_at,
            method=m.method, widths=dict(zip(m.tasks, m.widths, strict=True)) if m.method == "poe" else {},
            reject=self.rule or pool.reject_rule(m, q.weights), reject_output=q.reject_output, mask=mask,
        )


class ModelCache:
    """Assembled ONNX models in a byte-bounded LRU, keyed by model id, that admits a model
    the second time it is asked for: a stream of one-off queries would otherwise keep
    evicting the models that are asked for again. A model is counted at its file's size,
    though it holds only its own small pieces (the pool's parts are shared) until its
    bytes are joined (ServedModel.data). The last model assembled is held until the next
    one, so a burst of requests for one new model assembles it once. Assembly takes tens
    of microseconds, so it runs under the cache's lock."""

    def __init__(self, max_bytes: int, doorkeeper: int = 16384) -> None:
        self._models: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=lambda m: m.size)
        self._seen: LRUCache = LRUCache(maxsize=doorkeeper)  # ids asked for once, recently
        self._last: ServedModel | None = None
        self._lock = threading.Lock()
        self.assemblies = 0

    def get(self, served: ServedPool, query: Query, ident: str | None = None) -> ServedModel:
        """The model of a validated query (`ident`: its model_id, if known already)."""
        ident = ident or model_id(served, query)
        with self._lock:
            model = self._models.get(ident)
            if model is None and self._last is not None and self._last.id == ident:
                model = self._last
                if model.size <= self._models.maxsize:
                    self._models[ident] = model
            if model is not None:
                TALLY.inc(CACHE_HIT)
                return model
            started = time.perf_counter()
            rule = served.pool.reject_rule(query.model, query.weights) if query.reject_output else None
            assembled = served.assembler.assemble(query.model, softmax=query.output == "probabilities",
                                                  weights=query.weights, reject=rule,
                                                  reject_output=query.reject_output)
            TALLY.observe(ASSEMBLY_SECONDS, time.perf_counter() - started)
            TALLY.inc(CACHE_MISS)
            self.assemblies += 1
            model = self._last = ServedModel(served, query, ident, assembled.chunks, assembled.labels, rule=rule)
            if self._seen.pop(ident, None) is not None and model.size <= self._models.maxsize:
                self._models[ident] = model
            else:
                self._seen[ident] = True
        return model

    @property
    def bytes(self) -> int:
        return self._models.currsize

    def __len__(self) -> int:
        return len(self._models)


class OrtFiles:
    """ORT-format conversions, keyed by the ONNX file's ETag (its id and full pool id):
    converted on `workers` threads of their own, once per key however many ask at once,
    at most `max_pending` waiting (then ServerBusy); the last `size` results stay in
    memory."""

    def __init__(self, size: int = 64, workers: int = 1, max_pending: int = 32) -> None:
        self._files: LRUCache = LRUCache(maxsize=size)
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self.max_pending = max_pending

    def _convert(self, model: ServedModel) -> ServedModel:
        converted = ServedModel(model.served, model.query, model.id, (to_ort(model.data),), model.labels, "ort",
                                model.rule)
        with self._lock:
            self._files[model.etag] = converted
            del self._pending[model.etag]
        return converted

    async def get(self, model: ServedModel) -> ServedModel:
        key = model.etag
        with self._lock:
            found = self._files.get(key)
            if found is not None:
                return found
            future = self._pending.get(key)
            if future is None:
                if len(self._pending) >= self.max_pending:
                    raise ServerBusy(f"{len(self._pending)} ORT conversions are waiting; retry shortly")
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="ort")
                future = self._pending[key] = self._executor.submit(self._convert, model)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)


class RequestCounts:
    """Requests per (pool version, primitive task), gathered in memory and added to the
    task_requests table by `flush`: bounded by the pools' tasks, whatever clients ask. A
    request counts its composite task as it is; `flush` (on a thread of its own) spreads
    those over their primitive tasks."""

    def __init__(self) -> None:
        self._asked: dict[tuple[int, tuple[str, ...]], int] = {}  # (version, composite task) -> requests
        self._counts: Counter[tuple[int, str]] = Counter()  # what a failed flush kept for the next
        self._lock = threading.Lock()

    def count(self, version: int, tasks: tuple[str, ...]) -> None:
        key = (version, tasks)
        with self._lock:
            self._asked[key] = self._asked.get(key, 0) + 1

    def flush(self, db: Database) -> None:
        with self._lock:
            asked, self._asked = self._asked, {}
            counts, self._counts = self._counts, Counter()
        for (version, tasks), n in asked.items():
            for task in tasks:
                counts[version, task] += n
        if counts:
            try:
                with db.session() as session:
                    add_task_requests(session, counts)
            except BaseException:
                with self._lock:  # kept for the next flush
                    self._counts.update(counts)
                raise
