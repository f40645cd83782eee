import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from photo_folders import WORDS
from typer.testing import CliRunner

from poe_core.cli import app
from poe_core.data import load_photo


def test_query_json_summary_states_the_delivered_model(pool, tmp_path):
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(app, ["query", "--pool", str(pool.root), "-t", "task2", "-c", "class0_1",
                                 "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    q = pool.query(["task2"], ["class0_1"])
    assert summary["labels"] == ["class2_0", "class2_1", "class0_1"] and summary["tasks"] == ["task2", "task0"]
    assert summary["val_acc"] == pool.accuracy(q) and summary["params"] == pool.params(q)
    assert summary["bytes"] == out.stat().st_size
    assert summary["reject"] == pool.reject_rule(q).to_dict()


def test_query_summary_is_one_line_when_not_on_a_terminal(pool, tmp_path):
    r = CliRunner().invoke(app, ["query", "--pool", str(pool.root), "-t", "task0", "task1", "task2",
                                 "-o", str(tmp_path / "m.onnx"), "--method", "mask"])
    assert r.exit_code == 0, r.output
    line = r.stderr.strip()
    assert len(line) > 120 and "\n" not in line and "(mask)" in line


def test_eval_json(pool):
    r = CliRunner().invoke(app, ["eval", "--pool", str(pool.root), "-t", "task1", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pool.composite_accuracy(["task1"])



def _class_name(wnid: str) -> str:
    """A class's name in a pool of tests/photo_folders.py's photos: its first lemma."""
    return WORDS[wnid].split(",")[0].replace(" ", "_")


def _test_photos(folder: Path) -> list[tuple[Path, str]]:
    """Tiny-ImageNet's test photos (val/images/, labelled in val_annotations.txt), with class names."""
    rows = [line.split("\t")[:2] for line in (folder / "val" / "val_annotations.txt").read_text().splitlines()]
    return [(folder / "val" / "images" / photo, _class_name(wnid)) for photo, wnid in rows]


def _photo_test_accuracy(pool, tasks: list[str]) -> float:
    """The pool's branched model on its folder's test photos of the tasks' classes, at the
    pool's input: their top-1 accuracy."""
    labels = [c for t in tasks for c in pool.taxonomy.class_names(t)]
    photos = [(photo, labels.index(name)) for photo, name in _test_photos(pool.root.parent / "tiny-imagenet")
              if name in labels]
    size, resize = pool.image_shape[-1], pool.spec.dataset.preprocess["resize_shorter_side"]
    x = np.stack([load_photo(photo, size, resize) for photo, _ in photos]).astype(np.float32)
    mean, std = (np.array(v, np.float32).reshape(1, 3, 1, 1) for v in (pool.mean, pool.std))
    with torch.no_grad():
        logits = pool.branched_model(tasks)(torch.from_numpy((x / 255 - mean) / std)).numpy()
    assert len(photos) == 2 * len(labels)
    return float((logits.argmax(1) == np.array([label for _, label in photos])).mean())


@pytest.mark.parametrize("tasks", [["bird", "feline"], ["canine"], ["feline", "canine", "bird"]])
def test_eval_on_the_test_photos_of_an_image_folder(photo_pool_64, tasks, tmp_path):
    """--split test on a pool of photos: its folder's test photos, loaded at the pool's
    input and labelled through the hierarchy it was built from (WordNet ids), or by the
    pool's class names when the folders are named so; without the hierarchy, WordNet
    folders are a clear error."""
    pool, _ = photo_pool_64
    folder = pool.root.parent / "tiny-imagenet"
    expected = _photo_test_accuracy(pool, tasks)
    base = ["eval", "--pool", str(pool.root), "-t", ",".join(tasks), "--split", "test", "--data", "image-folder",
            "--json"]
    hierarchy = pool.root.parent / "groups.json"
    r = CliRunner().invoke(app, [*base, "--data-path", str(folder), "--hierarchy", str(hierarchy)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(expected)

    r = CliRunner().invoke(app, [*base, "--data-path", str(folder)])
    assert r.exit_code == 2 and "--hierarchy" in r.output

    # The same photos in test/<class name>/ folders need no hierarchy.
    named = tmp_path / "named"
    for photo, name in _test_photos(folder):
        (named / "test" / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, named / "test" / name)
    r = CliRunner().invoke(app, [*base, "--data-path", str(named)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(expected)


def test_an_oracle_trained_on_validation_reports_no_validation_accuracy(tmp_path):
    tiny = ["--data", "synthetic", "--oracle-arch", "10,1,1", "--oracle-epochs", "1", "--batch-size", "16",
            "--precision", "fp32", "--device", "cpu"]
    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path), *tiny, "--phase", "oracle", "--oracle-with-val"])
    assert r.exit_code == 0, r.output
    assert "oracle: no validation accuracy (trained on the validation images too)" in r.output
    assert "-100" not in r.output


def test_a_phase_before_the_phases_it_needs_is_a_clear_error(tmp_path):
    tiny = ["--data", "synthetic", "--precision", "fp32", "--device", "cpu"]
    for phase, needed in (("library", "oracle"), ("experts", "oracle")):
        r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / phase), *tiny, "--phase", phase])
        assert r.exit_code != 0
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        assert f"the {phase} phase needs a finished {needed} phase" in r.output
        assert "Traceback" not in r.output
        assert not list((tmp_path / phase).glob("*.json"))  # nothing trained


def test_experts_retrained_on_a_pools_own_oracle_and_library(pool, tmp_path):
    """--from-pool: the pool's kept oracle and library (with its student head) become the
    finished phases of a new work directory; only the experts train (here cut from the
    student); the new pool has the same library and student, bit for bit."""
    from poe_core.pool import load_pool

    tiny = ["--data", "synthetic", "--batch-size", "16", "--precision", "fp32", "--device", "cpu",
            "--expert-arch", "10,0.5,0.25", "--expert-epochs", "1", "--bank-views", "2"]
    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "w"), *tiny, "--from-pool", str(pool.root),
                                 "--phase", "experts", "--expert-init", "student", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "oracle, library taken from pool" in r.output
    new = load_pool(tmp_path / "p")
    for name, value in pool.library.state_dict().items():
        assert torch.equal(new.library.state_dict()[name], value)
    for name, value in pool.student_head().state_dict().items():
        assert torch.equal(new.student_head().state_dict()[name], value)
    assert new.spec.training["experts"]["config"]["init"] == "student"
    assert new.spec.training["library"]["seeded_from_pool"] == pool.pool_id
    assert new.path(new.spec.oracle.weights).read_bytes() == pool.path(pool.spec.oracle.weights).read_bytes()
    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "w2"), *tiny, "--from-pool", str(pool.root),
                                 "--oracle", str(pool.path(pool.spec.oracle.weights))])
    assert r.exit_code != 0 and "leave out --oracle" in r.output


