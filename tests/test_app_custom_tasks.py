"""POST /admin/tasks: a custom primitive task trained by a real `poe worker` from the
active pool's kept oracle, served from a new pool version; and every request refused."""

import json
import signal

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from service_fixtures import ADMIN, make_settings, start_worker, wait_for

from app.main import create_app
from app.services import Services
from app.store.pools import import_pool
from app.store.tables import PoolVersion

JSON = {"Accept": "application/json"}
SYNTHETIC = {"source": "synthetic"}
TINY = {"data": SYNTHETIC, "epochs": 2, "batch_size": 16, "bank_views": 2, "precision": "fp32", "device": "cpu"}


def _accuracy_by_onnxruntime(model: bytes, meta: dict, synthetic) -> float:
    """Top-1 of the delivered model over its classes, on the validation images of its classes."""
    mean = np.array(meta["input"]["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(meta["input"]["std"], np.float32).reshape(1, -1, 1, 1)
    x = (synthetic.val.x.numpy().astype(np.float32) / 255 - mean) / std
    logits = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    index = {c: i for i, c in enumerate(synthetic.taxonomy.classes)}
    outputs = np.array([index[c] for c in meta["labels"]])
    labels = synthetic.val.y.numpy()
    inside = np.isin(labels, outputs)
    return float((outputs[logits[inside].argmax(1)] == labels[inside]).mean())


def _files(settings, version: int) -> dict[str, str]:
    services = Services(settings)
    try:
        with services.db.session() as session:
            return {f.path: f.sha256 for f in session.get(PoolVersion, version).files}
    finally:
        services.close()


def test_custom_task_end_to_end(fresh, tmp_path, synthetic):
    settings, client, old = fresh
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        r = client.post("/admin/tasks", headers=ADMIN, json=TINY | {"name": "mixed",
                                                                    "classes": ["class1_1", "class0_0"]})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["kind"] == "add-task" and job["request"]["pool_version"] == old

        def finished():
            state = client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()
            return state if state["status"] in ("succeeded", "failed", "cancelled") else None

        state = wait_for(finished, timeout=180, what="the custom-task job")
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    assert state["status"] == "succeeded", (state["error"], state["log"])
    assert state["progress"] == 100
    assert any("filling a logit bank of the kept oracle" in line for line in state["log"])
    new = state["pool_version"]
    assert new > old

    tasks = client.get("/tasks").json()
    assert tasks["pool_version"] == new
    assert [t["name"] for t in tasks["tasks"]] == ["task0", "task1", "task2", "mixed"]
    mixed = next(t for t in tasks["tasks"] if t["name"] == "mixed")
    assert mixed["classes"] == ["class1_1", "class0_0"] and 0 <= mixed["val_acc"] <= 1

    # The old version is intact and still there; the new one holds its files unchanged.
    pools = {p["version"]: p for p in client.get("/admin/pools", headers=ADMIN).json()}
    assert pools[old]["tasks"] == ["task0", "task1", "task2"] and pools[new]["active"]
    before, after = _files(settings, old), _files(settings, new)
    assert {p: after[p] for p in before if p != "manifest.json"} == {p: s for p, s in before.items()
                                                                     if p != "manifest.json"}
    assert any(p.startswith("experts/") and "mixed" in p for p in set(after) - set(before))

    # The delivered models' reported accuracy is what onnxruntime gives on them.
    for query in (["mixed"], ["mixed", "task2"]):
        meta = client.post("/models", json={"tasks": query}, headers=JSON).json()
        model = client.post("/models", json={"tasks": query})
        assert model.status_code == 200 and meta["pool_version"] == new
        assert meta["val_acc"] == pytest.approx(_accuracy_by_onnxruntime(model.content, meta, synthetic), abs=1e-6)
    assert meta["labels"] == ["class1_1", "class0_0", "class2_0", "class2_1"]
    assert client.post("/models", json={"tasks": ["mixed"]}, headers=JSON).json()["val_acc"] == \
        pytest.approx(mixed["val_acc"])
    overlap = client.post("/models", json={"tasks": ["mixed", "task0"]})
    assert overlap.status_code == 422 and "share class 'class0_0'" in overlap.json()["detail"]


@pytest.fixture
def hierarchy_root(settings):
    root = settings.allowed_data_roots[0]
    (root / "folder" / "train").mkdir(parents=True, exist_ok=True)
    (root / "other.json").write_text(json.dumps({"pets": ["cat", "dog"]}))
    return root


@pytest.mark.parametrize(("body", "message"), [
    ({"name": "task0", "classes": ["class0_0"]}, "already has a primitive task 'task0'"),
    ({"name": "pets", "classes": ["class0_0", "zebra"]}, "unknown class(es): 'zebra'"),
    ({"name": "pets", "classes": ["class0_0", "class0_0"]}, "listed more than once: class0_0"),
    ({"name": "pets", "classes": []}, "at least 1 item"),
    ({"name": "pets", "classes": ["class0_1", "class0_0"]}, "'task0' already has exactly these classes"),
    ({"name": "two words", "classes": ["class0_0"]}, "pattern"),
    ({"name": "pets", "classes": ["class0_0"], "data": None}, "give `data`"),
    ({"name": "pets", "classes": ["class0_0"], "data": {"source": "cifar100-npy", "path": "/etc"}},
     "allowed data roots"),
    ({"name": "pets", "classes": ["class0_0"],
      "data": {"source": "image-folder", "path": "folder", "hierarchy": "other.json"}},
     "classes are not those of the active pool"),
    ({"name": "pets", "classes": ["class0_0"], "epochs": 0}, "greater than or equal to 1"),
])
def test_bad_custom_tasks_are_422_with_the_reason(client, hierarchy_root, body, message):
    r = client.post("/admin/tasks", headers=ADMIN, json={"data": SYNTHETIC} | body)
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json())
    assert client.post("/admin/tasks", json={"data": SYNTHETIC} | body).status_code == 401


def test_a_pool_without_a_kept_oracle_cannot_be_extended(databases, tmp_path, second_pool):
    assert second_pool.spec.oracle is None
    settings = make_settings(databases, tmp_path / "data")
    services = Services.start(settings)
    import_pool(services.db, services.blobs, second_pool.root, source="test", activate=True)
    services.close()
    with TestClient(create_app(settings)) as client:
        r = client.post("/admin/tasks", headers=ADMIN, json={"name": "pets", "classes": ["class0_0"],
                                                             "data": SYNTHETIC})
    assert r.status_code == 422
    assert "keeps no oracle" in r.json()["detail"]
