"""Training checkpoints: safetensors shards + JSON, crash-safe replacement."""

import os

import pytest
import torch

from poe_core import checkpoint
from poe_core.checkpoint import checkpoint_exists, load_checkpoint, remove_checkpoint, save_checkpoint


def _state():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {"epoch": 3, "modules": {"m": model.state_dict()}, "optimizer": opt.state_dict(),
            "history": [{"epoch": 1, "val_acc": None}], "pair": (1, "a"), "best": {"m": 0.5}}


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def test_round_trip_keeps_every_value_and_type(tmp_path):
    state = _state()
    save_checkpoint(state, tmp_path / "c")
    assert _equal(state, load_checkpoint(tmp_path / "c"))
    # an optimizer accepts it back (its state is keyed by int parameter ids)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(load_checkpoint(tmp_path / "c")["optimizer"])
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, state["optimizer"]["state"][0]["momentum_buffer"])


def test_shards_stay_under_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 1000)
    save_checkpoint({"a": torch.zeros(200), "b": torch.zeros(200), "c": torch.zeros(10)}, tmp_path / "c")
    shards = sorted((tmp_path / "c").glob("tensors-*.safetensors"))
    assert len(shards) == 2
    assert _equal(load_checkpoint(tmp_path / "c")["b"], torch.zeros(200))


def test_a_crash_between_the_renames_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "c")
    os.replace(tmp_path / "c", tmp_path / "c.old")  # as if killed after the first rename
    assert checkpoint_exists(tmp_path / "c")
    assert load_checkpoint(tmp_path / "c") == {"epoch": 1}
    save_checkpoint({"epoch": 2}, tmp_path / "c")
    assert load_checkpoint(tmp_path / "c") == {"epoch": 2}
    remove_checkpoint(tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_unknown_objects_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot checkpoint"):
        save_checkpoint({"f": object()}, tmp_path / "c")
