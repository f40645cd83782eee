"""Expert heads started from the library's own student instead of from random weights.

The library is conv1..conv3 of a KD student whose conv4 + classifier (the *student
head*, width ks = 1 over all classes) was distilled from the oracle together with it,
for many more epochs than the experts get. An expert has the same architecture at a
smaller width over its task's classes, so it can start as that head pruned for its task:

- the classifier keeps the rows of the task's classes;
- the residual stream of conv4 keeps the `width` channels that carry the most of the
  task's logits (mean post-ReLU activation times the summed |weight| of the task's rows);
- inside each block, the first convolution keeps the `width` channels that feed the
  kept stream the most (mean |activation| times the |weight| the second convolution
  gives them towards the kept channels).

Channels are scored on library features of training images, never of validation ones.
At full width (ks = 1) nothing is pruned and the expert's logits are the student's,
restricted to the task: the SMART mask baseline. Conditional KD then trains it as usual;
the start only spares the epochs a random head spends learning what the student knows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from poe_core.nets import BasicBlock, ExpertHead


def _block_activations(head: ExpertHead, features: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per block, the mean |input of conv2| per channel; and the pooled head output (N, C)."""
    inner: list[torch.Tensor] = []
    hooks = [b.conv2.register_forward_pre_hook(lambda _m, args: inner.append(args[0].abs().mean((0, 2, 3))))
             for b in head.conv4]
    try:
        with torch.no_grad():
            o = head.relu(head.bn(head.conv4(features)))
            pooled = head.pool(o).flatten(1)
    finally:
        for h in hooks:
            h.remove()
    return inner, pooled


def _keep(scores: torch.Tensor, width: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, width).indices).values


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, name).data.copy_(getattr(src, name).data[idx])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)


def pruned_head(student: ExpertHead, classes: Sequence[int], ks: float, features: torch.Tensor,
                depth: int) -> ExpertHead:
    """An expert head of width ks over `classes`, cut from the `student` head (see the
    module doc); `features` are library features of training images to score channels on."""
    return cutter(student, features, depth)(classes, ks)


def cutter(student: ExpertHead, features: torch.Tensor, depth: int) -> Callable[[Sequence[int], float], ExpertHead]:
    """`pruned_head` for many heads of one student: the student runs over `features` once."""
    student = student.eval()
    inner, pooled = _block_activations(student, features)
    mean_pooled = pooled.mean(0)
    full = student.fc.in_features
    in_channels = student.conv4[0].conv1.in_channels

    def cut(classes: Sequence[int], ks: float) -> ExpertHead:
        rows = torch.as_tensor(list(classes), dtype=torch.long)
        width = round(64 * ks)
        if width > full:
            raise ValueError(f"a head of width {width} cannot be cut from a student head of width {full}")
        out = ExpertHead(depth, in_channels, ks, len(rows)).eval()
        weights = student.fc.weight.data[rows]
        stream = _keep(mean_pooled * weights.abs().sum(0), width)
        for src, dst, act in zip(student.conv4, out.conv4, inner, strict=True):
            src: BasicBlock
            feed = src.conv2.weight.data[stream].abs().sum((0, 2, 3))
            mid = _keep(act * feed, width)
            first = src.shortcut is not None  # the block that reads the library's features
            _copy_bn(dst.bn1, src.bn1, torch.arange(src.bn1.num_features) if first else stream)
            conv1 = src.conv1.weight.data[mid]
            dst.conv1.weight.data.copy_(conv1 if first else conv1[:, stream])
            _copy_bn(dst.bn2, src.bn2, mid)
            dst.conv2.weight.data.copy_(src.conv2.weight.data[stream][:, mid])
            if first:
                dst.shortcut.weight.data.copy_(src.shortcut.weight.data[stream])
        _copy_bn(out.bn, student.bn, stream)
        out.fc.weight.data.copy_(weights[:, stream])
        out.fc.bias.data.copy_(student.fc.bias.data[rows])
        return out

    return cut
