"""POST /models beyond whole tasks, through HTTP: classes, the mask baseline, expert widths
and budgets, the reject output, POST /models/plan, and their ids, which resolve on a new
process. Every accuracy and rate the service reports is what onnxruntime does with the
delivered file on the validation images."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import WIDTHS
from fastapi.testclient import TestClient
from service_fixtures import make_settings, store_with

from app.main import create_app

JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def wide(databases, tmp_path_factory, wide_pool):
    """A store with the two-width synthetic pool active, and an API client on it."""
    settings, _ = store_with(databases, tmp_path_factory.mktemp("wide-store"), wide_pool.root)
    with TestClient(create_app(settings)) as client:
        yield settings, client


@pytest.fixture(scope="module")
def val(synthetic, wide_pool):
    mean = np.asarray(wide_pool.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(wide_pool.std, np.float32).reshape(1, -1, 1, 1)
    return (synthetic.val.x.numpy().astype(np.float32) / 255 - mean) / std, synthetic.val.y.numpy()


def _outputs(model_bytes: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x}), strict=True))


def _accuracy(scores: np.ndarray, labels: list[str], val, classes: list[str]) -> float:
    """Top-1 among the model's outputs on the validation images of its classes."""
    x, y = val
    names = np.asarray(classes)
    inside = np.isin(names[y], labels)
    return float((np.asarray(labels)[scores[inside].argmax(1)] == names[y][inside]).mean())


def _ask(client, body: dict) -> tuple[dict, bytes]:
    """The metadata and the file of one request, checked to be one model."""
    meta = client.post("/models", json=body, headers=JSON)
    assert meta.status_code == 200, meta.text
    meta = meta.json()
    data = client.post("/models", json=body)
    assert data.headers["x-model-id"] == meta["id"] and hashlib.sha256(data.content).hexdigest() == meta["sha256"]
    assert data.headers["etag"] == f'"{meta["id"]}.{meta["pool_id"]}"'
    return meta, data.content


def _checked(client, body: dict, val, classes) -> tuple[dict, bytes]:
    """As _ask, and every accuracy of the metadata recomputed with onnxruntime."""
    meta, data = _ask(client, body)
    scores = _outputs(data, val[0])[meta["output"]]
    assert scores.shape[1] == len(meta["labels"])
    assert meta["val_acc"] == pytest.approx(_accuracy(scores, meta["labels"], val, classes), abs=1e-6)
    predicted = np.asarray(meta["labels"])[scores.argmax(1)]
    names = np.asarray(classes)[val[1]]
    for label, acc in meta["val_acc_by_class"].items():
        assert acc == pytest.approx(float((predicted[names == label] == label).mean()), abs=1e-6)
    assert json.loads(_props(data)["poe.labels"]) == meta["labels"]
    return meta, data


def _props(data: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}


def test_classes_alone_output_in_the_order_given(wide, val, wide_pool):
    _, client = wide
    classes = list(wide_pool.taxonomy.classes)
    meta, data = _checked(client, {"classes": ["class2_1", "class0_0", "class2_0"]}, val, classes)
    assert meta["labels"] == ["class2_1", "class0_0", "class2_0"] and meta["tasks"] == ["task2", "task0"]
    assert meta["id"].split("-")[2] == "c5.0.4t5"  # classes 5, 0, 4 of tasks 0 and 2 (mask 0b101)
    assert meta["method"] == "poe" and meta["widths"] == {"task2": 0.25, "task0": 0.25}
    assert "Gather" in {n.op_type for n in onnx.load_from_string(data).graph.node}
    r = client.post("/models", json={"classes": ["class2_1", "class0_0", "class2_0"]})
    assert r.headers["content-disposition"] == 'attachment; filename="poe-class2_1+class0_0+class2_0.onnx"'


def test_tasks_with_classes_and_every_weight_format(wide, val, wide_pool):
    _, client = wide
    classes = list(wide_pool.taxonomy.classes)
    for weights in ("fp32", "fp16", "int8"):
        body = {"tasks": ["task1"], "classes": ["class0_1"], "options": {"weights": weights, "softmax": True}}
        meta, _ = _checked(client, body, val, classes)
        assert meta["labels"] == ["class1_0", "class1_1", "class0_1"] and meta["weights"] == weights
        assert meta["output"] == "probabilities"


