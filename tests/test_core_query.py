"""Class-level queries, the mask baseline, expert widths under budgets and the reject
rule: every figure the pool reports equals onnxruntime on the delivered model."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import WIDTHS

from poe_core.assemble import Assembler
from poe_core.budget import Budget, BudgetError, candidates, fit_budget, plan
from poe_core.build import normalised
from poe_core.evaluate import task_specific_accuracy
from poe_core.formats import Unavailable
from poe_core.pool import part_key
from poe_core.reject import auroc, fit_reject, threshold_for
from poe_core.taxonomy import TaskError


@pytest.fixture(scope="module")
def val_x(pool, synthetic):
    return normalised(synthetic.val, pool.mean, pool.std)


def _run(model_bytes, x):
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))


def _meta(model_bytes):
    return {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}


def _onnx_accuracy(model, pool, x):
    logits = _run(model.data, x)["logits"]
    classes = [pool.taxonomy.classes.index(c) for c in model.labels]
    return task_specific_accuracy(torch.from_numpy(logits), pool.val_labels, classes)


# -- class-level queries ------------------------------------------------------------

def test_classes_alone_pick_their_experts_and_output_in_the_order_given(pool, val_x):
    q = pool.query(classes=["class1_1", "class0_0", "class1_0"])
    assert q.tasks == ("task1", "task0")
    model = Assembler(pool).assemble(q)
    assert list(model.labels) == json.loads(_meta(model.data)["poe.labels"]) == ["class1_1", "class0_0", "class1_0"]
    got = _run(model.data, val_x)["logits"]
    assert got.shape == (len(val_x), 3)
    np.testing.assert_allclose(got, pool.query_logits(q).numpy(), atol=1e-5)
    assert "Gather" in {n.op_type for n in onnx.load_from_string(model.data).graph.node}
    assert pool.accuracy(q) == _onnx_accuracy(model, pool, val_x)


@pytest.mark.parametrize("weights", ["fp32", "fp16", "int8"])
def test_tasks_with_extra_classes_accuracy_equals_onnxruntime(pool, val_x, weights):
    q = pool.query(["task2"], ["class0_1"])
    assert q.tasks == ("task2", "task0")
    model = Assembler(pool).assemble(q, weights=weights)
    assert list(model.labels) == ["class2_0", "class2_1", "class0_1"]
    assert pool.accuracy(q, weights) == _onnx_accuracy(model, pool, val_x)


def test_a_plain_task_query_has_no_gather(pool):
    model = Assembler(pool).assemble(pool.query(["task1", "task0"], ["class0_1"]))
    assert "Gather" not in {n.op_type for n in onnx.load_from_string(model.data).graph.node}
    assert model.data == Assembler(pool).assemble(["task1", "task0"]).data


@pytest.mark.parametrize(("tasks", "classes", "message"), [
    ([], ["class0_0", "zebra"], "unknown class.*'zebra'"),
    ([], ["class0_0", "class0_0"], "more than once: class0_0"),
    ([], [], "name at least one primitive task or class"),
    ("task0", [], "not one string"),
    ([], "class0_0", "not one string"),
    (["task9"], ["class0_0"], "unknown primitive task.*'task9'"),
])
def test_bad_class_queries_are_clear_errors(pool, tasks, classes, message):
    with pytest.raises(TaskError, match=message):
        pool.query(tasks, classes)


# -- the mask baseline ----------------------------------------------------------------

@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_mask_delivers_the_student_restricted_to_the_query(pool, val_x, weights):
    q = pool.query(["task2"], ["class0_0"], method="mask")
    model = Assembler(pool).assemble(q, weights=weights)
    graph = onnx.load_from_string(model.data).graph
    assert {n.name.split("/")[0] for n in graph.node} == {"library", "student", "gather"}
    assert _meta(model.data)["poe.method"] == "mask"
    np.testing.assert_allclose(_run(model.data, val_x)["logits"], pool.query_logits(q, weights).numpy(), atol=1e-5)
    assert pool.accuracy(q, weights) == _onnx_accuracy(model, pool, val_x)
    assert pool.mask_accuracy(pool.query(["task2"], ["class0_0"]), weights) == pool.accuracy(q, weights)
    assert pool.params(q) == pool.spec.library.params + pool.spec.student.params


# -- widths and budgets ---------------------------------------------------------------

@pytest.mark.parametrize("weights", ["fp32", "fp16", "int8"])
def test_every_width_is_a_part_and_its_accuracy_equals_onnxruntime(wide_pool, val_x, weights):
    assert wide_pool.widths == list(WIDTHS)
    q = wide_pool.query(["task0", "task2"], widths={"task2": 0.5})
    assert q.widths == (0.25, 0.5)
    model = Assembler(wide_pool).assemble(q, weights=weights)
    assert json.loads(_meta(model.data)["poe.widths"]) == {"task0": 0.25, "task2": 0.5}
    assert wide_pool.accuracy(q, weights) == _onnx_accuracy(model, wide_pool, val_x)
    assert wide_pool.params(q) > wide_pool.params(wide_pool.query(["task0", "task2"]))


def test_plan_is_a_front_of_exact_points(wide_pool):
    asm = Assembler(wide_pool)
    q = wide_pool.query(["task1", "task0"], ["class2_1"])
    every = candidates(asm, q)
    assert len(every) == len(WIDTHS) ** 3
    for p in every:
        assert p.val_acc == wide_pool.accuracy(p.query)
        assert p.bytes == len(asm.assemble(p.query).data)
        assert (p.params, p.macs) == (wide_pool.params(p.query), wide_pool.flops(p.query))
    front = plan(asm, q)
    assert front[0].params == min(p.params for p in every)
    assert all(a.params < b.params and a.val_acc < b.val_acc for a, b in zip(front, front[1:], strict=False))
    assert all(not any(o.params <= p.params and o.val_acc > p.val_acc for o in every) for p in front)


def test_budget_picks_the_most_accurate_choice_that_fits(wide_pool):
    asm = Assembler(wide_pool)
    q = wide_pool.query(["task0", "task1", "task2"])
    every = candidates(asm, q)
    sizes = sorted({p.params for p in every})
    budget = Budget(max_params=sizes[len(sizes) // 2], max_bytes=10**9)
    best = fit_budget(asm, q, budget)
    assert best.params <= budget.max_params
    assert best.val_acc == max(p.val_acc for p in every if p.params <= budget.max_params)
    with pytest.raises(BudgetError, match=f"max_params = 1,000: the smallest possible is {sizes[0]:,} params"):
        fit_budget(asm, q, Budget(max_params=1000))


def test_budgets_are_unavailable_with_a_reason_on_a_one_width_pool(pool, wide_pool):
    with pytest.raises(Unavailable, match="one width"):
        plan(Assembler(pool), pool.query(["task0"]))
    assert wide_pool.unavailable("widths") is None
    with pytest.raises(Unavailable, match="no expert of width 1"):
        wide_pool.query(["task0"], widths={"task0": 1.0})


# -- "none of these" ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["poe", "mask"])
def test_reject_rule_in_the_graph_gives_the_reported_rates(pool, synthetic, val_x, method):
    q = pool.query(["task0"], ["class2_0"], method=method)
    rule = pool.reject_rule(q)
    model = Assembler(pool).assemble(q, softmax=True, reject=rule, reject_output=True)
    assert json.loads(_meta(model.data)["poe.reject"]) == rule.to_dict()
    out = _run(model.data, val_x)
    assert out["accepted"].dtype == np.bool_ and out["accepted"].shape == (len(val_x),)
    inside = np.isin(synthetic.val.y.numpy(), q.classes)
    assert out["accepted"][inside].mean() == pytest.approx(rule.accept_rate_in_task)
    assert rule.accept_rate_in_task >= 0.95
    assert (~out["accepted"][~inside]).mean() == pytest.approx(rule.reject_rate_out_of_task)
    assert 0 <= rule.auroc <= 1 and rule.score in ("max_softmax", "energy")


def test_reject_rule_picks_the_score_with_the_higher_auroc():
    rng = np.random.default_rng(0)
    # In-task images: one confident logit; out-of-task: all logits large and flat, so
    # energy (logsumexp) ranks them high while max-softmax ranks them low.
    inside = np.concatenate([np.full((50, 1), 5.0), rng.normal(0, 0.1, (50, 3))], 1)
    outside = rng.normal(6, 0.1, (50, 4))
    rule = fit_reject(np.concatenate([inside, outside]).astype(np.float32), np.r_[np.ones(50), np.zeros(50)])
    assert rule.score == "max_softmax" and rule.auroc == 1.0 and rule.reject_rate_out_of_task == 1.0


def test_auroc_equals_pairwise_counting_with_ties():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 40).astype(float)
    pairwise = np.mean([(x > y) + 0.5 * (x == y) for x in a for y in b])
    assert auroc(a, b) == pytest.approx(pairwise)


@pytest.mark.parametrize("n", [1, 7, 20, 21, 100])
def test_threshold_accepts_at_least_95_percent(n):
    s = np.random.default_rng(n).normal(size=n).astype(np.float32)
    t = np.float32(threshold_for(s))
    assert (s >= t).mean() >= 0.95
    assert (s >= t).sum() == n - int(0.05 * n)  # distinct scores: no more accepted than needed


# -- the tail and metadata, written field by field ------------------------------------

def _reference_tail(asm, q, output, reject):
    """The tail as onnx.helper builds it, message by message."""
    from onnx import TensorProto, helper

    from poe_core.reject import reject_nodes
    taxonomy = asm.pool.taxonomy
    tail = onnx.GraphProto(name=("mask_" if q.method == "mask" else "poe_") + "+".join(q.tasks)[:200])
    gather = q.gathers(taxonomy)
    source = "student/logits" if q.method == "mask" else "concat" if gather else "logits"
    if q.method != "mask":
        tail.node.append(helper.make_node("Concat", [f"{t}/logits" for t in q.tasks], [source], name="concat", axis=1))
    if gather:
        tail.initializer.append(helper.make_tensor("gather/indices", TensorProto.INT64, [len(q.classes)],
                                                   list(q.columns(taxonomy))))
        tail.node.append(helper.make_node("Gather", [source, "gather/indices"], ["logits"], name="gather", axis=1))
    if output == "probabilities":
        tail.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    tail.input.append(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *asm.pool.image_shape]))
    tail.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", len(q.classes)]))
    if reject is not None:
        nodes, initializers = reject_nodes(reject, "logits", "accepted")
        tail.node.extend(nodes)
        tail.initializer.extend(initializers)
        tail.output.append(helper.make_tensor_value_info("accepted", TensorProto.BOOL, ["batch"]))
    return tail.SerializeToString()


def _reference_metadata(asm, q, output, weights, reject):
    pool = asm.pool
    props = {"poe.labels": json.dumps([pool.taxonomy.classes[c] for c in q.classes]),
             "poe.tasks": json.dumps(list(q.tasks)),
             "poe.task_classes": json.dumps({t: pool.taxonomy.class_names(t) for t in q.tasks}),
             "poe.input": json.dumps({"name": "input", "layout": "NCHW", "color": "RGB",
                                      "shape": ["batch", *pool.image_shape],
                                      "scale": "pixel / 255, then (x - mean) / std",
                                      **(pool.spec.dataset.preprocess or {})}),
             "poe.mean": json.dumps(pool.mean), "poe.std": json.dumps(pool.std), "poe.output": output,
             "poe.weights": weights, "poe.pool_id": pool.pool_id}
    if q.method != "poe":
        props["poe.method"] = q.method
    if len(pool.widths) > 1 and q.method == "poe":
        props["poe.widths"] = json.dumps(dict(zip(q.tasks, q.widths, strict=True)))
    if reject is not None:
        props["poe.reject"] = reject.to_json()
    if asm.pool_version is not None:
        props["poe.pool_version"] = asm.pool_version
    meta = onnx.ModelProto()
    for key, value in props.items():
        meta.metadata_props.add(key=key, value=value)
    return meta.SerializeToString()


@pytest.mark.parametrize("method", ["poe", "mask"])
def test_tail_and_metadata_are_the_bytes_protobuf_writes(wide_pool, method):
    asm = Assembler(wide_pool, pool_version="7")
    queries = [wide_pool.query(["task2", "task0"], method=method),
               wide_pool.query(["task1"], ["class0_1"], method=method),
               wide_pool.query(classes=["class2_1", "class0_0"], method=method)]
    if method == "poe":
        queries.append(wide_pool.query(["task0", "task2"], widths={"task2": 0.5}))
    for q in queries:
        for output in ("logits", "probabilities"):
            for rule in (None, wide_pool.reject_rule(q, "fp32")):
                assert asm._tail(q, output, rule) == _reference_tail(asm, q, output, rule)
                assert asm._metadata(q, output, "int8", rule) == _reference_metadata(asm, q, output, "int8", rule)


def test_a_query_asked_again_resolves_once_and_a_refused_one_is_refused_again(pool):
    first = pool.query(["task1", "task0"], method="poe")
    assert pool.query(("task1", "task0")) is first  # remembered, whatever the sequence type
    for _ in range(2):
        with pytest.raises(TaskError, match="nope"):
            pool.query(["task0", "nope"])


def test_an_assembly_from_remembered_pieces_is_the_same_model_in_every_option(pool):
    asm = Assembler(pool)
    q = pool.query(["task2", "task0"])
    for softmax in (False, True, False):
        for weights in ("fp32", "int8", "fp32"):
            model = asm.assemble(q, softmax=softmax, weights=weights)
            fresh = Assembler(pool).assemble(q, softmax=softmax, weights=weights)
            assert model.data == fresh.data and model.labels == fresh.labels
            meta = _meta(model.data)
            assert json.loads(meta["poe.tasks"]) == ["task2", "task0"]
            assert meta["poe.output"] == ("probabilities" if softmax else "logits")


def test_a_model_is_its_pieces_with_the_pools_parts_uncopied(wide_pool):
    asm = Assembler(wide_pool)
    for q in (wide_pool.query(["task2", "task0"], widths={"task2": 0.5}), wide_pool.query(classes=["class1_0"]),
              wide_pool.query(["task1"], method="mask")):
        model = asm.assemble(q, softmax=True, weights="fp16")
        assert model.data == b"".join(model.chunks) and model.size == len(model.data)
        onnx.checker.check_model(onnx.load_from_string(model.data))
        fragments = asm.fragments("fp16")
        parts = [fragments["library"]] + ([fragments["student"]] if q.method == "mask" else
                                          [fragments[part_key(t, w)] for t, w in zip(q.tasks, q.widths, strict=True)])
        assert [c for c in model.chunks if any(c is p for p in parts)] == parts  # the very objects, in order


def test_varints_are_what_protobuf_writes():
    from poe_core.assemble import _varint

    for n in (0, 1, 127, 128, 300, 16383, 16384, 287_556, (1 << 21) - 1, 1 << 21, 1 << 35):
        assert b"\x08" + _varint(n) == onnx.TensorProto(dims=[n]).SerializeToString(), n  # dims: field 1, varint
