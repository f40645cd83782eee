"""The weight and file formats through HTTP: options.weights, options.format, the
per-format accuracies in the metadata and in /tasks, and int8 refused with its reason."""

import numpy as np
import onnxruntime as ort

JSON = {"Accept": "application/json"}
TASKS = ["task0", "task1"]


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _inputs(meta: dict, synthetic) -> np.ndarray:
    mean = np.array(meta["input"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta["input"]["std"], np.float32).reshape(1, -1, 1, 1)
    return ((synthetic.val.x.numpy().astype(np.float32) / 255 - mean) / std).astype(np.float32)


def test_every_weight_format_runs_with_its_own_accuracy(client, pool, synthetic):
    fp32 = client.post("/models", json={"tasks": TASKS}, headers=JSON).json()
    x = _inputs(fp32, synthetic)
    reference = _run(client.get(fp32["download_url"]).content, x).argmax(1)
    for weights in ("fp32", "fp16", "int8"):
        meta = client.post("/models", json={"tasks": TASKS, "options": {"weights": weights}}, headers=JSON).json()
        assert meta["weights"] == weights and meta["format"] == "onnx"
        assert meta["val_acc"] == pool.composite_accuracy(TASKS, weights)
        assert meta["val_acc_by_format"] == {w: pool.composite_accuracy(TASKS, w) for w in ("fp32", "fp16", "int8")}
        r = client.post("/models", json={"tasks": TASKS, "options": {"weights": weights}})
        assert r.headers["etag"] == f'"{meta["id"]}.{meta["pool_id"]}"' and len(r.content) == meta["bytes"]
        suffix = "" if weights == "fp32" else f"-{weights}"
        assert r.headers["content-disposition"] == f'attachment; filename="poe-task0+task1{suffix}.onnx"'
        agreement = (_run(r.content, x).argmax(1) == reference).mean()
        assert agreement >= (0.99 if weights != "int8" else 0.9)
    legacy = client.post("/models", json={"tasks": TASKS, "options": {"fp16": True}}, headers=JSON).json()
    assert legacy["weights"] == "fp16"


def test_ort_format_from_post_and_download(client, synthetic):
    body = {"tasks": TASKS, "options": {"format": "ort", "weights": "int8"}}
    meta = client.post("/models", json=body, headers=JSON).json()
    assert meta["format"] == "ort" and meta["download_url"].endswith("/download?format=ort")
    r = client.post("/models", json=body)
    assert r.content[4:8] == b"ORTM"
    assert len(r.content) == meta["bytes"] and r.headers["etag"].startswith(f'W/"{meta["id"]}.{meta["pool_id"]}.ort')
    assert r.headers["content-disposition"].endswith('-int8.ort"')
    onnx_answer = client.post("/models", json={"tasks": TASKS, "options": {"weights": "int8"}})
    assert onnx_answer.headers["etag"] != r.headers["etag"]  # a cache never mistakes one for the other
    onnx = onnx_answer.content
    x = _inputs(meta, synthetic)
    np.testing.assert_allclose(_run(r.content, x), _run(onnx, x), atol=1e-4)
    downloaded = client.get(meta["download_url"])
    assert downloaded.content == r.content
    assert client.get(meta["download_url"], headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_tasks_list_formats_and_their_accuracies(client, pool):
    listing = client.get("/tasks").json()
    assert listing["formats"]["int8"]["available"] == pool.format_info("int8")["available"]
    assert listing["formats"]["int8"]["val_acc_drop"] == pool.format_info("int8")["val_acc_drop"]
    task = listing["tasks"][0]
    expected = {w: pool.composite_accuracy([task["name"]], w) for w in ("fp32", "fp16", "int8")}
    assert task["val_acc_by_format"] == expected


def test_int8_refused_with_the_pools_reason(client, services, monkeypatch):
    pool = services.pools.active().pool
    reason = "int8 loses 3.00% validation accuracy on average, more than the 1.00% allowed"
    monkeypatch.setitem(pool.manifest["formats"], "int8", pool.format_info("int8") | {"available": False,
                                                                                      "reason": reason})
    r = client.post("/models", json={"tasks": TASKS, "options": {"weights": "int8"}})
    assert r.status_code == 422 and reason in r.json()["detail"]
    listing = client.get("/tasks").json()
    assert listing["formats"]["int8"] | {"val_acc_drop": None} == {"available": False, "reason": reason,
                                                                   "val_acc_drop": None}
    assert all(t["val_acc_by_format"]["int8"] is None for t in listing["tasks"])
    # A model's metadata is computed once per model (a pool never changes): ask for one not asked before.
    fresh = {"classes": ["class2_1", "class0_0"], "options": {"softmax": True}}
    assert client.post("/models", json=fresh, headers=JSON).json()["val_acc_by_format"]["int8"] is None


def test_contradictory_weight_options_are_refused(client):
    r = client.post("/models", json={"tasks": TASKS, "options": {"fp16": True, "weights": "int8"}})
    assert r.status_code == 422 and "contradicts" in r.text
    assert client.post("/models", json={"tasks": TASKS, "options": {"format": "tflite"}}).status_code == 422

