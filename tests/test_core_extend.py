"""poe_core.extend: a pool extended with a custom primitive task, its other parts untouched."""

import pytest
import torch
from typer.testing import CliRunner

from poe_core.bank import ViewRecipe, build_features
from poe_core.cli import app
from poe_core.data import Normalize, make_synthetic
from poe_core.extend import ExtensionError, add_task, check_data, find_bank, kept_oracle
from poe_core.files import sha256_file
from poe_core.pool import load_pool
from poe_core.recipe import TrainConfig

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
