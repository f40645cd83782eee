""""None of these": a reject rule per answer, fitted on the validation split.

A composite model only knows its own classes; a phone also sees everything else. Each
answer gets a score of its logits, higher for images of its classes, and a threshold:

    max_softmax  the largest softmax probability
    energy       logsumexp of the logits (the negative free energy, T = 1)

The score with the higher AUROC (in-task vs. out-of-task validation images) is chosen,
and the threshold accepts at least `accept` (95 %) of the in-task validation images.
The threshold lies halfway between two neighbouring validation scores, so that the last
bits of a runtime's exp() cannot flip a validation image across it. The rule can be
computed in the graph (`reject_nodes`): an output `accepted`, one bool per image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from onnx import TensorProto, helper

SCORES = ("max_softmax", "energy")
ACCEPT = 0.95


@dataclass(frozen=True)
class RejectRule:
    score: str
    threshold: float
    accept_rate_in_task: float
    reject_rate_out_of_task: float | None  # None: the query covers every validation class
    auroc: float | None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def score(logits: np.ndarray, name: str) -> np.ndarray:
    """Per image, float32: higher means more likely one of the model's classes."""
    logits = np.asarray(logits, np.float32)
    top = logits.max(1, keepdims=True)
    total = np.exp(logits - top).sum(1)
    if name == "max_softmax":
        return (1 / total).astype(np.float32)
    if name == "energy":
        return (top[:, 0] + np.log(total)).astype(np.float32)
    raise ValueError(f"unknown reject score {name!r}; use {' or '.join(SCORES)}")


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """Probability that an in-task image scores above an out-of-task one (ties count half)."""
    both = np.concatenate([inside, outside])
    order = both.argsort(kind="stable")
    ranks = np.empty(len(both))
    ranks[order] = np.arange(1, len(both) + 1)
    # Average the ranks of tied values.
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = (sums / counts)[inverse]
    n_in, n_out = len(inside), len(outside)
    return float((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def threshold_for(inside: np.ndarray, accept: float = ACCEPT) -> float:
    """A threshold that accepts (score >= threshold) at least `accept` of `inside`,
    halfway between the lowest accepted score and the next lower one."""
    s = np.sort(inside)
    k = math.floor((1 - accept) * len(s) + 1e-9)
    lower = s[:k][s[:k] < s[k]]
    # The graph compares in float32: the rule states the float32 threshold it uses.
    if len(lower) == 0:
        return float(np.float32(s[k] - max(1.0, abs(float(s[k])))))
    return float(np.float32((np.float64(lower[-1]) + np.float64(s[k])) / 2))


def fit_reject(logits: np.ndarray, in_task: np.ndarray, accept: float = ACCEPT) -> RejectRule:
    """The reject rule of a model from its validation `logits` (all validation images)
    and which of them belong to its classes."""
    in_task = np.asarray(in_task, bool)
    if not in_task.any():
        raise ValueError("no validation image of the model's classes to fit a reject rule on")
    scores = {name: score(logits, name) for name in SCORES}
    if in_task.all():
        name, area = SCORES[0], None
    else:
        areas = {n: auroc(s[in_task], s[~in_task]) for n, s in scores.items()}
        name = max(SCORES, key=lambda n: areas[n])
        area = areas[name]
    s = scores[name]
    threshold = threshold_for(s[in_task], accept)
    accepted = s >= np.float32(threshold)
    return RejectRule(name, threshold, float(accepted[in_task].mean()),
                      None if in_task.all() else float((~accepted[~in_task]).mean()), area)


def reject_nodes(rule: RejectRule, logits: str, output: str = "accepted") -> tuple[list, list]:
    """Nodes and initializers computing `output` (bool per image) from `logits`."""
    if rule.score == "max_softmax":
        nodes = [helper.make_node("Softmax", [logits], ["reject/softmax"], name="reject/softmax", axis=1),
                 helper.make_node("ReduceMax", ["reject/softmax"], ["reject/score"], name="reject/score",
                                  axes=[1], keepdims=0)]
    else:
        nodes = [helper.make_node("ReduceLogSumExp", [logits], ["reject/score"], name="reject/score",
                                  axes=[1], keepdims=0)]
    nodes.append(helper.make_node("GreaterOrEqual", ["reject/score", "reject/threshold"], [output],
                                  name="reject/accept"))
    threshold = helper.make_tensor("reject/threshold", TensorProto.FLOAT, [], [rule.threshold])
    return nodes, [threshold]