def test_a_class_query_of_whole_tasks_is_the_old_model(wide):
    """Naming every class of a task, in its order, is naming the task: same id, same bytes."""
    _, client = wide
    by_task, data = _ask(client, {"tasks": ["task1", "task0"]})
    by_class, same = _ask(client, {"classes": ["class0_0", "class0_1", "class1_0", "class1_1"]})
    redundant, again = _ask(client, {"tasks": ["task0", "task1"], "classes": ["class1_0"]})
    assert by_task["id"] == by_class["id"] == redundant["id"] and data == same == again
    assert by_task["id"].split("-")[2] == "3"


def test_mask_and_the_baseline_in_a_poe_answer(wide, val, wide_pool):
    _, client = wide
    classes = list(wide_pool.taxonomy.classes)
    query = {"tasks": ["task2"], "classes": ["class0_0"]}
    mask, data = _checked(client, query | {"options": {"method": "mask"}}, val, classes)
    assert mask["method"] == "mask" and mask["widths"] == {} and mask["mask"] is None
    assert mask["id"].endswith("-mask") and _props(data)["poe.method"] == "mask"
    assert mask["params"] == wide_pool.spec.library.params + wide_pool.spec.student.params
    poe, _ = _checked(client, query, val, classes)
    assert poe["mask"] == {"val_acc": mask["val_acc"], "params": mask["params"], "unavailable": None}


def test_widths_and_budgets(wide, val, wide_pool):
    _, client = wide
    classes = list(wide_pool.taxonomy.classes)
    body = {"tasks": ["task0", "task2"], "options": {"widths": {"task2": 0.5}}}
    meta, data = _checked(client, body, val, classes)
    assert meta["widths"] == {"task0": 0.25, "task2": 0.5} and meta["id"].endswith("-w0.25_0.5")
    assert json.loads(_props(data)["poe.widths"]) == meta["widths"]
    plan = client.post("/models/plan", json={"tasks": ["task0", "task2"]}).json()["points"]
    # The most accurate model within the budget of the front's second point (if it has two).
    budget = plan[min(1, len(plan) - 1)]["params"]
    fitted, _ = _checked(client, {"tasks": ["task0", "task2"], "options": {"budget": {"max_params": budget}}},
                         val, classes)
    assert fitted["params"] <= budget
    assert fitted["val_acc"] == max(p["val_acc"] for p in plan if p["params"] <= budget)
    assert client.get(f"/models/{fitted['id']}").json() == fitted


def test_reject_output_gives_the_reported_rates(wide, val, wide_pool):
    _, client = wide
    classes = list(wide_pool.taxonomy.classes)
    meta, data = _checked(client, {"classes": ["class1_0", "class2_1"], "options": {"reject_output": True}},
                          val, classes)
    rule = meta["reject"]
    assert meta["reject_output"] is True and meta["id"].endswith("-reject")
    assert json.loads(_props(data)["poe.reject"]) == rule
    accepted = _outputs(data, val[0])["accepted"]
    inside = np.isin(np.asarray(classes)[val[1]], meta["labels"])
    assert accepted[inside].mean() == pytest.approx(rule["accept_rate_in_task"])
    assert (~accepted[~inside]).mean() == pytest.approx(rule["reject_rate_out_of_task"])
    assert rule["accept_rate_in_task"] >= 0.95 and 0 <= rule["auroc"] <= 1
    plain, plain_data = _ask(client, {"classes": ["class1_0", "class2_1"]})
    assert plain["reject"] == rule and "poe.reject" not in _props(plain_data)  # the rule, not in the file


@pytest.mark.parametrize(("body", "suffix"), [
    ({"tasks": ["task0", "task2"], "options": {"widths": {"task2": 0.5}}}, "-ks0.25_0.5"),
    ({"tasks": ["task2"], "classes": ["class0_0"], "options": {"method": "mask", "softmax": True, "weights": "int8"}},
     "-mask-softmax-int8"),
    ({"classes": ["class1_0", "class2_1"], "options": {"reject_output": True, "weights": "fp16"}}, "-fp16-reject"),
])
def test_file_names_say_the_options(wide, body, suffix):
    _, client = wide
    meta = client.post("/models", json=body, headers=JSON).json()
    by_class = "classes" in body
    stem = "+".join(meta["labels"] if by_class else meta["tasks"])
    r = client.post("/models", json=body)
    assert r.headers["content-disposition"] == f'attachment; filename="poe-{stem}{suffix}.onnx"'