def test_a_pools_library_trained_further(pool, tmp_path):
    """--continue-library: the library phase starts from the pool's library and student
    head instead of random weights (here with a learning rate too small to move them, so
    the trained weights are the pool's), and its record says whose it continued."""
    from poe_core.extract import load_wrn, phase_info
    from poe_core.nets import spec_from_dict
    from poe_core.pool import load_pool
    from poe_core.recipe import Architecture

    arch = Architecture.of(spec_from_dict(pool.spec.training["library"]["architecture"])).text()
    tiny = ["--data", "synthetic", "--batch-size", "16", "--precision", "fp32", "--device", "cpu",
            "--library-arch", arch, "--library-epochs", "1", "--bank-views", "2", "--phase", "library"]
    work = tmp_path / "w"
    r = CliRunner().invoke(app, ["extract", "--work", str(work), *tiny, "--from-pool", str(pool.root),
                                 "--continue-library", "--library-lr", "1e-9"])
    assert r.exit_code == 0, r.output
    assert "oracle, library start taken from pool" in r.output
    record = phase_info(work, "library")["continued_from"]
    assert phase_info(work, "library")["config"]["init"] == "continued"
    assert record["pool"] == pool.pool_id and record["epochs"] == pool.spec.training["library"]["epochs"]
    trained = load_wrn(work, "library", len(pool.taxonomy.classes)).library.state_dict()
    weights = {k: v for k, v in pool.library.state_dict().items() if k.endswith("weight")}
    assert weights and all(torch.allclose(trained[k], v, atol=1e-5) for k, v in weights.items())

    # Without it the library trains from random weights, far from the pool's.
    (tmp_path / "fresh").mkdir()
    for name in ("oracle.json", "oracle.safetensors"):
        shutil.copy(work / name, tmp_path / "fresh" / name)
    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "fresh"), *tiny, "--library-lr", "1e-9"])
    assert r.exit_code == 0, r.output
    fresh = load_wrn(tmp_path / "fresh", "library", len(pool.taxonomy.classes)).library.state_dict()
    assert "continued_from" not in phase_info(tmp_path / "fresh", "library")
    assert phase_info(tmp_path / "fresh", "library")["config"]["init"] == "random"
    assert not all(torch.allclose(fresh[k], v, atol=1e-5) for k, v in weights.items())
    assert load_pool(pool.root).pool_id == pool.pool_id  # the pool itself is untouched

    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "w2"), *tiny, "--continue-library"])
    assert r.exit_code != 0 and "give the pool with --from-pool" in r.output
    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "w3"), *tiny, "--from-pool", str(pool.root),
                                 "--continue-library", "--keep-pool-widths"])
    assert r.exit_code != 0 and "not a library trained further" in r.output


