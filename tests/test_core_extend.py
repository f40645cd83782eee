"""poe_core.extend: a pool extended with a custom primitive task, its other parts untouched."""

import json

import pytest
import torch
from typer.testing import CliRunner

from poe_core.bank import ViewRecipe, build_features
from poe_core.cli import app
from poe_core.data import Normalize, make_synthetic
from poe_core.extend import ExtensionError, add_task, check_data, cold_images, default_config, find_bank, kept_oracle
from poe_core.files import sha256_file
from poe_core.pool import load_pool
from poe_core.recipe import TASK_EPOCHS, TrainConfig

CPU = torch.device("cpu")
TINY = TrainConfig(epochs=2, batch_size=16, lr=0.05, precision="fp32", device="cpu")


def _hashes(root):
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in root.rglob("*") if p.is_file()}


def test_a_task_is_added_beside_byte_identical_parts_from_the_pools_bank(pool, work_dir, synthetic, tmp_path):
    before = _hashes(pool.root)
    job = tmp_path / "job"
    # The pool's library features of its bank's views, as an expert phase of more epochs
    # than views leaves them: the new expert reads them instead of running the library.
    bank = find_bank(pool, kept_oracle(pool, CPU), synthetic, ViewRecipe(8), [work_dir], CPU)[0]
    build_features(pool.library, bank, synthetic.train, work_dir, device=CPU,
                   normalize=Normalize(synthetic.mean, synthetic.std, CPU))
    new = add_task(load_pool(pool.root), tmp_path / "new", synthetic, "mixed", ["class2_0", "class0_1"],
                   work=job, cfg=TINY, bank_dirs=[work_dir])
    assert _hashes(pool.root) == before  # the old bundle is not touched
    assert new.tasks == [*pool.tasks, "mixed"] and new.pool_id != pool.pool_id
    assert new.taxonomy.class_names("mixed") == ["class2_0", "class0_1"]
    assert {rel: new.spec.files[rel] for rel in pool.spec.files} == pool.spec.files
    added = new.spec.training["added_tasks"][-1]
    # The bank the pool's experts learned from was found and checked against the kept
    # oracle, so no oracle ran over the training images here.
    assert added["teacher"] == "logit bank" and added["bank"]["key"] == pool.spec.training["experts"]["bank"]["key"]
    assert not list(job.glob("bank-*")) and added["bank"]["library_features"]
    for fmt in ("fp32", "fp16", "int8"):
        q = new.query(["mixed"])
        assert new.part("mixed").files(fmt).val_acc == pytest.approx(new.accuracy(q, fmt))
    assert new.composite_accuracy(["mixed", "task1"]) >= 0
    with pytest.raises(ValueError, match="share class 'class0_1'"):
        new.query(["mixed", "task0"])
    # A class query picks the owner that does not overlap the tasks already chosen.
    assert new.query(["mixed"], ["class1_0"]).tasks == ("mixed", "task1")


def test_a_cold_bank_covers_the_tasks_images_and_a_sample_of_each_other_class(synthetic):
    train, task = synthetic.train, [0, 3]
    keep = cold_images(train, task, 5, seed=1)
    assert torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep)
    counts = torch.bincount(train.y[keep], minlength=6)
    assert counts.tolist() == [int((train.y == c).sum()) if c in task else 5 for c in range(6)]
    assert torch.equal(keep, cold_images(train, task, 5, seed=1))
    assert not torch.equal(keep, cold_images(train, task, 5, seed=2))  # another seed, another sample
    assert len(cold_images(train, task, 10**6)) == len(train)  # more than a class has: all of it


def test_a_task_with_no_bank_to_reuse_fills_one_over_its_images_and_a_sample(pool, synthetic, tmp_path):
    job = tmp_path / "job"
    new = add_task(load_pool(pool.root), tmp_path / "new", synthetic, "odd", ["class1_1", "class2_0"],
                   work=job, cfg=TINY, views=2, others_per_class=3)
    added = new.spec.training["added_tasks"][-1]
    keep = cold_images(synthetic.train, new.taxonomy.tasks["odd"], 3)
    assert added["bank"]["images"] == len(keep) == int(torch.isin(
        synthetic.train.y, torch.tensor(new.taxonomy.tasks["odd"])).sum()) + 4 * 3
    assert added["bank"]["others_per_class"] == 3 and added["bank"]["views"] == 2
    # As many steps as the pool's recipe over every image: more epochs over fewer images.
    assert added["epochs"] == -(-TINY.epochs * len(synthetic.train) // len(keep))
    (bank,) = job.glob("bank-*")
    assert json.loads((bank / "state.json").read_text())["images"] == len(keep)
    assert new.part("odd").files("fp32").val_acc == pytest.approx(new.accuracy(new.query(["odd"]), "fp32"))


def test_a_task_takes_the_pools_recipe_for_at_most_task_epochs(pool):
    ours = load_pool(pool.root)
    recipe = ours.spec.training["experts"]["config"]
    assert default_config(ours).epochs == recipe["epochs"] < TASK_EPOCHS
    assert default_config(ours).lr == recipe["lr"]
    recipe["epochs"] = TASK_EPOCHS + 12  # a pool whose experts trained longer offline
    assert default_config(ours).epochs == TASK_EPOCHS


def test_the_data_must_be_the_pools(pool):
    other = make_synthetic(seed=1)
    with pytest.raises(ExtensionError, match="validation images given are not those"):
        check_data(pool, other)
    with pytest.raises(ExtensionError, match="training images"):
        check_data(pool, make_synthetic(per_class=20))


def test_poe_add_task_writes_the_extended_pool(pool, tmp_path):
    out = tmp_path / "pool"
    args = ["add-task", "--pool", str(pool.root), "--out", str(out), "--work", str(tmp_path / "work"),
            "--data", "synthetic", "--name", "pair", "--epochs", "1", "--bank-views", "1", "--precision", "fp32",
            "--device", "cpu", "-c", "class1_0,class2_1"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert load_pool(out).taxonomy.class_names("pair") == ["class1_0", "class2_1"]
    r = CliRunner().invoke(app, args[:-1] + ["class1_0,zebra"])
    assert r.exit_code == 2 and "unknown class(es): 'zebra'" in r.output
