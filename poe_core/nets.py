"""Architecture families, each split into a library and expert heads.

**WRN-l-(kc, ks)** (CIFAR-100 and, with stride 2 in conv1, Tiny-ImageNet in the paper)
is the pre-activation WRN of Zagoruyko & Komodakis with the paper's two widening
factors: conv1 has 16 channels, conv2 16*kc, conv3 32*kc and conv4 64*ks; each of
conv2..conv4 holds (l - 4) / 6 basic blocks. The *library* is conv1..conv3; an *expert*
is conv4 + BN + ReLU + global average pooling + a linear layer over the classes of its
primitive task.

**MobileNetV2-k-(kc, ks)** (the paper's ImageNet setting) is built from torchvision's
`mobilenet_v2` blocks: the library is the stem and the first k of its seven
inverted-residual stages at width multiplier kc; an expert is the remaining stages, the
1x1 convolution to the last channels (1280 * ks, where torchvision keeps at least 1280)
and a linear layer, all at width multiplier ks, so far fewer channels than the library's
own continuation. No dropout: the heads are small and distilled, like the WRN's.

A whole network of either family is a library followed by one head over all classes,
so the oracle, the library's KD student and the experts share one code path. A spec's
`to_dict` is what manifests and work directories record; `spec_from_dict` reads it back
(no "family" key: a WRN, as every pool before MobileNetV2 recorded it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual, _make_divisible
from torchvision.ops.misc import Conv2dNormActivation


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
    """The architecture WRN-depth-(kc, ks); `stride` is conv1's (2 for 64x64 inputs)."""

    depth: int
    kc: float
    ks: float
    stride: int = 1

    family = "wrn"

    @property
    def library_channels(self) -> int:
        return round(32 * self.kc)

    @property
    def head_channels(self) -> int:
        return round(64 * self.ks)

    def library(self, in_channels: int = 3) -> Library:
        return Library(self.depth, self.kc, in_channels, self.stride)

    def head(self, library_channels: int, num_classes: int) -> ExpertHead:
        return ExpertHead(self.depth, library_channels, self.ks, num_classes)

    def with_ks(self, ks: float) -> WRNSpec:
        return replace(self, ks=ks)

    def __str__(self) -> str:
        return f"WRN-{self.depth}-({self.kc:g},{self.ks:g})" + (f"/{self.stride}" if self.stride != 1 else "")

    def to_dict(self) -> dict:
        # A stride of 1 is not written, so WRN pools and work directories read as before.
        d = asdict(self)
        if self.stride == 1:
            del d["stride"]
        return d


class Library(nn.Module):
    """conv1..conv3 of a WRN: (N, 3, H, W) -> (N, 32*kc, H/(2*stride), W/(2*stride)) features."""

    def __init__(self, depth: int, kc: float, in_channels: int = 3, stride: int = 1) -> None:
        super().__init__()
        n = blocks_per_group(depth)
        width2, width3 = round(16 * kc), round(32 * kc)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride, 1, bias=False)
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


# torchvision's MobileNetV2 stages: expansion t, output channels c, blocks n, stride s.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENET_V2_LAST_CHANNELS = 1280


def _channels(c: float, width: float) -> int:
    return _make_divisible(c * width, 8)


def inverted_residual_stages(in_channels: int, stages: Sequence[tuple[int, int, int, int]],
                             width: float) -> tuple[nn.Sequential, int]:
    """torchvision's InvertedResidual blocks of `stages` at width multiplier `width`,
    and the channels they output."""
    blocks = []
    for t, c, n, s in stages:
        out = _channels(c, width)
        for i in range(n):
            blocks.append(InvertedResidual(in_channels, out, s if i == 0 else 1, t))
            in_channels = out
    return nn.Sequential(*blocks), in_channels


