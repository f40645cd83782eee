import pytest
import torch
from conftest import tiny_plan

from poe_core.data import Normalize, augment, batches, stratified_split
from poe_core.extract import load_wrn
from poe_core.train import TrainConfig, train_experts, train_oracle


def _states_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_stratified_split_holds_out_per_class():
    labels = torch.arange(4).repeat_interleave(10)
    kept, held = stratified_split(labels, 3, seed=0)
    assert len(held) == 12 and len(kept) == 28
    assert torch.bincount(labels[held]).tolist() == [3, 3, 3, 3]
    assert not set(kept.tolist()) & set(held.tolist())


def test_augmentation_is_crop_and_flip_of_the_batch():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    out = augment(x, torch.Generator().manual_seed(1), pad=0)
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    shifted = augment(x, torch.Generator().manual_seed(3), pad=4)
    assert shifted.shape == x.shape


def test_batch_order_is_fixed_by_the_seed(synthetic):
    norm = Normalize(synthetic.mean, synthetic.std, torch.device("cpu"))

    def first(seed):
        return next(batches(synthetic.train, 8, seed=seed, augmented=True, normalize=norm,
                            device=torch.device("cpu")))

    assert torch.equal(first(5)[0], first(5)[0])
    assert not torch.equal(first(5)[0], first(6)[0])


def test_frozen_library_does_not_change_during_expert_training(work_dir, synthetic):
    oracle = load_wrn(work_dir, "oracle", 6)
    library = load_wrn(work_dir, "library", 6).library
    before = {k: v.clone() for k, v in library.state_dict().items()}
    plan = tiny_plan(epochs=2)
    experts, _ = train_experts(library, oracle, synthetic, ["task0", "task1"], plan.expert_spec,
                               plan.expert_cfg)
    assert _states_equal(before, library.state_dict())  # weights and BN running statistics
    assert any(not torch.equal(v, experts["task0"].state_dict()[k])
               for k, v in _fresh_head_state(plan, library).items())


def _fresh_head_state(plan, library):
    from poe_core.nets import expert_head

    return expert_head(plan.expert_spec, library.out_channels, 2, seed=0).state_dict()


def test_joint_training_equals_training_each_expert_alone(work_dir, synthetic):
    oracle = load_wrn(work_dir, "oracle", 6)
    library = load_wrn(work_dir, "library", 6).library
    plan = tiny_plan(epochs=2)
    joint, joint_result = train_experts(library, oracle, synthetic, ["task0", "task1", "task2"],
                                        plan.expert_spec, plan.expert_cfg)
    for task in ("task1", "task2"):
        alone, alone_result = train_experts(library, oracle, synthetic, [task],
                                            plan.expert_spec, plan.expert_cfg)
        for key, value in alone[task].state_dict().items():
            torch.testing.assert_close(joint[task].state_dict()[key], value, atol=1e-5, rtol=1e-4)
        assert joint_result.best_val_acc[task] == alone_result.best_val_acc[task]


@pytest.mark.parametrize("select", ["best", "last"])
def test_experts_keep_the_epoch_their_selection_names(tmp_path, work_dir, synthetic, select):
    from poe_core.checkpoint import load_checkpoint

    oracle = load_wrn(work_dir, "oracle", 6)
    library = load_wrn(work_dir, "library", 6).library
    cfg = TrainConfig(**(tiny_plan(epochs=4).expert_cfg.to_dict() | {"select": select}))
    ckpt = tmp_path / "experts.checkpoint"
    experts, result = train_experts(library, oracle, synthetic, ["task0", "task1"], tiny_plan().expert_spec, cfg,
                                    checkpoint=ckpt)
    state = load_checkpoint(ckpt)
    kept = state["modules"] if select == "last" else state["best_states"]
    for task, head in experts.items():
        assert _states_equal(head.state_dict(), kept[task])
    if select == "last":
        assert state["best_states"] is None  # the kept state is the current one: stored once
        assert result.best_epoch == {"task0": 4, "task1": 4}
        # the accuracy reported is the kept (last) epoch's, not the best one's
        assert sum(result.best_val_acc.values()) / 2 == pytest.approx(result.history[-1]["val_acc"])
    else:
        assert all(1 <= result.best_epoch[task] <= 4 for task in experts)


def test_an_unknown_epoch_selection_is_refused(synthetic):
    plan = tiny_plan(epochs=1)
    with pytest.raises(ValueError, match="selection"):
        train_oracle(synthetic, plan.oracle_spec, TrainConfig(**(plan.oracle_cfg.to_dict() | {"select": "median"})))


class Stop(Exception):
    """An interruption in the middle of a run."""


def stop_in_epoch_three(p):
    if p.epoch == 3:
        raise Stop


