"""Budgets: the expert widths that make the best model within a size, and the
accuracy-vs-size Pareto front of a query.

A pool may hold every expert at several widths (ks). For a query, each choice of one
width per task is a candidate model. Its validation accuracy is exact, computed from
the cached logits as Pool.accuracy computes it; its parameters, MACs and bytes are exact
too (bytes: the assembled ONNX file in the chosen weight format, without softmax or
reject output). Candidates are enumerated: |widths| ** n(Q) of them, 243 for three
widths and five tasks; beyond MAX_CANDIDATES a query is refused rather than searched
approximately.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import numpy as np

from poe_core.assemble import Assembler
from poe_core.pool import part_key
from poe_core.query import Query

MEASURES = ("params", "bytes", "macs")
MAX_CANDIDATES = 4096


class BudgetError(ValueError):
    """A budget no choice of expert widths fits; the message states the smallest possible."""


@dataclass(frozen=True)
class Budget:
    max_params: int | None = None
    max_bytes: int | None = None
    max_macs: int | None = None

    def limits(self) -> dict[str, int]:
        """The measures this budget bounds, by name ("params", "bytes", "macs")."""
        return {m: v for m in MEASURES if (v := getattr(self, f"max_{m}")) is not None}


@dataclass(frozen=True)
class PlanPoint:
    widths: dict[str, float]  # ks per task
    params: int
    bytes: int
    macs: int
    val_acc: float
    query: Query = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"widths": self.widths, "params": self.params, "bytes": self.bytes, "macs": self.macs,
                "val_acc": self.val_acc}


def candidates(assembler: Assembler, q: Query, weights: str = "fp32") -> list[PlanPoint]:
    """Every choice of one width per task of `q`, with its exact figures."""
    pool = assembler.pool
    pool.require("widths")
    if q.method != "poe":
        raise ValueError("budgets choose expert widths; the mask method has no experts")
    widths = pool.widths
    if len(widths) ** len(q.tasks) > MAX_CANDIDATES:
        raise ValueError(f"{len(widths)} widths for {len(q.tasks)} tasks make more than {MAX_CANDIDATES} "
                         "candidate models; name fewer tasks")
    accuracy = _accuracy_of(pool, q, weights)
    points = []
    for choice in itertools.product(widths, repeat=len(q.tasks)):
        cq = replace(q, widths=choice)
        points.append(PlanPoint(dict(zip(q.tasks, choice, strict=True)), pool.params(cq), assembler.size(cq, weights),
                                pool.flops(cq), accuracy(choice), cq))
    return points


def _accuracy_of(pool, q: Query, weights: str):
    """A function of one width per task giving Pool.accuracy of that choice, with the
    slicing of the cached logits done once for all choices."""
    labels = pool.val_labels.numpy()
    inside = np.isin(labels, q.classes)
    y = labels[inside]
    n = np.float32(len(y))
    classes = np.asarray(q.classes)
    owner = {c: (i, j) for i, t in enumerate(q.tasks) for j, c in enumerate(pool.taxonomy.tasks[t])}
    # For each task: which output columns it fills, from which of its own columns.
    slots = [([k for k, c in enumerate(q.classes) if owner[c][0] == i],
              [owner[c][1] for c in q.classes if owner[c][0] == i]) for i in range(len(q.tasks))]
    cached = pool.logits_of(weights)
    sliced = {(i, w): cached[part_key(t, w)].numpy()[inside][:, slots[i][1]]
              for i, t in enumerate(q.tasks) for w in pool.widths}
    out = np.empty((len(y), len(q.classes)), np.float32)

    def accuracy(choice) -> float:
        for i, w in enumerate(choice):
            out[:, slots[i][0]] = sliced[i, w]
        # Rounded like torch's float32 mean in evaluate.task_specific_accuracy.
        return float(np.float32((classes[out.argmax(1)] == y).sum()) / n)

    return accuracy


def pareto_front(points: list[PlanPoint], size: str = "params") -> list[PlanPoint]:
    """The points no other point beats in both `size` (smaller) and accuracy (higher),
    by increasing size."""
    if size not in MEASURES:
        raise ValueError(f"unknown size measure {size!r}; use {', '.join(MEASURES)}")
    front: list[PlanPoint] = []
    for p in sorted(points, key=lambda p: (getattr(p, size), -p.val_acc)):
        if not front or p.val_acc > front[-1].val_acc:
            front.append(p)
    return front


def plan(assembler: Assembler, q: Query, weights: str = "fp32", size: str = "params") -> list[PlanPoint]:
    """The accuracy-vs-size Pareto front of a query (POST /models/plan)."""
    return pareto_front(candidates(assembler, q, weights), size)


def fit_budget(assembler: Assembler, q: Query, budget: Budget, weights: str = "fp32") -> PlanPoint:
    """The most accurate choice of widths within `budget` (ties: fewer parameters, then
    bytes); BudgetError stating the smallest possible if nothing fits."""
    limits = budget.limits()
    points = candidates(assembler, q, weights)
    fits = [p for p in points if all(getattr(p, m) <= v for m, v in limits.items())]
    if not fits:
        smallest = ", ".join(f"{min(getattr(p, m) for p in points):,} {m}" for m in limits)
        asked = ", ".join(f"max_{m} = {v:,}" for m, v in limits.items())
        raise BudgetError(f"no choice of expert widths fits {asked}: the smallest possible is {smallest}")
    return max(fits, key=lambda p: (p.val_acc, -p.params, -p.bytes))
