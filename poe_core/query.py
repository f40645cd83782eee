"""What a composite model is made of: the resolution of a query into experts and outputs.

A query names primitive tasks, classes, or both. Its model holds the experts of the
named tasks, in the order given, then the experts that own the named classes not yet
covered, in order of first mention. It outputs the classes of the named tasks (in
task order) followed by the other named classes in the order given; when that is not
the plain concatenation of the experts' logits, a Gather in the ONNX tail picks them.
The "mask" method (SMART's baseline) answers the same query with the library student's
own head over all classes, restricted to the query's classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from poe_core.taxonomy import TaskError, Taxonomy

METHODS = ("poe", "mask")


@dataclass(frozen=True)
class Query:
    tasks: tuple[str, ...]  # the experts, in the order of their concatenated logits
    widths: tuple[float, ...]  # ks of each task's expert; () for "mask"
    classes: tuple[int, ...]  # class indices the model outputs, in order
    method: str = "poe"

    def columns(self, taxonomy: Taxonomy) -> tuple[int, ...]:
        """Where each output class sits in the logits the Gather reads: the experts'
        concatenated logits ("poe") or the student's logits over all classes ("mask")."""
        if self.method == "mask":
            return self.classes
        position = {c: i for i, c in enumerate(taxonomy.composite_classes(self.tasks))}
        return tuple(position[c] for c in self.classes)

    def gathers(self, taxonomy: Taxonomy) -> bool:
        """Whether the model needs a Gather: outputs other than all the experts' logits in order."""
        return self.method == "mask" or list(self.classes) != taxonomy.composite_classes(self.tasks)


def resolve_query(taxonomy: Taxonomy, tasks: Sequence[str] = (), classes: Sequence[str] = (), *,
                  method: str = "poe", widths: Mapping[str, float] | None = None,
                  default_width: float = 1.0) -> Query:
    """The Query for named tasks and/or classes; raise TaskError, naming the culprit, if
    a task or class is unknown, listed twice, or nothing is asked."""
    if method not in METHODS:
        raise TaskError(f"unknown method {method!r}; use {' or '.join(METHODS)}")
    if not tasks and not classes:
        raise TaskError("the query is empty: name at least one primitive task or class")
    # validate and class_indices refuse a bare string, which would iterate as letters.
    tasks = taxonomy.validate(tasks) if tasks else []
    taxonomy.check_disjoint(tasks)
    wanted = taxonomy.class_indices(classes) if classes else []
    outputs = taxonomy.composite_classes(tasks)
    for c in wanted:
        if c in outputs:
            continue
        owners = taxonomy.owners(c)
        if not owners:
            raise TaskError(f"no expert of this pool covers class {taxonomy.classes[c]!r}")
        # Primitive tasks may overlap: take the first owner that shares no class with the
        # experts already chosen, so every class is output once.
        covered = set(taxonomy.composite_classes(tasks))
        owner = next((t for t in owners if t in tasks or covered.isdisjoint(taxonomy.tasks[t])), None)
        if owner is None:
            raise TaskError(f"class {taxonomy.classes[c]!r} is only in primitive task(s) "
                            f"{', '.join(map(repr, owners))}, which overlap the others of this query")
        if owner not in tasks:
            tasks.append(owner)
        outputs.append(c)
    widths = dict(widths or {})
    if method == "mask":
        if widths:
            raise TaskError("widths choose experts; the mask method uses none")
        return Query(tuple(tasks), (), tuple(outputs), method)
    stray = [t for t in widths if t not in tasks]
    if stray:
        raise TaskError(f"width(s) given for task(s) not in the query: {', '.join(map(repr, stray))}")
    return Query(tuple(tasks), tuple(float(widths.get(t, default_width)) for t in tasks), tuple(outputs), method)
