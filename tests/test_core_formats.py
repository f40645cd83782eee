import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from poe_core.assemble import Assembler, FormatUnavailable
from poe_core.build import build_pool_from_work, composite_samples, normalised
from poe_core.evaluate import task_specific_accuracy
from poe_core.formats import to_ort

ALL_TASKS = ["task2", "task0", "task1"]


def _run(model_bytes, x):
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def assembler(pool):
    return Assembler(pool)


@pytest.fixture(scope="module")
def val_input(pool, synthetic):
    return normalised(synthetic.val, pool.mean, pool.std)


@pytest.mark.parametrize("weights", ["fp16", "int8"])
def test_every_format_loads_in_onnxruntime_and_agrees_with_fp32(assembler, val_input, weights):
    fp32 = _run(assembler.assemble(ALL_TASKS).data, val_input)
    model = assembler.assemble(ALL_TASKS, weights=weights)
    proto = onnx.load_from_string(model.data)
    onnx.checker.check_model(proto, full_check=True)
    assert {p.key: p.value for p in proto.metadata_props}["poe.weights"] == weights == model.weights
    got = _run(model.data, val_input)
    agreement = (got.argmax(1) == fp32.argmax(1)).mean()
    if weights == "fp16":
        assert agreement >= 0.99
        assert np.abs(got - fp32).max() < 0.05
    else:
        # 24 validation images and barely trained experts, whose top-1 is often a near
        # tie: allow two flips from 8-bit activations (none seen on x86 with AVX-512).
        assert agreement >= 0.9


def test_int8_model_is_quantized_and_smaller(assembler):
    fp32, int8 = assembler.assemble(ALL_TASKS), assembler.assemble(ALL_TASKS, weights="int8")
    graph = onnx.load_from_string(int8.data).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    conv_weights = [t for t in graph.initializer if t.name.endswith(".weight_quantized")]
    assert conv_weights and all(t.data_type == onnx.TensorProto.INT8 for t in conv_weights)
    assert len(int8.data) < len(fp32.data)


@pytest.mark.parametrize("weights", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("tasks", [["task1"], ["task2", "task0"], ALL_TASKS])
def test_cached_accuracy_of_every_format_equals_onnxruntime(pool, assembler, synthetic, weights, tasks):
    classes = pool.taxonomy.composite_classes(tasks)
    val = synthetic.val.of_classes(classes)
    logits = _run(assembler.assemble(tasks, weights=weights).data, normalised(val, pool.mean, pool.std))
    assert pool.composite_accuracy(tasks, weights=weights) == task_specific_accuracy(
        torch.from_numpy(logits), val.y, classes)


def test_int8_logits_are_those_of_the_assembled_model(pool, assembler, val_input):
    """Parts quantized separately and merged compute exactly what the parts compute."""
    got = _run(assembler.assemble(["task0", "task2"], weights="int8").data, val_input)
    want = torch.cat([pool.logits("int8")["task0"], pool.logits("int8")["task2"]], 1).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_manifest_records_every_format(pool):
    formats = pool.manifest["formats"]
    assert set(formats) == {"fp32", "fp16", "int8"}
    int8 = formats["int8"]
    assert int8["calibration_images"] == min(256, pool.manifest["dataset"]["train_images"])
    drop = int8["val_acc_drop"]
    assert drop["n_tasks"] == 3 and drop["composite_tasks"] == 1
    assert drop["mean"] <= drop["max"]
    assert int8["available"] == (drop["mean"] <= int8["max_mean_drop"]) and int8["max_mean_drop"] == 0.01
    assert abs(formats["fp16"]["val_acc_drop"]["mean"]) < 0.05
    for expert in pool.spec.experts.values():
        for part in expert.widths.values():
            assert 0 <= part.files("int8").val_acc <= 1
            assert 0 <= part.files("fp16").val_acc <= 1
            assert {part.files("int8").onnx, part.files("int8").logits} <= set(pool.spec.files)
    assert pool.spec.library.files("int8").onnx in pool.spec.files


def test_composite_samples_are_all_combinations_or_a_fixed_sample():
    assert composite_samples(["a", "b", "c", "d"], 2) == [("a", "b"), ("a", "c"), ("a", "d"),
                                                          ("b", "c"), ("b", "d"), ("c", "d")]
    tasks = [f"t{i:02d}" for i in range(20)]
    sample = composite_samples(tasks, 5)
    assert len(sample) == len(set(sample)) == 200 < math.comb(20, 5)
    assert sample == composite_samples(tasks, 5) and all(len(set(q)) == 5 for q in sample)


@pytest.fixture(scope="module")
def strict_pool(tmp_path_factory, work_dir, synthetic):
    """The same experts, with an int8 budget no quantization can meet."""
    return build_pool_from_work(work_dir, tmp_path_factory.mktemp("strict") / "pool", synthetic,
                                int8_max_mean_drop=-1.0)


def test_refused_int8_is_a_clear_error(strict_pool):
    info = strict_pool.manifest["formats"]["int8"]
    assert info["available"] is False
    assert "validation accuracy on average" in info["reason"] and "-100.00% allowed" in info["reason"]
    asm = Assembler(strict_pool)
    with pytest.raises(FormatUnavailable, match=f"int8 is not available for pool {strict_pool.pool_id}: int8 loses"):
        asm.assemble(["task0", "task1"], weights="int8")
    with pytest.raises(ValueError, match="not available"):
        strict_pool.composite_accuracy(["task0"], weights="int8")
    assert asm.assemble(["task0", "task1"], weights="fp16").weights == "fp16"
    assert strict_pool.composite_accuracy(["task0"], weights="fp16") >= 0


def test_unknown_format_is_a_value_error(pool, assembler):
    with pytest.raises(ValueError, match="use fp32, fp16, int8"):
        assembler.assemble(["task0"], weights="int4")
    with pytest.raises(ValueError, match="unknown weight format"):
        pool.composite_accuracy(["task0"], weights="bf16")


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_ort_format_round_trip(assembler, val_input, weights):
    model = assembler.assemble(["task1", "task2"], softmax=True, weights=weights)
    data = to_ort(model.data)
    assert data[4:8] == b"ORTM"
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["probabilities"]
    assert json.loads(sess.get_modelmeta().custom_metadata_map["poe.labels"]) == list(model.labels)
    np.testing.assert_allclose(sess.run(None, {"input": val_input})[0], _run(model.data, val_input), atol=1e-5)
