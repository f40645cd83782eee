import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from poe_core.assemble import Assembler
from poe_core.evaluate import composite_accuracy, task_specific_accuracy
from poe_core.pool import PoolError, load_pool

TASK_LISTS = [["task0"], ["task2", "task0"], ["task1", "task2", "task0"]]


def _session(model_bytes):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def _normalised(images, pool):
    x = images.x.numpy().astype(np.float32) / 255
    mean = np.asarray(pool.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(pool.std, np.float32).reshape(1, -1, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("tasks", TASK_LISTS)
def test_assembled_onnx_equals_the_pytorch_branched_model(pool, synthetic, tasks):
    model = Assembler(pool).assemble(tasks)
    onnx.checker.check_model(onnx.load_from_string(model.data), full_check=True)
    x = _normalised(synthetic.test, pool)
    got = _session(model.data).run(None, {"input": x})[0]
    with torch.no_grad():
        want = pool.branched_model(tasks)(torch.from_numpy(x)).numpy()
    assert got.shape == (len(x), 2 * len(tasks))
    assert np.abs(got - want).max() <= 1e-4


def test_metadata_names_labels_tasks_and_preprocessing(pool):
    model = Assembler(pool, pool_version="7").assemble(["task2", "task0"], softmax=True)
    meta = {p.key: p.value for p in onnx.load_from_string(model.data).metadata_props}
    assert json.loads(meta["poe.labels"]) == ["class2_0", "class2_1", "class0_0", "class0_1"]
    assert json.loads(meta["poe.tasks"]) == ["task2", "task0"]
    assert json.loads(meta["poe.mean"]) == pool.mean
    assert meta["poe.pool_id"] == pool.pool_id and meta["poe.pool_version"] == "7"
    assert meta["poe.output"] == "probabilities"
    probs = _session(model.data).run(None, {"input": np.zeros((3, 3, 16, 16), np.float32)})[0]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_batch_dimension_is_dynamic(pool):
    sess = _session(Assembler(pool).assemble(["task1"]).data)
    for n in (1, 7):
        assert sess.run(None, {"input": np.zeros((n, 3, 16, 16), np.float32)})[0].shape == (n, 2)


def test_same_request_gives_identical_bytes(pool):
    a, b = Assembler(pool), Assembler(pool)
    assert a.assemble(["task1", "task0"]).data == b.assemble(["task1", "task0"]).data
    assert a.assemble(["task1", "task0"]).data != a.assemble(["task0", "task1"]).data


def test_fp16_weights_halve_the_size_and_agree(pool, synthetic):
    asm = Assembler(pool)
    fp32, fp16 = asm.assemble(["task0", "task1"]), asm.assemble(["task0", "task1"], weights="fp16")
    assert _weight_bytes(fp16.data) * 2 == _weight_bytes(fp32.data)
    assert len(fp16.data) < 0.7 * len(fp32.data)
    x = _normalised(synthetic.test, pool)
    a = _session(fp32.data).run(None, {"input": x})[0]
    b = _session(fp16.data).run(None, {"input": x})[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    assert np.abs(a - b).max() < 0.05


def test_composite_accuracy_from_cached_logits_equals_onnxruntime(pool, synthetic):
    tasks = ["task2", "task0"]
    classes = pool.taxonomy.composite_classes(tasks)
    val = synthetic.val.of_classes(classes)
    logits = _session(Assembler(pool).assemble(tasks).data).run(None, {"input": _normalised(val, pool)})[0]
    from_onnx = task_specific_accuracy(torch.from_numpy(logits), val.y, classes)
    assert pool.composite_accuracy(tasks) == from_onnx
    assert composite_accuracy(pool.val_logits, pool.val_labels, pool.taxonomy, tasks) == from_onnx


def test_manifest_records_training_and_sizes(pool):
    m = pool.spec
    assert m.format_version == 3
    assert set(m.training) == {"oracle", "library", "experts"}
    assert m.training["oracle"]["epochs"] == 3
    assert set(m.experts) == {"task0", "task1", "task2"}
    assert all(e.at().params > 0 and 0 <= e.at().val_acc <= 1 for e in m.experts.values())
    assert m.student is not None and m.student.params > m.experts["task0"].at().params



def test_the_pool_keeps_its_oracle_but_never_delivers_it(pool, work_dir, synthetic):
    from safetensors.torch import load_file

    from poe_core.extract import load_wrn
    from poe_core.oracle import load_poe_oracle

    m = pool.spec
    assert m.oracle is not None and m.oracle.format == "poe"
    assert m.oracle.classes == list(synthetic.taxonomy.classes)
    assert m.oracle.normalization.mean == list(synthetic.mean) and m.oracle.weights in m.files
    kept = load_file(str(pool.path(m.oracle.weights)))
    trained = load_wrn(work_dir, "oracle", 6).state_dict()
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[m.oracle.dtype]
    for k, v in trained.items():
        assert torch.equal(kept[k], v.to(dtype) if v.is_floating_point() else v)
    # the kept copy is a usable oracle on its own (its figures and normalisation beside it)
    reloaded = load_poe_oracle(pool.path(m.oracle.weights), synthetic.taxonomy.classes, torch.device("cpu"))
    assert reloaded.mean == tuple(synthetic.mean)
    oracle_names = {f"oracle.{k}" for k in kept} | set(kept)
    for tasks in (["task0"], ["task0", "task1", "task2"]):
        delivered = onnx.load_from_string(Assembler(pool).assemble(tasks).data)
        assert _weight_bytes(delivered.SerializeToString()) < sum(v.numel() * 2 for v in kept.values())
        assert not {i.name for i in delivered.graph.initializer} & oracle_names


def _weight_bytes(model_bytes):
    return sum(len(t.raw_data) for t in onnx.load_from_string(model_bytes).graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


@pytest.fixture
def pool_copy(pool, tmp_path):
    return shutil.copytree(pool.root, tmp_path / "copy")


def test_tampered_file_is_a_clear_error(pool_copy):
    part = next((pool_copy / "onnx" / "experts").iterdir())
    data = bytearray(part.read_bytes())
    data[-1] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(PoolError, match=f"{part.name} is corrupt"):
        load_pool(pool_copy)


def test_missing_file_is_a_clear_error(pool_copy):
    (pool_copy / "library.safetensors").unlink()
    with pytest.raises(PoolError, match="library.safetensors is missing"):
        load_pool(pool_copy)


def test_edited_manifest_is_a_clear_error(pool_copy):
    manifest = json.loads((pool_copy / "manifest.json").read_text())
    manifest["experts"]["task0"]["val_acc"] = 1.0
    (pool_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PoolError, match="modified"):
        load_pool(pool_copy)


def test_not_a_pool(tmp_path):
    with pytest.raises(PoolError, match="manifest.json is missing"):
        load_pool(tmp_path)