def test_plan_points_are_what_their_files_do(wide, val, wide_pool):
    _, client = wide
    classes = list(wide_pool.taxonomy.classes)
    body = {"tasks": ["task1"], "classes": ["class0_1", "class2_0"]}
    answer = client.post("/models/plan", json=body)
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    assert plan["unavailable"] is None and plan["size"] == "params"
    assert plan["labels"] == ["class1_0", "class1_1", "class0_1", "class2_0"]
    points = plan["points"]
    assert len(points) >= 1
    pairs = zip(points, points[1:], strict=False)
    assert all(a["params"] < b["params"] and a["val_acc"] < b["val_acc"] for a, b in pairs)
    for point in points:
        assert list(point["widths"]) == plan["tasks"] and set(point["widths"].values()) <= set(WIDTHS)
        meta = client.get(f"/models/{point['id']}").json()
        data = client.get(point["download_url"]).content
        assert len(data) == point["bytes"] == meta["bytes"]
        assert (meta["params"], meta["flops"], meta["widths"]) == (point["params"], point["macs"], point["widths"])
        scores = _outputs(data, val[0])["logits"]
        assert point["val_acc"] == pytest.approx(_accuracy(scores, meta["labels"], val, classes), abs=1e-6)
    smallest = client.post("/models/plan?size=bytes", json=body | {"options": {"budget": {
        "max_bytes": points[0]["bytes"]}}}).json()
    assert smallest["size"] == "bytes" and all(p["bytes"] <= points[0]["bytes"] for p in smallest["points"])


def test_every_new_id_resolves_on_another_process(wide):
    settings, client = wide
    bodies = [{"classes": ["class2_1", "class0_0"]}, {"tasks": ["task1"], "options": {"method": "mask"}},
              {"classes": ["class1_1"], "options": {"widths": {"task1": 0.5}, "reject_output": True,
                                                    "weights": "fp16"}},
              {"tasks": ["task0"], "classes": ["class2_0"], "options": {"softmax": True, "format": "ort"}}]
    issued = [client.post("/models", json=b) for b in bodies]
    assert {r.status_code for r in issued} == {200}
    with TestClient(create_app(settings)) as replica:
        for body, r in zip(bodies, issued, strict=True):
            ort_format = body.get("options", {}).get("format") == "ort"
            again = replica.get(f"/models/{r.headers['x-model-id']}/download" + ("?format=ort" if ort_format else ""))
            assert (again.status_code, again.headers["etag"]) == (200, r.headers["etag"])
            # onnxruntime writes equivalent ORT files, not identical ones (hence a weak ETag).
            assert again.content == r.content if not ort_format else len(again.content) == len(r.content)


@pytest.mark.parametrize(("body", "message"), [
    ({"classes": ["class0_0", "zebra"]}, "unknown class(es): 'zebra'"),
    ({"classes": ["class0_0", "class0_0"]}, "more than once: class0_0"),
    ({"tasks": ["task0"], "options": {"method": "mask", "widths": {"task0": 0.5}}}, "the mask method uses none"),
    ({"tasks": ["task0"], "options": {"method": "mask", "budget": {"max_params": 10**6}}}, "mask method"),
    ({"tasks": ["task0"], "options": {"widths": {"task1": 0.5}}}, "not in the query: 'task1'"),
    ({"tasks": ["task0"], "options": {"widths": {"task0": 2.0}}}, "no expert of width 2"),
    ({"tasks": ["task0"], "options": {"widths": {"task0": 0.5}, "budget": {"max_params": 10**6}}},
     "widths"),  # POST /models: "give widths or a budget"; a plan: "send the query without widths"
    ({"tasks": ["task0", "task1"], "options": {"budget": {"max_params": 10}}},
     "max_params = 10: the smallest possible is"),
    ({"tasks": ["task0"], "options": {"budget": {}}}, "max_params, max_bytes or max_macs"),
    ({"tasks": ["task0"], "options": {"method": "smart"}}, "'poe' or 'mask'"),
    ({"options": {"softmax": True}}, "name tasks, classes or both"),
    ({"classes": []}, "at least 1 item"),
])
def test_bad_queries_are_422_naming_the_culprit(wide, body, message):
    _, client = wide
    for path in ("/models", "/models/plan"):
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        assert message in json.dumps(r.json()), (path, r.text)


