"""Expert heads trained as grouped networks equal the heads trained one by one."""

import pytest
import torch
from conftest import tiny_plan

from poe_core.checkpoint import load_checkpoint
from poe_core.extract import load_wrn
from poe_core.grouped import HeadGroups, groupable
from poe_core.nets import MobileNetV2Spec, WRNSpec, expert_head
from poe_core.train import HeadTarget, TrainConfig, train_experts, train_heads

TASKS = ["task0", "task1", "task2"]
WIDTHS = [0.25, 0.5]


@pytest.fixture(scope="module")
def networks(work_dir):
    return load_wrn(work_dir, "oracle", 6), load_wrn(work_dir, "library", 6).library


def _assert_same_heads(heads, expected):
    """Weights and batch-norm statistics equal up to float rounding."""
    assert set(heads) == set(expected)
    for name, head in expected.items():
        for key, value in head.state_dict().items():
            torch.testing.assert_close(heads[name].state_dict()[key], value, atol=1e-4, rtol=1e-4)


def _heads(spec, channels):
    """Heads of two widths and two class counts: three architectures, so three groups."""
    heads = {f"a{i}": expert_head(spec, channels, 5, seed=i) for i in range(3)}
    heads |= {f"b{i}": expert_head(spec.with_ks(2 * spec.ks), channels, 5, seed=10 + i) for i in range(2)}
    heads["c"] = expert_head(spec, channels, 3, seed=20)
    return heads


@pytest.mark.parametrize("spec, channels, size", [(WRNSpec(10, 0.5, 0.25), 16, 8),
                                                  (MobileNetV2Spec(5, 0.5, 0.25), 48, 7)])
def test_grouped_forward_equals_the_heads(spec, channels, size):
    heads = _heads(spec, channels)
    assert all(groupable(h) for h in heads.values())
    groups = HeadGroups(heads)
    assert groups.names == [["a0", "a1", "a2"], ["b0", "b1"], ["c"]]
    features = torch.randn(6, channels, size, size)
    nchw, nhwc = torch.contiguous_format, torch.channels_last
    for training, layout in ((True, nchw), (True, nhwc), (False, nhwc)):
        for m in [groups, *heads.values()]:
            m.train(training)
        features = features.contiguous(memory_format=layout)
        with torch.no_grad():
            grouped = {n: out[:, g] for names, out in groups(features) for g, n in enumerate(names)}
            for name, head in heads.items():
                torch.testing.assert_close(grouped[name], head(features), atol=1e-5, rtol=1e-5)
    # the batch norms' running statistics moved per head, as the heads' own did
    before = {n: {k: v.clone() for k, v in h.state_dict().items()} for n, h in heads.items()}
    groups.store_heads()
    for name, head in heads.items():
        for key, value in head.state_dict().items():
            torch.testing.assert_close(value, before[name][key], atol=1e-5, rtol=1e-5)


def test_a_head_of_other_layers_is_not_groupable():
    head = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.LayerNorm([4, 2, 2]))
    assert not groupable(head)
    with pytest.raises(ValueError, match="grouped heads"):
        HeadGroups({"a": head})


def test_grouped_training_equals_the_heads_one_by_one(networks, synthetic):
    oracle, library = networks
    plan = tiny_plan(epochs=2)
    grouped, r1 = train_experts(library, oracle, synthetic, TASKS, plan.expert_spec, plan.expert_cfg,
                                widths=WIDTHS, grouped=True)
    alone, r2 = train_experts(library, oracle, synthetic, TASKS, plan.expert_spec, plan.expert_cfg,
                              widths=WIDTHS, grouped=False)
    assert len(grouped) == 6
    assert all(type(grouped[name]) is type(head) for name, head in alone.items())
    _assert_same_heads(grouped, alone)
    assert r1.best_val_acc == pytest.approx(r2.best_val_acc, abs=1e-4)
    assert r1.best_epoch == r2.best_epoch
    assert [h["loss"] for h in r1.history] == pytest.approx([h["loss"] for h in r2.history], rel=1e-4)
    # they trained: the heads moved away from their initial weights
    fresh = expert_head(plan.expert_spec.with_ks(0.25), library.out_channels, 2, seed=0).state_dict()
    assert not torch.allclose(grouped["task0@0.25"].state_dict()["fc.weight"], fresh["fc.weight"])


def test_grouped_heads_keep_each_heads_own_loss(networks, synthetic):
    oracle, library = networks
    plan = tiny_plan(epochs=1)
    heads = {"soft": HeadTarget((0, 1), "soft", 1), "scale": HeadTarget((0, 1), "scale", 2),
             "ckd": HeadTarget((2, 3), "ckd", 3), "composite": HeadTarget((0, 1, 2, 3), "ckd", 4)}
    grouped, r1 = train_heads(library, oracle, synthetic, heads, plan.expert_spec, plan.expert_cfg, grouped=True)
    alone, r2 = train_heads(library, oracle, synthetic, heads, plan.expert_spec, plan.expert_cfg, grouped=False)
    _assert_same_heads(grouped, alone)
    assert r1.best_val_acc == pytest.approx(r2.best_val_acc, abs=1e-4)


class Stop(Exception):
    """An interruption in the middle of a run."""


def stop_in_epoch_three(p):
    if p.epoch == 3:
        raise Stop


@pytest.mark.parametrize("first, then", [(True, True), (False, True), (True, False)])
def test_an_interrupted_run_resumes_grouped_or_not(tmp_path, networks, synthetic, first, then):
    """A checkpoint keeps the per-head format, so either loop resumes the other's."""
    oracle, library = networks
    plan = tiny_plan()
    cfg = TrainConfig(**(plan.expert_cfg.to_dict() | {"epochs": 3}))
    full, full_result = train_experts(library, oracle, synthetic, TASKS, plan.expert_spec, cfg,
                                      widths=WIDTHS, grouped=False)
    ckpt = tmp_path / "experts.checkpoint"
    with pytest.raises(Stop):
        train_experts(library, oracle, synthetic, TASKS, plan.expert_spec, cfg, widths=WIDTHS,
                      checkpoint=ckpt, progress=stop_in_epoch_three, grouped=first)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 2 and set(state["modules"]) == set(full)
    assert len(state["optimizer"]["state"]) == sum(len(list(h.parameters())) for h in full.values())
    resumed, result = train_experts(library, oracle, synthetic, TASKS, plan.expert_spec, cfg, widths=WIDTHS,
                                    checkpoint=ckpt, grouped=then)
    assert result.epochs == 3 and len(result.history) == 3
    _assert_same_heads(resumed, full)
    assert result.best_val_acc == pytest.approx(full_result.best_val_acc, abs=1e-4)
