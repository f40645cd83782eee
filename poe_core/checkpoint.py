"""Training checkpoints as a directory of safetensors shards plus one JSON skeleton.

A checkpoint is the nested state of a running phase (module weights, optimizer and
scheduler state, figures). Pickle is not used: tensors go to safetensors shards of at
most `SHARD_BYTES` each, everything else to `state.json` with each tensor replaced by
its key. That keeps a checkpoint safe to load from anywhere and small enough per file to
be committed, so a long phase (the oracle: hours on a CPU without native bf16) can be
carried across machines and resumed there.

The directory is written beside its final place and renamed into it, so a crash leaves
either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD_BYTES = 6 * 2**20
FORMAT = "poe-checkpoint/1"


def _flatten(obj, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"tensor": path}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            return {"dict": {k: _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        if all(isinstance(k, int) for k in obj):
            return {"intdict": {str(k): _flatten(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        raise TypeError(f"{path}: checkpoint dicts need str or int keys")
    if isinstance(obj, list | tuple):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return {"value": obj}
    raise TypeError(f"{path}: cannot checkpoint a {type(obj).__name__}")


def _unflatten(node, tensors: dict[str, torch.Tensor], map_location):
    (kind, value), = node.items()
    if kind == "tensor":
        return tensors[value].to(map_location)
    if kind == "dict":
        return {k: _unflatten(v, tensors, map_location) for k, v in value.items()}
    if kind == "intdict":
        return {int(k): _unflatten(v, tensors, map_location) for k, v in value.items()}
    if kind in ("list", "tuple"):
        items = [_unflatten(v, tensors, map_location) for v in value]
        return items if kind == "list" else tuple(items)
    return value


def save_checkpoint(state: Mapping, directory: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "state")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    files = []
    for i, shard in enumerate(shards):
        name = f"tensors-{i:03d}.safetensors"
        save_file(shard, str(tmp / name))
        files.append(name)
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "shards": files, "state": skeleton}))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def _recover(directory: Path) -> None:
    """A crash between the two renames of `save_checkpoint` leaves only `.old`."""
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and (old / "state.json").is_file():
        os.replace(old, directory)


def checkpoint_exists(directory: Path) -> bool:
    _recover(directory)
    return (directory / "state.json").is_file()


def load_checkpoint(directory: Path, map_location: torch.device | str = "cpu") -> dict:
    _recover(directory)
    doc = json.loads((directory / "state.json").read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{directory}: unknown checkpoint format {doc.get('format')!r}")
    tensors: dict[str, torch.Tensor] = {}
    for name in doc["shards"]:
        tensors |= load_file(str(directory / name))
    return _unflatten(doc["state"], tensors, map_location)


def remove_checkpoint(directory: Path) -> None:
    for d in (directory, directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")):
        shutil.rmtree(d, ignore_errors=True)