@dataclass(frozen=True)
class MobileNetV2Spec:
    """MobileNetV2 with the library = stem + the first `split` stages at width kc,
    the expert = the other stages + last 1x1 convolution + linear at width ks."""

    split: int
    kc: float
    ks: float

    family = "mobilenet_v2"

    def __post_init__(self) -> None:
        if not 1 <= self.split < len(MOBILENET_V2_STAGES):
            raise ValueError(f"MobileNetV2 split must be 1..{len(MOBILENET_V2_STAGES) - 1} "
                             f"(stages in the library), got {self.split}")

    def library(self, in_channels: int = 3) -> MobileNetV2Library:
        return MobileNetV2Library(self.split, self.kc, in_channels)

    def head(self, library_channels: int, num_classes: int) -> MobileNetV2Head:
        return MobileNetV2Head(self.split, library_channels, self.ks, num_classes)

    def with_ks(self, ks: float) -> MobileNetV2Spec:
        return replace(self, ks=ks)

    def __str__(self) -> str:
        return f"MobileNetV2-{self.split}-({self.kc:g},{self.ks:g})"

    def to_dict(self) -> dict:
        return {"family": self.family, **asdict(self)}


class MobileNetV2Library(nn.Module):
    """Stem + stages 1..k of MobileNetV2: (N, 3, H, W) -> (N, C_k, H/2^d, W/2^d) features,
    d = 1 + the stride-2 stages among the first k."""

    def __init__(self, split: int, width: float, in_channels: int = 3) -> None:
        super().__init__()
        stem = _channels(32, width)
        self.stem = Conv2dNormActivation(in_channels, stem, stride=2, activation_layer=nn.ReLU6)
        self.stages, self.out_channels = inverted_residual_stages(stem, MOBILENET_V2_STAGES[:split], width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class MobileNetV2Head(nn.Module):
    """Stages k+1..7 + 1x1 convolution + global pool + linear, at width ks:
    library features -> class logits."""

    def __init__(self, split: int, in_channels: int, ks: float, num_classes: int) -> None:
        super().__init__()
        self.stages, channels = inverted_residual_stages(in_channels, MOBILENET_V2_STAGES[split:], ks)
        last = _channels(MOBILENET_V2_LAST_CHANNELS, ks)
        self.last = Conv2dNormActivation(channels, last, kernel_size=1, activation_layer=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.last(self.stages(features))), 1))


ArchSpec = WRNSpec | MobileNetV2Spec
FAMILIES = {"wrn": WRNSpec, "mobilenet_v2": MobileNetV2Spec}


def spec_from_dict(d: Mapping) -> ArchSpec:
    """The spec a manifest or work directory recorded (`to_dict`)."""
    fields = dict(d)
    family = fields.pop("family", "wrn")
    if family not in FAMILIES:
        raise ValueError(f"unknown architecture family {family!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[family](**fields)


def check_continues(library: ArchSpec, expert: ArchSpec) -> None:
    """Raise ValueError unless experts of `expert` can sit on a library of `library`:
    the same family, and for MobileNetV2 the same split point."""
    if expert.family != library.family or getattr(expert, "split", None) != getattr(library, "split", None):
        raise ValueError(f"the experts ({expert}) must continue the library ({library}): "
                         "the same family and split point")


class Network(nn.Module):
    """A whole network of a family: its library followed by one head over all classes."""

    def __init__(self, spec: ArchSpec, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.spec = spec
        self.library = spec.library(in_channels)
        self.head = spec.head(self.library.out_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.library(x))


class BranchedModel(nn.Module):
    """The composite model: library -> [expert_a, expert_b, ...] -> concatenated logits."""

    def __init__(self, library: nn.Module, experts: Sequence[nn.Module]) -> None:
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


def wrn(depth: int, kc: float, ks: float, num_classes: int, stride: int = 1) -> Network:
    return Network(WRNSpec(depth, kc, ks, stride), num_classes)


def expert_head(spec: ArchSpec, library_channels: int, num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised expert head; the seed makes it independent of creation order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = spec.head(library_channels, num_classes)
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