def test_one_width_retrained_the_pools_other_widths_kept(wide_pool, tmp_path):
    """--keep-pool-widths: experts retrained at width 0.25 only (another recipe); the new
    pool holds them and the old pool's experts at 0.5, bit for bit, and says so."""
    from poe_core.pool import load_pool

    tiny = ["--data", "synthetic", "--batch-size", "16", "--precision", "fp32", "--device", "cpu",
            "--expert-arch", "10,0.5,0.25", "--expert-widths", "0.25", "--expert-epochs", "1", "--bank-views", "2",
            "--phase", "experts", "--expert-lr", "0.01"]
    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "w"), *tiny, "--from-pool", str(wide_pool.root),
                                 "--keep-pool-widths", "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "experts at width(s) 0.5 kept from pool" in r.output
    new = load_pool(tmp_path / "p")
    assert new.widths == [0.25, 0.5]
    kept = new.spec.training["experts"]["kept_from_pool"]
    assert kept["pool"] == wide_pool.pool_id and kept["widths"] == [0.5]
    assert new.spec.training["experts"]["config"]["lr"] == 0.01 != kept["config"]["lr"]
    for task in wide_pool.tasks:
        old, ours = wide_pool.expert(task, 0.5).state_dict(), new.expert(task, 0.5).state_dict()
        assert all(torch.equal(ours[k], v) for k, v in old.items())
        assert new.part(task, 0.5).val_acc == pytest.approx(wide_pool.part(task, 0.5).val_acc)
        retrained = new.expert(task, 0.25).state_dict()
        assert any(not torch.equal(retrained[k], v) for k, v in wide_pool.expert(task, 0.25).state_dict().items())
    r = CliRunner().invoke(app, ["extract", "--work", str(tmp_path / "w2"), *tiny, "--keep-pool-widths"])
    assert r.exit_code != 0 and "give the pool with --from-pool" in r.output
    # Another pool's library: its experts do not fit this work directory's.
    from poe_core.extract import keep_pool_widths
    from poe_core.oracle import OracleError
    with pytest.raises(OracleError, match="not that of pool"):
        keep_pool_widths(tmp_path / "w", new)
