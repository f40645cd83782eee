"""Expert heads of one architecture trained as one grouped network.

Twenty heads at ks 0.25 are twenty networks of 16-channel 8x8 convolutions; trained one
after the other in every step, the step is mostly per-module overhead. Heads of the same
architecture widen into one network of the same structure, G times as wide, in which
head g owns the g-th block of channels of every layer:

- a convolution becomes one with G times the channels and G times the groups (a
  depthwise one stays depthwise), its weight the heads' weights concatenated along the
  output channels;
- a batch norm becomes one over the G heads' channels: it normalises per channel, so
  each head keeps its own statistics and affine parameters;
- a linear layer becomes G linear layers in one batched product (`GroupedLinear`).

The library features enter repeated once per head: every head's first batch norm has
its own affine parameters, so even the first convolution reads a different input per
head. Every grouped tensor is the heads' tensors concatenated along dim 0, so the
grouped network computes what the heads compute, each head's gradient is what it would
get alone, and SGD (momentum and weight decay are elementwise) moves each head's block
exactly as it would move the head.

The per-head modules stay the ones selected, checkpointed and exported: `HeadGroups`
copies them into the grouped networks (`load_heads`) and back (`store_heads`), and
translates the optimizer's state between the two layouts, so a checkpoint keeps the
per-head format of the loop that trains the heads one by one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

GROUPABLE = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


class GroupedLinear(nn.Module):
    """G linear layers side by side: (N, G * in) -> (N, G * out), block g by layer g.
    The weight (G * out, in) is the layers' weights concatenated, as in a grouped conv."""

    def __init__(self, groups: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.groups, self.in_features, self.out_features = groups, in_features, out_features
        self.weight = nn.Parameter(torch.empty(groups * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(groups * out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i, o = self.groups, self.in_features, self.out_features
        x = x.view(-1, g, i).transpose(0, 1)  # (G, N, in)
        out = torch.baddbmm(self.bias.view(g, 1, o), x, self.weight.view(g, o, i).transpose(1, 2))
        return out.transpose(0, 1).reshape(-1, g * o)


def _widened(m: nn.Module, g: int) -> nn.Module:
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(m.in_channels * g, m.out_channels * g, m.kernel_size, m.stride, m.padding,
                         m.dilation, m.groups * g, m.bias is not None, m.padding_mode)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(m.num_features * g, m.eps, m.momentum, m.affine, m.track_running_stats)
    return GroupedLinear(g, m.in_features, m.out_features)


def groupable(head: nn.Module) -> bool:
    """Whether `head` widens into a grouped network: every layer with parameters or
    buffers a convolution, a batch norm or a linear layer with bias, and no other
    layer mixing channels (true of every head in poe_core.nets)."""
    stateful = (m for m in head.modules() if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)))
    return all(isinstance(m, GROUPABLE) and (not isinstance(m, nn.Linear) or m.bias is not None) for m in stateful)


def _signature(head: nn.Module) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in head.state_dict().items())


class GroupedHeads(nn.Module):
    """G heads of one architecture as one network: library features (N, C, H, W) ->
    logits (N, G, K), head g's in [:, g]."""

    def __init__(self, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        if len({_signature(h) for h in heads}) != 1 or not groupable(heads[0]):
            raise ValueError("grouped heads must share one architecture made of convolutions, "
                             "batch norms and linear layers")
        self.size = len(heads)
        self.body = copy.deepcopy(heads[0])
        for m in list(self.body.modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, GROUPABLE):
                    setattr(m, child_name, _widened(child, self.size))
        self.load_heads(heads)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.is_contiguous(memory_format=torch.channels_last):
            # repeated along the channels of the NHWC memory: one copy, still channels_last
            x = features.permute(0, 2, 3, 1).repeat(1, 1, 1, self.size).permute(0, 3, 1, 2)
        else:
            x = features.repeat(1, self.size, 1, 1)
        return self.body(x).view(len(features), self.size, -1)

    @torch.no_grad()
    def load_heads(self, heads: Sequence[nn.Module]) -> None:
        """Take the heads' weights and batch-norm statistics."""
        states = [h.state_dict() for h in heads]
        # A step counter (num_batches_tracked) is the same in heads trained together: kept once.
        self.body.load_state_dict({k: torch.cat([s[k] for s in states]) if v.dim() else v
                                   for k, v in states[0].items()})

    @torch.no_grad()
    def store_heads(self, heads: Sequence[nn.Module]) -> None:
        """Write the grouped weights and statistics back into the heads."""
        for g, head in enumerate(heads):
            head.load_state_dict({k: self.block(v, g) for k, v in self.body.state_dict().items()})

    def block(self, t: torch.Tensor, g: int) -> torch.Tensor:
        """Head g's part of a grouped tensor (a scalar is every head's)."""
        return t.chunk(self.size)[g] if t.dim() else t


class HeadGroups(nn.Module):
    """Named heads partitioned by architecture into `GroupedHeads`, one per architecture
    (e.g. one per head width), in order of first appearance."""

    def __init__(self, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        by_arch: dict[tuple, list[str]] = {}
        for name, head in heads.items():
            by_arch.setdefault(_signature(head), []).append(name)
        self.heads = dict(heads)  # not submodules: their parameters are not this module's
        self.names = list(by_arch.values())
        self.groups = nn.ModuleList(GroupedHeads([heads[n] for n in names]) for names in self.names)

    def forward(self, features: torch.Tensor) -> list[tuple[list[str], torch.Tensor]]:
        """Each group's head names and logits (N, G, K)."""
        return [(names, group(features)) for names, group in zip(self.names, self.groups, strict=True)]

    def load_heads(self) -> None:
        for names, group in zip(self.names, self.groups, strict=True):
            group.load_heads([self.heads[n] for n in names])

    def store_heads(self) -> None:
        for names, group in zip(self.names, self.groups, strict=True):
            group.store_heads([self.heads[n] for n in names])

    def _layouts(self) -> tuple[list[tuple[str, str]], list[tuple[int, str]]]:
        """The optimizer's parameter order over the heads one by one (head name, parameter
        name) and over the groups (group index, parameter name)."""
        per_head = [(n, p) for n, head in self.heads.items() for p, _ in head.named_parameters()]
        grouped = [(i, p) for i, group in enumerate(self.groups) for p, _ in group.body.named_parameters()]
        return per_head, grouped

    def optimizer_state_to_heads(self, state: Mapping) -> dict:
        """An optimizer state over the grouped parameters as the same state over the
        heads' parameters (what training the heads one by one would hold)."""
        per_head, grouped = self._layouts()
        where = {n: (i, names.index(n)) for i, names in enumerate(self.names) for n in names}
        index = {key: j for j, key in enumerate(grouped)}
        out = {}
        for j, (name, param) in enumerate(per_head):
            i, g = where[name]
            values = state["state"].get(index[(i, param)])
            if values is not None:
                out[j] = {k: self.groups[i].block(v, g).clone() if torch.is_tensor(v) else v
                          for k, v in values.items()}
        return {"state": out, "param_groups": _with_params(state["param_groups"], len(per_head))}

    def optimizer_state_from_heads(self, state: Mapping) -> dict:
        """The inverse of `optimizer_state_to_heads`."""
        per_head, grouped = self._layouts()
        index = {key: j for j, key in enumerate(per_head)}
        out = {}
        for i, (g, param) in enumerate(grouped):
            parts = [state["state"].get(index[(n, param)]) for n in self.names[g]]
            if any(p is None for p in parts):
                continue
            out[i] = {k: torch.cat([p[k] for p in parts]) if torch.is_tensor(v) and v.dim() else v
                      for k, v in parts[0].items()}
        return {"state": out, "param_groups": _with_params(state["param_groups"], len(grouped))}


def _with_params(param_groups: Sequence[Mapping], count: int) -> list[dict]:
    if len(param_groups) != 1:
        raise ValueError("grouped heads train with one parameter group")
    return [dict(param_groups[0], params=list(range(count)))]
