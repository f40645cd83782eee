import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from poe_core.files import atomic_write, sha256_file
from poe_core.manifest import FORMAT_VERSION, ManifestError, parse_manifest, pool_id
from poe_core.pool import PoolError, load_pool


def test_reading_a_pool_and_assembling_imports_no_training(pool):
    code = (
        "import sys\n"
        "from poe_core.assemble import Assembler\n"
        "from poe_core.pool import load_pool\n"
        f"pool = load_pool({str(pool.root)!r})\n"
        "q = pool.query(['task0'], ['class1_0'])\n"
        "Assembler(pool).assemble(q, reject=pool.reject_rule(q), reject_output=True)\n"
        "print(sorted(m for m in sys.modules if m.startswith('poe_core')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.replace("'", '"'))
    assert "poe_core.pool" in loaded and "poe_core.assemble" in loaded
    assert not {"poe_core.train", "poe_core.extract", "poe_core.build"} & set(loaded)


def test_written_manifest_is_the_current_version_and_hashes_to_its_id(pool):
    raw = json.loads((pool.root / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 3
    assert raw["pool_id"] == pool_id(raw) == pool.pool_id
    assert parse_manifest(raw) == pool.spec


@pytest.mark.parametrize("version", [1, 4, None])
def test_unknown_format_version_is_a_clear_error(pool, tmp_path, version):
    copy = shutil.copytree(pool.root, tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    raw["format_version"] = version
    raw["pool_id"] = pool_id(raw)
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(PoolError, match=f"pool format {version!r} is not supported .*reads formats 2, 3"):
        load_pool(copy)
    with pytest.raises(ManifestError):
        parse_manifest(raw)


def test_a_kept_oracle_is_labelled_poe_and_old_pools_labels_still_read(pool, tmp_path):
    assert json.loads((pool.root / "manifest.json").read_text())["oracle"]["format"] == "poe"
    copy = shutil.copytree(pool.root, tmp_path / "copy")
    raw = json.loads((copy / "manifest.json").read_text())
    raw["oracle"]["format"] = "poe-wrn"  # as written before MobileNetV2 oracles existed
    raw["pool_id"] = pool_id(raw)
    (copy / "manifest.json").write_text(json.dumps(raw))
    old = load_pool(copy)
    assert old.spec.oracle.format == "poe" and old.pool_id == raw["pool_id"]
    raw["oracle"]["format"] = "resnet"
    with pytest.raises(ManifestError, match="format"):
        parse_manifest(raw)


def test_a_manifest_missing_a_field_names_it(pool):
    raw = json.loads((pool.root / "manifest.json").read_text())
    del raw["experts"]["task0"]["widths"]
    with pytest.raises(ManifestError, match="widths"):
        parse_manifest(raw)


def test_every_part_states_its_files_per_format(pool):
    for part in [pool.spec.library, pool.spec.student, *(p for e in pool.spec.experts.values()
                                                         for p in e.widths.values())]:
        for weights in ("fp32", "int8"):
            assert part.files(weights).onnx in pool.spec.files
        assert part.files("fp16").onnx is None  # derived from fp32 by the Assembler
    assert pool.spec.student.files("fp16").logits in pool.spec.files


def test_sha256_file_and_atomic_write(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write(target, b"one")
    atomic_write(target, "two")
    assert target.read_bytes() == b"two"
    assert sha256_file(target) == hashlib.sha256(b"two").hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]  # no temporary left behind
    assert target.stat().st_mode & 0o777 == 0o644