def test_resumed_training_equals_uninterrupted(tmp_path, synthetic):
    plan = tiny_plan()
    cfg3 = TrainConfig(**(plan.oracle_cfg.to_dict() | {"epochs": 3}))
    full, _ = train_oracle(synthetic, plan.oracle_spec, cfg3)

    ckpt = tmp_path / "oracle.ckpt"
    with pytest.raises(Stop):
        train_oracle(synthetic, plan.oracle_spec, cfg3, checkpoint=ckpt, progress=stop_in_epoch_three)
    assert ckpt.exists()
    resumed, result = train_oracle(synthetic, plan.oracle_spec, cfg3, checkpoint=ckpt)
    assert result.epochs == 3 and len(result.history) == 3
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-5, rtol=1e-4)


def test_an_oracle_on_train_and_val_resumes_and_keeps_its_last_epoch(tmp_path, synthetic):
    from poe_core.checkpoint import load_checkpoint

    plan = tiny_plan()
    cfg3 = TrainConfig(**(plan.oracle_cfg.to_dict() | {"epochs": 3}))
    full, full_result = train_oracle(synthetic, plan.oracle_spec, cfg3, with_val=True)
    assert full_result.best_epoch == {"oracle": 3}
    assert all(h["val_acc"] is None for h in full_result.history)

    ckpt = tmp_path / "oracle.checkpoint"
    with pytest.raises(Stop):
        train_oracle(synthetic, plan.oracle_spec, cfg3, with_val=True, checkpoint=ckpt, progress=stop_in_epoch_three)
    assert load_checkpoint(ckpt)["best_states"] is None  # the last epoch is the kept one: stored once
    resumed, _ = train_oracle(synthetic, plan.oracle_spec, cfg3, with_val=True, checkpoint=ckpt)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-5, rtol=1e-4)
    # it saw the validation images: an oracle on train only ends elsewhere
    train_only, _ = train_oracle(synthetic, plan.oracle_spec, cfg3)
    assert not torch.equal(train_only.state_dict()["head.fc.weight"], full.state_dict()["head.fc.weight"])


def test_progress_reports_rise_to_completion(synthetic):
    plan = tiny_plan(epochs=2)
    seen = []
    train_oracle(synthetic, plan.oracle_spec, plan.oracle_cfg, progress=seen.append)
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [p.epoch for p in seen if p.val_acc is not None] == [1, 2]


def test_task_splits_keep_only_the_task_images_relabelled(synthetic):
    from poe_core.train import task_splits

    sub = task_splits(synthetic, [5, 2])
    assert sorted(sub.train.y.unique().tolist()) == [0, 1]
    assert len(sub.train) == 2 * len(synthetic.train.of_classes([0]))
    assert sub.taxonomy.classes == ("class2_1", "class1_0")


def test_baselines_train_on_their_task(work_dir, synthetic):
    from poe_core.train import train_scratch, train_transfer

    plan = tiny_plan(epochs=2)
    library = load_wrn(work_dir, "library", 6).library
    before = {k: v.clone() for k, v in library.state_dict().items()}
    head, transfer = train_transfer(library, synthetic, [0, 1], plan.expert_spec, plan.expert_cfg)
    assert _states_equal(before, library.state_dict())
    assert head.fc.out_features == 2 and 0 <= transfer.best_val_acc["transfer"] <= 1
    model, scratch = train_scratch(synthetic, [0, 1], plan.library_spec, plan.expert_spec, plan.expert_cfg)
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 2)
    assert scratch.epochs == 2


def test_heads_can_target_a_composite_task_and_ablation_losses(work_dir, synthetic):
    from poe_core.train import HeadTarget, train_heads

    plan = tiny_plan(epochs=1)
    oracle = load_wrn(work_dir, "oracle", 6)
    library = load_wrn(work_dir, "library", 6).library
    heads = {"soft": HeadTarget((0, 1), "soft"), "scale": HeadTarget((0, 1), "scale"),
             "composite": HeadTarget((0, 1, 2, 3), "ckd")}
    trained, result = train_heads(library, oracle, synthetic, heads, plan.expert_spec, plan.expert_cfg)
    assert trained["composite"].fc.out_features == 4
    assert set(result.best_val_acc) == set(heads)
    with pytest.raises(ValueError, match="unknown loss"):
        train_heads(library, oracle, synthetic, {"x": HeadTarget((0,), "mse")}, plan.expert_spec,
                    plan.expert_cfg)


def test_the_library_objective_is_plain_or_standardized_kd(work_dir, synthetic):
    from poe_core.train import train_library

    plan = tiny_plan(epochs=1)
    oracle = load_wrn(work_dir, "oracle", 6)
    cfg = TrainConfig(**(plan.library_cfg.to_dict() | {"kd": "standardized"}))
    plain, _ = train_library(oracle, synthetic, plan.library_spec, plan.library_cfg)
    standardized, result = train_library(oracle, synthetic, plan.library_spec, cfg)
    assert result.epochs == 1
    assert not torch.equal(plain.head.fc.weight, standardized.head.fc.weight)
    with pytest.raises(ValueError, match="unknown KD objective"):
        train_library(oracle, synthetic, plan.library_spec, TrainConfig(**(cfg.to_dict() | {"kd": "dkd"})))