def test_plan_refuses_what_it_cannot_plan(wide):
    _, client = wide
    for options, message in [({"method": "mask"}, "mask method has no experts"),
                             ({"widths": {"task0": 0.5}}, "send the query without widths")]:
        r = client.post("/models/plan", json={"tasks": ["task0"], "options": options})
        assert r.status_code == 422 and message in r.json()["detail"]


def test_foreign_and_malformed_ids_are_404(wide):
    _, client = wide
    good = client.post("/models", json={"classes": ["class2_1", "class0_0"]}, headers=JSON).json()["id"]
    version, prefix, subject, output, weights = good.split("-")
    base = f"{version}-{prefix}"
    for ident in [f"{base}-c5.0t7-{output}-{weights}",  # a task with no class among the outputs
                  f"{base}-c5.0t1-{output}-{weights}",  # a class no task of the mask has
                  f"{base}-c5.5t5-{output}-{weights}",  # a class twice
                  f"{base}-c5.99t5-{output}-{weights}",  # no such class
                  f"{base}-c0.1t1-{output}-{weights}",  # whole tasks: their id is the mask
                  f"{base}-c05.0t5-{output}-{weights}",  # not canonical
                  f"{base}-{subject}-{output}-{weights}-w0.25_0.25",  # default widths are not spelled
                  f"{base}-{subject}-{output}-{weights}-w0.5",  # one width for two tasks
                  f"{base}-{subject}-{output}-{weights}-w0.5_1",  # no such width
                  f"{base}-{subject}-{output}-{weights}-w0.50_0.5",
                  f"{base}-{subject}-{output}-{weights}-mask-w0.5_0.5",
                  f"{base}-{subject}-{output}-{weights}-reject-mask",
                  f"{base}-{subject}t1-{output}-{weights}", f"{base}-c-{output}-{weights}",
                  f"{base}-ct5-{output}-{weights}", f"{base}-c5.0t0-{output}-{weights}",
                  f"{base}-c5.0tfff-{output}-{weights}", f"{base}-{subject}-{output}-{weights}-w" + "1" * 5000,
                  f"{base}-c{'.'.join(['1'] * 3000)}t2-{output}-{weights}"]:
        for path in (f"/models/{ident}", f"/models/{ident}/download"):
            assert client.get(path).status_code == 404, ident
    assert client.get(f"/models/{base}-c0.5t5-{output}-{weights}").status_code == 200  # the order is the query's


@pytest.fixture(scope="module")
def bare_pool(tmp_path_factory, work_dir, synthetic):
    """The session's pool without its student head: one width and no mask baseline, as
    every pool of format 2."""
    from poe_core.build import build_pool_from_work

    return build_pool_from_work(work_dir, tmp_path_factory.mktemp("bare") / "pool", synthetic, student_head=False)


def test_a_pool_without_widths_or_student_says_why(databases, tmp_path, bare_pool):
    first, second = (bare_pool.taxonomy.class_names(t)[0] for t in ("task1", "task0"))
    with TestClient(create_app(make_settings(databases, tmp_path, default_pool=str(bare_pool.root)))) as client:
        meta = client.post("/models", json={"classes": [first, second]}, headers=JSON).json()
        assert meta["labels"] == [first, second] and meta["tasks"] == ["task1", "task0"]
        assert meta["mask"]["val_acc"] is None and "no library student head" in meta["mask"]["unavailable"]
        r = client.post("/models", json={"classes": [first], "options": {"method": "mask"}})
        assert r.status_code == 422 and "no library student head" in r.json()["detail"]
        r = client.post("/models", json={"classes": [first], "options": {"budget": {"max_params": 10**6}}})
        assert r.status_code == 422 and "one width" in r.json()["detail"]
        plan = client.post("/models/plan", json={"classes": [first, second]}).json()
        assert "one width" in plan["unavailable"] and len(plan["points"]) == 1
        point = plan["points"][0]
        assert (point["id"], point["params"], point["val_acc"]) == (meta["id"], meta["params"], meta["val_acc"])
        assert point["bytes"] == meta["bytes"] and point["macs"] == meta["flops"]
        assert client.post("/models/plan", json={"classes": [first], "options": {
            "budget": {"max_params": 10**6}}}).status_code == 422
