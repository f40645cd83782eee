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
MAX_CANDIDATES = 1024


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


@dataclass(frozen=True)
class _Table:
    """The figures of every choice of widths of one query, column by column."""

    q: Query
    choices: list[tuple[float, ...]]
    params: np.ndarray
    bytes: list[int]
    macs: np.ndarray
    val_acc: np.ndarray

    def point(self, k: int) -> PlanPoint:
        c = self.choices[k]
        return PlanPoint(dict(zip(self.q.tasks, c, strict=True)), int(self.params[k]), self.bytes[k],
                         int(self.macs[k]), float(self.val_acc[k]), replace(self.q, widths=c))

    def measure(self, name: str) -> np.ndarray:
        return np.asarray(getattr(self, name))


def _table(assembler: Assembler, q: Query, weights: str) -> _Table:
    pool = assembler.pool
    pool.require("widths")
    if q.method != "poe":
        raise ValueError("budgets choose expert widths; the mask method has no experts")
    widths = pool.widths
    if len(widths) ** len(q.tasks) > MAX_CANDIDATES:
        raise ValueError(f"{len(widths)} widths for {len(q.tasks)} tasks make more than {MAX_CANDIDATES} "
                         "candidate models; name fewer tasks")
    picks = np.array(list(itertools.product(range(len(widths)), repeat=len(q.tasks))))  # width index per task
    rows = np.arange(len(q.tasks))[None, :]
    parts = [[pool.part(t, w) for w in widths] for t in q.tasks]
    params = pool.spec.library.params + np.array([[p.params for p in ps] for ps in parts])[rows, picks].sum(1)
    macs = pool.spec.library.flops + np.array([[p.flops for p in ps] for ps in parts])[rows, picks].sum(1)
    choices = [tuple(widths[j] for j in pick) for pick in picks.tolist()]
    return _Table(q, choices, params, assembler.sizes(q, choices, weights), macs,
                  _accuracies(pool, q, weights, picks))


def candidates(assembler: Assembler, q: Query, weights: str = "fp32") -> list[PlanPoint]:
    """Every choice of one width per task of `q`, with its exact figures."""
    table = _table(assembler, q, weights)
    return [table.point(k) for k in range(len(table.choices))]


def _accuracies(pool, q: Query, weights: str, picks: np.ndarray) -> np.ndarray:
    """Pool.accuracy of every choice of widths (`picks`: width index per task), all at once.

    Per task and width, the cached logits give each in-task image's best logit among
    the task's output columns, that column and whether its class is right; a choice's
    prediction is then the task with the highest best logit, ties going to the earliest
    output column, exactly as an argmax over the model's outputs decides."""
    labels = pool.val_labels.numpy()
    inside = np.isin(labels, q.classes)
    y = labels[inside]
    classes = np.asarray(q.classes)
    owner = {c: (i, j) for i, t in enumerate(q.tasks) for j, c in enumerate(pool.taxonomy.tasks[t])}
    cached = pool.logits_of(weights)
    shape = (len(q.tasks), len(pool.widths), len(y))
    best, column, right = np.empty(shape, np.float32), np.empty(shape, np.int32), np.empty(shape, bool)
    for i, t in enumerate(q.tasks):
        out_columns = np.array([k for k, c in enumerate(q.classes) if owner[c][0] == i])
        own_columns = [owner[q.classes[k]][1] for k in out_columns]
        for a, w in enumerate(pool.widths):
            logits = cached[part_key(t, w)].numpy()[inside][:, own_columns]
            top = logits.argmax(1)
            best[i, a], column[i, a] = logits[np.arange(len(y)), top], out_columns[top]
            right[i, a] = classes[column[i, a]] == y
    # Task by task, keep per choice and image the winner so far: a strictly higher
    # logit wins, an equal one wins if its column comes first.
    win_best, win_column, win_right = best[0][picks[:, 0]], column[0][picks[:, 0]], right[0][picks[:, 0]]
    for i in range(1, len(q.tasks)):
        b, c = best[i][picks[:, i]], column[i][picks[:, i]]
        take = b > win_best
        tie = b == win_best
        if tie.any():  # rare with float logits
            take |= tie & (c < win_column)
        np.copyto(win_best, b, where=take)
        np.copyto(win_column, c, where=take)
        np.copyto(win_right, right[i][picks[:, i]], where=take)
    # Rounded like torch's float32 mean in evaluate.task_specific_accuracy.
    with np.errstate(invalid="ignore", divide="ignore"):
        return win_right.sum(1).astype(np.float32) / np.float32(len(y))


def _front(size, accuracy) -> list[int]:
    """Indices of the points no other beats in both size (smaller) and accuracy (higher),
    by increasing size."""
    front: list[int] = []
    for k in np.lexsort((-np.asarray(accuracy), np.asarray(size))).tolist():
        if not front or accuracy[k] > accuracy[front[-1]]:
            front.append(k)
    return front


def _fitting(table: _Table, budget: Budget | None) -> np.ndarray:
    """Indices of the choices within `budget` (all without one); BudgetError stating the
    smallest possible if none is."""
    fits = np.ones(len(table.choices), bool)
    limits = budget.limits() if budget is not None else {}
    for m, v in limits.items():
        fits &= table.measure(m) <= v
    if not fits.any():
        smallest = ", ".join(f"{int(table.measure(m).min()):,} {m}" for m in limits)
        asked = ", ".join(f"max_{m} = {v:,}" for m, v in limits.items())
        raise BudgetError(f"no choice of expert widths fits {asked}: the smallest possible is {smallest}")
    return np.flatnonzero(fits)


def plan(assembler: Assembler, q: Query, weights: str = "fp32", size: str = "params",
         budget: Budget | None = None) -> list[PlanPoint]:
    """The accuracy-vs-size Pareto front of a query (POST /models/plan), by increasing
    `size` ("params", "bytes" or "macs"), among the choices within `budget` if given."""
    if size not in MEASURES:
        raise ValueError(f"unknown size measure {size!r}; use {', '.join(MEASURES)}")
    table = _table(assembler, q, weights)
    keep = _fitting(table, budget)
    return [table.point(keep[k]) for k in _front(table.measure(size)[keep], table.val_acc[keep])]


def fit_budget(assembler: Assembler, q: Query, budget: Budget, weights: str = "fp32") -> PlanPoint:
    """The most accurate choice of widths within `budget` (ties: fewer parameters, then
    bytes); BudgetError stating the smallest possible if nothing fits."""
    table = _table(assembler, q, weights)
    k = max(_fitting(table, budget).tolist(),
            key=lambda k: (table.val_acc[k], -table.params[k], -table.bytes[k]))
    return table.point(k)
