"""The oracle logit bank, bring-your-own oracles, normalisation and precision choice."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_plan

from poe_core import device as poe_device
from poe_core.bank import LogitBank, ViewRecipe, build_bank, build_features
from poe_core.data import Normalize, apply_views, channel_stats, make_synthetic
from poe_core.extract import load_expert_widths, load_oracle, load_wrn, phase_info, run_phase
from poe_core.oracle import OracleError, from_module
from poe_core.recipe import ExternalOracle
from poe_core.train import train_experts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def oracle(work_dir, synthetic):
    return load_oracle(work_dir, synthetic, CPU)


def test_bank_targets_are_the_oracle_on_the_stored_view(tmp_path, synthetic, oracle):
    recipe = ViewRecipe(views=3, pad=4, seed=1)
    bank = build_bank(oracle, synthetic.train, recipe, tmp_path, device=CPU)
    assert bank.logits.shape == (3, len(synthetic.train), 6) and bank.logits.dtype == torch.float16
    assert torch.equal(bank.views[0], torch.tensor([4, 4, 0]).expand(len(synthetic.train), 3))
    assert not torch.equal(bank.views[1], bank.views[2])
    for v in range(3):
        x = apply_views(synthetic.train.x, bank.views[v], recipe.pad)
        direct = oracle.logits(x)
        torch.testing.assert_close(bank.logits[v].float(), direct, atol=2e-2, rtol=2e-3)


def test_an_interrupted_bank_resumes_to_the_same_bank(tmp_path, synthetic, oracle):
    recipe = ViewRecipe(views=4)
    full = build_bank(oracle, synthetic.train, recipe, tmp_path / "full", device=CPU)

    class Stop(Exception):
        pass

    def stop_after_two(done, _total):
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        build_bank(oracle, synthetic.train, recipe, tmp_path / "cut", device=CPU, progress=stop_after_two)
    state = json.loads(next((tmp_path / "cut").glob("bank-*/state.json")).read_text())
    assert state["done"] == 2
    computed = []
    resumed = build_bank(oracle, synthetic.train, recipe, tmp_path / "cut", device=CPU,
                         progress=lambda done, total: computed.append(done))
    assert computed == [3, 4]  # only the missing chunks
    assert torch.equal(resumed.logits, full.logits) and resumed.key == full.key


def test_bank_key_changes_with_oracle_and_recipe(tmp_path, synthetic, oracle):
    a = build_bank(oracle, synthetic.train, ViewRecipe(views=2), tmp_path, device=CPU)
    b = build_bank(oracle, synthetic.train, ViewRecipe(views=2, seed=5), tmp_path, device=CPU)
    other = replace(oracle, fingerprint="0" * 64)
    c = build_bank(other, synthetic.train, ViewRecipe(views=2), tmp_path, device=CPU)
    assert len({a.key, b.key, c.key}) == 3


class LiveOnStoredViews(LogitBank):
    """The bank's views and batch order, with targets from running the oracle live."""

    def __init__(self, bank, oracle):
        super().__init__(bank.logits, bank.views, bank.recipe, bank.key)
        self.oracle = oracle

    def batches(self, images, batch_size, *, seed, normalize, device, channels_last=True):
        for x, y, _ in super().batches(images, batch_size, seed=seed, normalize=normalize, device=device,
                                       channels_last=channels_last):
            raw = (x * normalize.std + normalize.mean).round().clamp(0, 255).to(torch.uint8)
            yield x, y, self.oracle.logits(raw)


