import asyncio
import hashlib
import json

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from service_fixtures import ADMIN, slow_assembly

from app.api.models import wants_json
from app.main import create_app

JSON = {"Accept": "application/json"}


def _run(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": images})[0]


def _inputs(meta: dict, synthetic, n: int = 8) -> np.ndarray:
    mean = np.array(meta["input"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta["input"]["std"], np.float32).reshape(1, -1, 1, 1)
    return ((synthetic.val.x[:n].numpy().astype(np.float32) / 255) - mean) / std


def test_downloaded_model_runs_and_its_labels_match(client, pool, synthetic):
    r = client.post("/models", json={"tasks": ["task2", "task0"]})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["content-disposition"] == 'attachment; filename="poe-task0+task2.onnx"'
    meta = client.post("/models", json={"tasks": ["task2", "task0"]}, headers=JSON).json()
    assert r.headers["etag"] == f'"{meta["id"]}.{meta["pool_id"]}"' and r.headers["x-model-id"] == meta["id"]
    expected = pool.taxonomy.class_names("task0") + pool.taxonomy.class_names("task2")
    assert meta["tasks"] == ["task0", "task2"] and meta["labels"] == expected
    assert meta["bytes"] == len(r.content)
    assert meta["params"] == pool.composite_params(["task0", "task2"])
    assert meta["val_acc"] == pytest.approx(pool.composite_accuracy(["task0", "task2"]))
    props = {p.key: p.value for p in onnx.load_from_string(r.content).metadata_props}
    assert json.loads(props["poe.labels"]) == expected
    logits = _run(r.content, _inputs(meta, synthetic))
    cached = np.concatenate([pool.val_logits["task0"][:8], pool.val_logits["task2"][:8]], axis=1)
    np.testing.assert_allclose(logits, cached, atol=1e-4)


def test_options_softmax_and_fp16(client, synthetic):
    plain = client.post("/models", json={"tasks": ["task1"]}, headers=JSON).json()
    soft = client.post("/models", json={"tasks": ["task1"], "options": {"softmax": True}})
    half = client.post("/models", json={"tasks": ["task1"], "options": {"fp16": True}})
    assert soft.headers["content-disposition"].endswith('-softmax.onnx"')
    probabilities = _run(soft.content, _inputs(plain, synthetic))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    assert len(half.content) < plain["bytes"]
    np.testing.assert_allclose(_run(half.content, _inputs(plain, synthetic)),
                               _run(client.get(plain["download_url"]).content, _inputs(plain, synthetic)),
                               atol=0.05)


def test_metadata_download_and_etag(client):
    meta = client.post("/models", json={"tasks": ["task0", "task1"]}, headers=JSON).json()
    assert client.get(f"/models/{meta['id']}").json() == meta
    r = client.get(f"/models/{meta['id']}/download")
    assert r.status_code == 200 and len(r.content) == meta["bytes"]
    etag = r.headers["etag"]
    assert etag == f'"{meta["id"]}.{meta["pool_id"]}"'
    cached = client.get(f"/models/{meta['id']}/download", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == etag
    for tag, status in (('"other"', 200), ("*", 304), (f'W/{etag}, "x"', 304)):
        r = client.get(f"/models/{meta['id']}/download", headers={"If-None-Match": tag})
        assert r.status_code == status


def test_unknown_model_is_404(client, versions):
    first = client.post("/models", json={"tasks": ["task0"]}, headers=JSON).json()["id"]
    version, pool_prefix, mask, output, weights = first.split("-")
    for ident in ["nope", first.upper(), f"{version}-{pool_prefix}-0{mask}-{output}-{weights}",
                  f"{version}-{pool_prefix}-0-{output}-{weights}", f"{version}-{pool_prefix}-ff-{output}-{weights}",
                  f"{version}-00000000-{mask}-{output}-{weights}", f"424242-{pool_prefix}-{mask}-{output}-{weights}",
                  f"99999999999999999999-{pool_prefix}-{mask}-{output}-{weights}",
                  f"{version}-{pool_prefix}-{mask}-{output}-bf16"]:
        assert client.get(f"/models/{ident}").status_code == 404, ident
        assert client.get(f"/models/{ident}/download").status_code == 404, ident


def test_fifty_parallel_requests_assemble_once(client, services, monkeypatch):
    body = {"tasks": ["task1", "task2"], "options": {"softmax": True, "fp16": True}}
    slow_assembly(monkeypatch, services.serving.pools.active())
    before = services.serving.models.assemblies

    async def burst():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await asyncio.gather(*(ac.post("/models", json=body) for _ in range(50)))

    responses = asyncio.run(burst())
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert len({r.headers["etag"] for r in responses}) == 1
    assert services.serving.models.assemblies - before == 1


def test_every_id_resolves_after_a_restart_with_the_same_bytes(fresh, tmp_path):
    """Nothing is stored per query: a new process (another replica, after a crash) serves
    every id issued before, assembled again, byte for byte, and writes no file for it."""
    settings, client, _ = fresh
    bodies = [{"tasks": ["task0"]}, {"tasks": ["task2", "task1"], "options": {"softmax": True}},
              {"tasks": ["task0", "task1", "task2"], "options": {"weights": "fp16"}}]
    issued = [client.post("/models", json=b) for b in bodies]
    files = sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*") if p.is_file())
    with TestClient(create_app(settings)) as replica:
        for r in issued:
            again = replica.get(f"/models/{r.headers['x-model-id']}/download")
            assert again.status_code == 200
            assert again.content == r.content and again.headers["etag"] == r.headers["etag"]
            meta = replica.get(f"/models/{r.headers['x-model-id']}").json()
            assert meta["sha256"] == hashlib.sha256(r.content).hexdigest()
    assert sorted(p.relative_to(settings.data_dir) for p in settings.data_dir.rglob("*") if p.is_file()) == files


def test_request_counts_are_kept_per_task(fresh):
    settings, client, version = fresh
    for tasks in (["task0"], ["task0", "task1"], ["task1", "task0"]):
        assert client.post("/models", json={"tasks": tasks}).status_code == 200
    client.app.state.services.serving.flush_counts()
    pools = client.get("/admin/pools", headers=ADMIN).json()
    assert next(p for p in pools if p["version"] == version)["requests"] == {"task0": 3, "task1": 2}


def test_download_url_is_relative_or_the_configured_base(client, fresh):
    meta = client.post("/models", json={"tasks": ["task0"]}, headers=JSON | {"Host": "evil.example"}).json()
    assert meta["download_url"] == f"/models/{meta['id']}/download"
    settings, _, _ = fresh
    with TestClient(create_app(settings.model_copy(update={"public_url": "https://models.example/poe/"}))) as c:
        meta = c.post("/models", json={"tasks": ["task0"], "options": {"format": "ort"}},
                      headers=JSON | {"Host": "evil.example"}).json()
        assert meta["download_url"] == f"https://models.example/poe/models/{meta['id']}/download?format=ort"


def test_tasks(client, pool, versions):
    listing = client.get("/tasks").json()
    assert listing["pool_version"] == versions["first"] and listing["pool_id"] == pool.pool_id
    assert [t["name"] for t in listing["tasks"]] == pool.tasks
    task = client.get("/tasks/task1").json()
    assert task == listing["tasks"][1]
    assert task["classes"] == pool.taxonomy.class_names("task1")
    assert task["params"] == pool.expert_info("task1")["params"]
    assert listing["library"]["params"] == pool.manifest["library"]["params"]


def test_health_ready_docs_and_page(client, versions):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"ready": True, "database": True, "workers": 0,
                                           "pool_version": versions["first"], "reasons": []}
    assert "/models" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert "Pool of Experts" in client.get("/").text


@pytest.mark.parametrize("accept, expected", [
    (None, False), ("*/*", False), ("application/octet-stream", False), ("application/json", True),
    ("application/json, */*", True), ("application/octet-stream, application/json;q=0.9", False),
    ("application/json;q=0.5, */*", False), ("application/json, application/octet-stream;q=0.1", True),
])
def test_accept_negotiation(accept, expected):
    assert wants_json(accept) is expected


def test_per_class_accuracy_is_what_the_delivered_model_does(client, pool, synthetic):
    meta = client.post("/models", json={"tasks": ["task1", "task2"], "options": {"weights": "int8"}},
                       headers=JSON).json()
    by_class = meta["val_acc_by_class"]
    assert list(by_class) == meta["labels"]
    assert sum(by_class.values()) / len(by_class) == pytest.approx(meta["val_acc"])
    model = client.get(meta["download_url"]).content
    mean = np.array(meta["input"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta["input"]["std"], np.float32).reshape(1, -1, 1, 1)
    for column, label in enumerate(meta["labels"]):
        images = synthetic.val.x[synthetic.val.y == synthetic.taxonomy.classes.index(label)]
        predicted = _run(model, ((images.numpy().astype(np.float32) / 255) - mean) / std).argmax(1)
        assert by_class[label] == pytest.approx(float((predicted == column).mean()))
