"""Wide residual networks WRN-l-(kc, ks), split into a library and expert heads.

WRN-l-(kc, ks) is the pre-activation WRN of Zagoruyko & Komodakis with the paper's
two widening factors: conv1 has 16 channels, conv2 16*kc, conv3 32*kc and conv4 64*ks;
each of conv2..conv4 holds (l - 4) / 6 basic blocks. The *library* is conv1..conv3;
an *expert* is conv4 + BN + ReLU + global average pooling + a linear layer over the
classes of its primitive task. A full WRN is a library followed by one head over all
classes, so the oracle, the library's KD student and the experts share one code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)
            if in_channels != out_channels or stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu(self.bn1(x))
        # The projection shortcut reads the activated input, as in the reference WRN.
        shortcut = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.relu(self.bn2(o)))
        return o + shortcut


def block_group(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def blocks_per_group(depth: int) -> int:
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
    return (depth - 4) // 6


@dataclass(frozen=True)
class WRNSpec:
    """The architecture WRN-depth-(kc, ks)."""

    depth: int
    kc: float
    ks: float

    @property
    def library_channels(self) -> int:
        return round(32 * self.kc)

    @property
    def head_channels(self) -> int:
        return round(64 * self.ks)

    def __str__(self) -> str:
        return f"WRN-{self.depth}-({self.kc:g},{self.ks:g})"

    def to_dict(self) -> dict:
        return asdict(self)


class Library(nn.Module):
    """conv1..conv3 of a WRN: (N, 3, H, W) -> (N, 32*kc, H/2, W/2) features."""

    def __init__(self, depth: int, kc: float, in_channels: int = 3) -> None:
        super().__init__()
        n = blocks_per_group(depth)
        width2, width3 = round(16 * kc), round(32 * kc)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.conv2 = block_group(16, width2, n, 1)
        self.conv3 = block_group(width2, width3, n, 2)
        self.out_channels = width3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class ExpertHead(nn.Module):
    """conv4 + BN + ReLU + global pool + linear: library features -> class logits."""

    def __init__(self, depth: int, in_channels: int, ks: float, num_classes: int) -> None:
        super().__init__()
        width4 = round(64 * ks)
        self.conv4 = block_group(in_channels, width4, blocks_per_group(depth), 2)
        self.bn = nn.BatchNorm2d(width4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width4, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        o = self.pool(self.relu(self.bn(self.conv4(features))))
        return self.fc(torch.flatten(o, 1))


class WideResNet(nn.Module):
    """A whole WRN-l-(kc, ks): library followed by one head over all classes."""

    def __init__(self, spec: WRNSpec, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.spec = spec
        self.library = Library(spec.depth, spec.kc, in_channels)
        self.head = ExpertHead(spec.depth, self.library.out_channels, spec.ks, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.library(x))


class BranchedModel(nn.Module):
    """The composite model: library -> [expert_a, expert_b, ...] -> concatenated logits."""

    def __init__(self, library: Library, experts: Sequence[ExpertHead]) -> None:
        super().__init__()
        self.library = library
        self.experts = nn.ModuleList(experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.library(x)
        return torch.cat([expert(features) for expert in self.experts], dim=1)


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def wrn(depth: int, kc: float, ks: float, num_classes: int) -> WideResNet:
    return WideResNet(WRNSpec(depth, kc, ks), num_classes)


def expert_head(spec: WRNSpec, library_channels: int, num_classes: int, seed: int) -> ExpertHead:
    """A freshly initialised expert head; the seed makes it independent of creation order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = ExpertHead(spec.depth, library_channels, spec.ks, num_classes)
        init_weights(head)
    return head


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass for one image (the paper's 'FLOPs')."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += out[0].numel() * k

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    return total