def test_bank_trained_expert_equals_live_oracle_expert_on_the_same_views(tmp_path, work_dir, synthetic, oracle):
    library = load_wrn(work_dir, "library", 6).library
    plan = tiny_plan(epochs=2)
    bank = build_bank(oracle, synthetic.train, ViewRecipe(views=3), tmp_path, device=CPU)
    from_bank, r1 = train_experts(library, bank, synthetic, ["task0", "task2"], plan.expert_spec, plan.expert_cfg)
    live, r2 = train_experts(library, LiveOnStoredViews(bank, oracle), synthetic, ["task0", "task2"],
                             plan.expert_spec, plan.expert_cfg)
    for task in ("task0", "task2"):
        for key, value in live[task].state_dict().items():
            # the bank stores fp16 targets: equal up to that rounding
            torch.testing.assert_close(from_bank[task].state_dict()[key], value, atol=2e-3, rtol=2e-3)
    assert r1.best_val_acc == r2.best_val_acc


def test_experts_on_stored_library_features_equal_experts_running_the_library(tmp_path, work_dir, synthetic,
                                                                             oracle):
    library = load_wrn(work_dir, "library", 6).library
    plan = tiny_plan(epochs=2)
    bank = build_bank(oracle, synthetic.train, ViewRecipe(views=3), tmp_path, device=CPU)
    normalize = Normalize(synthetic.mean, synthetic.std, CPU)
    with_features = build_features(library, bank, synthetic.train, tmp_path, normalize=normalize, device=CPU)
    assert with_features.features.shape[:2] == (3, len(synthetic.train))
    v, i = 2, 7  # a stored feature is the library's output on that stored view
    x = normalize(apply_views(synthetic.train.x[i:i + 1], bank.views[v, i:i + 1], bank.recipe.pad))
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(with_features.features[v, i:i + 1]).float(), library(x),
                                   atol=2e-2, rtol=2e-3)
    tasks = ["task0", "task2"]
    stored, r1 = train_experts(library, with_features, synthetic, tasks, plan.expert_spec, plan.expert_cfg)
    running, r2 = train_experts(library, bank, synthetic, tasks, plan.expert_spec, plan.expert_cfg)
    for task in tasks:
        for key, value in running[task].state_dict().items():
            # the features are stored in fp16: equal up to that rounding
            torch.testing.assert_close(stored[task].state_dict()[key], value, atol=5e-3, rtol=5e-3)
    assert r1.best_val_acc == pytest.approx(r2.best_val_acc, abs=0.02)


def test_library_features_resume_and_follow_the_library(tmp_path, work_dir, synthetic, oracle):
    library = load_wrn(work_dir, "library", 6).library
    bank = build_bank(oracle, synthetic.train, ViewRecipe(views=2), tmp_path, device=CPU)
    normalize = Normalize(synthetic.mean, synthetic.std, CPU)
    full = build_features(library, bank, synthetic.train, tmp_path / "full", normalize=normalize, device=CPU)

    class Stop(Exception):
        pass

    def stop_after_one(done, _total):
        if done == 1:
            raise Stop

    with pytest.raises(Stop):
        build_features(library, bank, synthetic.train, tmp_path, normalize=normalize, device=CPU,
                       progress=stop_after_one)
    computed = []
    resumed = build_features(library, bank, synthetic.train, tmp_path, normalize=normalize, device=CPU,
                             progress=lambda done, total: computed.append(done))
    assert computed == [2]  # only the missing chunk
    assert (resumed.features == full.features).all()
    other = load_wrn(work_dir, "library", 6).library
    with torch.no_grad():
        other.conv1.weight.mul_(2)
    changed = build_features(other, bank, synthetic.train, tmp_path, normalize=normalize, device=CPU)
    assert not (changed.features == full.features).all()
    assert len(list(tmp_path.glob("bank-*/features-*.npy"))) == 2


