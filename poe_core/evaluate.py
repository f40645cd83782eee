"""Accuracy, cross-expert errors, parameters, FLOPs and bytes.

Composite accuracy is computed from cached logits: the pool keeps every expert's
logits on the validation split, so the accuracy of any composite task is a column
selection and an argmax, with no model run. It equals what onnxruntime gives on the
assembled model because the assembled model computes exactly those logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from poe_core.data import ImageSet, Normalize, batches
from poe_core.device import autocast
from poe_core.taxonomy import Taxonomy


@torch.no_grad()
def predict(
    model: nn.Module, images: ImageSet, mean, std, device: torch.device,
    batch_size: int = 500, precision: str = "fp32", channels_last: bool = False,
) -> torch.Tensor:
    """Logits of `model` on all images, in order, as float32 on the CPU."""
    # Restore each submodule's own mode: a frozen library inside a training model
    # must stay in eval mode (its BN statistics are part of what is frozen).
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        for x, _ in batches(images, batch_size, normalize=Normalize(mean, std, device),
                            device=device, channels_last=channels_last):
            with autocast(device, precision):
                out.append(model(x).float().cpu())
    finally:
        for m, mode in modes:
            m.training = mode
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(1) == labels).float().mean().item()


def task_specific_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> float:
    """Accuracy on the images of `classes`, predicting by argmax over those classes only.

    `logits` may be over all classes (the oracle's: columns `classes` are taken) or
    already over exactly `classes` in that order (an expert's or a composite model's).
    """
    classes_t = torch.tensor(list(classes))
    mask = torch.isin(labels, classes_t)
    sub = logits[mask]
    if sub.shape[1] != len(classes_t):
        sub = sub[:, classes_t]
    if not mask.any():
        return float("nan")
    return (classes_t[sub.argmax(1)] == labels[mask]).float().mean().item()


def composite_logits(expert_logits: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> torch.Tensor:
    return torch.cat([expert_logits[t] for t in tasks], dim=1)


def composite_accuracy(
    expert_logits: Mapping[str, torch.Tensor], labels: torch.Tensor, taxonomy: Taxonomy,
    tasks: Sequence[str],
) -> float:
    """Accuracy of the composite model for `tasks` on the images of its classes."""
    return task_specific_accuracy(
        composite_logits(expert_logits, tasks), labels, taxonomy.composite_classes(tasks)
    )


def cross_expert_error_share(
    expert_logits: Mapping[str, torch.Tensor], labels: torch.Tensor, taxonomy: Taxonomy,
    tasks: Sequence[str],
) -> float:
    """Of the composite model's errors, the share where the winning logit belongs to
    another expert than the one that owns the true class."""
    classes = torch.tensor(taxonomy.composite_classes(tasks))
    owner = torch.tensor([i for i, t in enumerate(tasks) for _ in taxonomy.tasks[t]])
    mask = torch.isin(labels, classes)
    logits = composite_logits(expert_logits, tasks)[mask]
    y = labels[mask]
    winner = logits.argmax(1)
    wrong = classes[winner] != y
    if not wrong.any():
        return 0.0
    true_col = (y[:, None] == classes[None, :]).float().argmax(1)
    return (owner[winner[wrong]] != owner[true_col[wrong]]).float().mean().item()