def test_experts_at_several_widths_train_jointly(tmp_path, work_dir, synthetic):
    work = tmp_path / "w"
    work.mkdir()
    for name in ("oracle", "library"):
        for suffix in (".safetensors", ".json"):
            (work / f"{name}{suffix}").write_bytes((work_dir / f"{name}{suffix}").read_bytes())
    plan = replace(tiny_plan(epochs=1), expert_widths=[0.25, 0.5], bank=ViewRecipe(views=2))
    info = run_phase("experts", work, synthetic, plan)
    assert info["widths"] == [0.25, 0.5] and set(info["val_acc"]) == {
        f"task{i}@{ks:g}" for i in range(3) for ks in (0.25, 0.5)}
    assert info["teacher"] == "logit bank"
    heads = load_expert_widths(work, synthetic)
    assert set(heads) == {0.25, 0.5}
    assert heads[0.5]["task1"].conv4[0].conv1.out_channels == 2 * heads[0.25]["task1"].conv4[0].conv1.out_channels


def _export_onnx(module, path, classes=6):
    module = module.eval().float().to(memory_format=torch.contiguous_format)
    torch.onnx.export(module, torch.zeros(1, 3, 16, 16), str(path), input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "n"}, "scores": {0: "n"}}, dynamo=False)


def test_an_onnx_oracle_builds_a_pool_end_to_end(tmp_path, work_dir, synthetic, oracle):
    from poe_core.pool import build_pool_from_work

    # The operator's classifier lists its classes in another order than the data set.
    order = [5, 3, 1, 0, 2, 4]

    class Permuted(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[:, order]

    wrn = load_wrn(work_dir, "oracle", 6)
    _export_onnx(Permuted(wrn), tmp_path / "theirs.onnx")
    (tmp_path / "classes.txt").write_text("\n".join(synthetic.taxonomy.classes[i] for i in order))
    work = tmp_path / "work"
    plan = replace(tiny_plan(epochs=2), bank=ViewRecipe(views=2),
                   oracle=ExternalOracle(tmp_path / "theirs.onnx", tmp_path / "classes.txt"))
    for phase in ("oracle", "library", "experts"):
        run_phase(phase, work, synthetic, plan)
    assert phase_info(work, "oracle")["kind"] == "onnx"
    onnx_oracle = load_oracle(work, synthetic, CPU)
    x = synthetic.val.x[:8]
    torch.testing.assert_close(onnx_oracle.logits(x), oracle.logits(x), atol=1e-4, rtol=1e-4)
    pool = build_pool_from_work(work, tmp_path / "pool", synthetic)
    assert pool.composite_accuracy(["task0", "task1", "task2"]) > 1 / 6


def test_onnx_files_that_are_not_classifiers_over_the_classes_are_refused(tmp_path, work_dir, synthetic):
    wrn = load_wrn(work_dir, "oracle", 6)
    _export_onnx(wrn, tmp_path / "six.onnx")
    (tmp_path / "five.txt").write_text("\n".join(synthetic.taxonomy.classes[:5]))
    (tmp_path / "other.txt").write_text("\n".join([*synthetic.taxonomy.classes[:5], "zebra"]))
    (tmp_path / "seven.txt").write_text("\n".join([*synthetic.taxonomy.classes, "zebra"]))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    cases = {
        ("six.onnx", "five.txt"): "lacks 1 class",
        ("six.onnx", "other.txt"): "lacks 1 class",
        ("six.onnx", "seven.txt"): r"outputs shape \[2, 6\]",
        ("junk.onnx", None): "not an ONNX model",
        ("missing.onnx", None): "does not exist",
    }
    for (model, classes), message in cases.items():
        ext = ExternalOracle(tmp_path / model, tmp_path / classes if classes else None)
        plan = replace(tiny_plan(), oracle=ext)
        with pytest.raises(OracleError, match=message):
            run_phase("oracle", tmp_path / f"w-{model}-{classes}", synthetic, plan)


def test_cli_refuses_a_bad_oracle_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from poe_core.cli import app

    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    result = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "w"), "--data", "synthetic",
                                      "--oracle", str(tmp_path / "junk.onnx")])
    assert result.exit_code == 2
    assert "not an ONNX model" in result.output and "Traceback" not in result.output


def test_a_short_run_trains_instead_of_dividing_by_zero(tmp_path):
    from typer.testing import CliRunner

    from poe_core.cli import app

    result = CliRunner().invoke(app, [
        "extract", "--work", str(tmp_path / "w"), "--data", "synthetic", "--oracle-arch", "10,1,1",
        "--library-arch", "10,1,1", "--expert-arch", "10,1,0.25", "--oracle-epochs", "2",
        "--library-epochs", "2", "--expert-epochs", "2", "--bank-views", "2", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "experts.json").is_file()


def test_normalisation_is_the_training_images_and_travels_with_the_oracle(tmp_path, work_dir, synthetic):
    assert (synthetic.mean, synthetic.std) == channel_stats(synthetic.train.x)
    info = phase_info(work_dir, "oracle")
    assert info["normalization"] == {"mean": list(synthetic.mean), "std": list(synthetic.std)}
    # The same oracle brought to a data set with other statistics keeps its own.
    brighter = make_synthetic(seed=3)
    assert brighter.mean != synthetic.mean
    plan = replace(tiny_plan(), oracle=ExternalOracle(work_dir / "oracle.safetensors"))
    run_phase("oracle", tmp_path / "w", brighter, plan)
    kept = load_oracle(tmp_path / "w", brighter, CPU)
    assert (kept.mean, kept.std) == (synthetic.mean, synthetic.std)
    with pytest.raises(OracleError, match="another normalisation"):  # run live it would see other inputs
        run_phase("library", tmp_path / "w", brighter, replace(plan, bank=None))
    norm = Normalize(synthetic.mean, synthetic.std, CPU)
    wrn = load_wrn(work_dir, "oracle", 6)
    with torch.no_grad():
        torch.testing.assert_close(kept.logits(brighter.val.x), wrn(norm(brighter.val.x)), atol=1e-4, rtol=1e-4)


def test_precision_follows_the_cpu(monkeypatch):
    poe_device.resolve_precision.cache_clear()
    monkeypatch.setattr(poe_device, "cpu_has_fast_bf16", lambda: False)
    assert poe_device.resolve_precision("auto", "cpu") == "fp32"
    poe_device.resolve_precision.cache_clear()
    monkeypatch.setattr(poe_device, "cpu_has_fast_bf16", lambda: True)
    assert poe_device.resolve_precision("auto", "cpu") == "bf16"
    assert poe_device.resolve_precision("auto", "cuda") == "fp16"
    assert poe_device.resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        poe_device.resolve_precision("int4", "cpu")
    poe_device.resolve_precision.cache_clear()


def test_this_machine_reports_its_cpu_and_bf16_capability():
    summary = poe_device.machine_summary(CPU)
    amx = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert summary["native_bf16"] == amx and summary["cpu"] and summary["cores"] >= 1


def test_oracle_module_wrapper_normalises_like_training(work_dir, synthetic):
    wrn = load_wrn(work_dir, "oracle", 6)
    wrapped = from_module(wrn, synthetic.taxonomy.classes, synthetic.mean, synthetic.std, "x")
    norm = Normalize(synthetic.mean, synthetic.std, CPU)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.logits(synthetic.val.x), wrn(norm(synthetic.val.x)))


def test_oracle_runs_a_large_batch_in_cpu_sized_pieces_with_the_same_logits(monkeypatch, work_dir, synthetic):
    from poe_core import oracle as oracle_module
    wrn = load_wrn(work_dir, "oracle", 6)
    wrapped = from_module(wrn, synthetic.taxonomy.classes, synthetic.mean, synthetic.std, "x")
    x = synthetic.train.x[:23]
    monkeypatch.setattr(oracle_module, "CPU_BATCH", 5)
    pieces = wrapped.logits(x)
    with torch.no_grad():
        whole = wrn(Normalize(synthetic.mean, synthetic.std, CPU)(x))
    assert pieces.shape == (23, 6)
    torch.testing.assert_close(pieces, whole, atol=1e-4, rtol=1e-4)
