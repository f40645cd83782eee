import os
import stat

import pytest
from fastapi.testclient import TestClient
from service_fixtures import ADMIN, make_settings

from app.main import create_app
from app.services import admin_token
from app.settings import Settings
from poe_core.recipe import Architecture

SYNTHETIC = {"data": {"source": "synthetic"}}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer"}])
def test_admin_needs_the_token(client, headers):
    for method, path in [("GET", "/admin/jobs"), ("GET", "/admin/pools"), ("POST", "/admin/extractions"),
                         ("POST", "/admin/pools/1/activate"), ("POST", "/admin/jobs/1/cancel")]:
        r = client.request(method, path, headers=headers, json=SYNTHETIC)
        assert r.status_code == 401, (method, path)
        assert r.headers["www-authenticate"] == "Bearer"


def test_generated_token_in_embedded_mode(tmp_path):
    settings = Settings(data_dir=tmp_path, admin_token=None)
    token = admin_token(settings)
    assert token and len(token) > 30
    assert stat.S_IMODE(os.stat(settings.admin_token_file).st_mode) == 0o600
    assert admin_token(settings) == token
    assert admin_token(Settings(data_dir=tmp_path, admin_token=None,
                                database_url="postgresql://db/poe")) is None


def test_admin_closed_without_token_outside_embedded_mode(databases, tmp_path):
    settings = make_settings(databases, tmp_path, admin_token=None)
    if settings.embedded:
        pytest.skip("embedded mode generates a token")
    with TestClient(create_app(settings)) as c:
        r = c.get("/admin/jobs", headers=ADMIN)
        assert r.status_code == 401 and "disabled" in r.json()["detail"]


def test_pools_list_and_activate(client, versions, pool):
    pools = client.get("/admin/pools", headers=ADMIN).json()
    assert [p["version"] for p in pools] == [versions["second"], versions["first"]]
    assert [p["active"] for p in pools] == [False, True]
    assert pools[1]["tasks"] == pool.tasks and pools[1]["reusable"] == []
    try:
        r = client.post(f"/admin/pools/{versions['second']}/activate", headers=ADMIN)
        assert r.status_code == 200 and r.json()["active"]
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["task0", "task1"]
        assert client.post("/models", json={"tasks": ["task2"]}).status_code == 422
    finally:
        client.post(f"/admin/pools/{versions['first']}/activate", headers=ADMIN)
    assert client.get("/tasks").json()["pool_version"] == versions["first"]
    assert client.post("/admin/pools/999/activate", headers=ADMIN).status_code == 404


def test_queue_and_cancel_a_job(client):
    r = client.post("/admin/extractions", headers=ADMIN, json=SYNTHETIC | {"tasks": ["task1"]})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["request"]["tasks"] == ["task1"]
    assert Architecture.model_validate(job["request"]["oracle"]["arch"]).text() == "16,4,4"
    assert client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()["status"] == "queued"
    assert job["id"] in [j["id"] for j in client.get("/admin/jobs?status=queued", headers=ADMIN).json()]
    cancelled = client.post(f"/admin/jobs/{job['id']}/cancel", headers=ADMIN)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/admin/jobs/{job['id']}/cancel", headers=ADMIN)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]
    assert client.get("/admin/jobs/424242", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("body, status, message", [
    ({"data": {"source": "cifar100-npy", "path": "/etc"}}, 422, "not an existing file or directory under"),
    ({"data": {"source": "cifar100-npy", "path": "../../.."}}, 422, "allowed data roots"),
    ({"data": {"source": "cifar100-npy"}}, 422, "Field required"),
    ({"data": {"source": "image-folder", "path": "x"}}, 422, "Field required"),
    (SYNTHETIC | {"tasks": []}, 422, "at least 1 item"),
    ({"data": {"source": "imagenet"}}, 422, "does not match any of the expected tags"),
    (SYNTHETIC | {"tasks": ["task9"]}, 422, "unknown primitive task(s): 'task9'"),
    (SYNTHETIC | {"oracle": {"arch": {"depth": 12, "kc": 1, "ks": 1}, "epochs": 1, "lr": 0.1}}, 422, "6n+4"),
    (SYNTHETIC | {"batch_size": 0}, 422, "greater than or equal to 1"),
    (SYNTHETIC | {"device": "tpu"}, 422, "pattern"),
    (SYNTHETIC | {"reuse": "library"}, 409, "imported from a bundle, which carries no oracle"),
])
def test_bad_extraction_requests(client, body, status, message):
    r = client.post("/admin/extractions", headers=ADMIN, json=body)
    assert r.status_code == status
    assert message in str(r.json()["detail"])


def test_data_paths_inside_the_roots(client, settings):
    root = settings.allowed_data_roots[0]
    (root / "cifar").mkdir(parents=True, exist_ok=True)
    (root / "escape").symlink_to("/etc")
    ok = client.post("/admin/extractions", headers=ADMIN, json={"data": {"source": "cifar100-npy",
                                                                         "path": "cifar"}})
    assert ok.status_code == 202
    assert ok.json()["request"]["data"]["path"] == str(root / "cifar")
    client.post(f"/admin/jobs/{ok.json()['id']}/cancel", headers=ADMIN)
    escape = client.post("/admin/extractions", headers=ADMIN, json={"data": {"source": "cifar100-npy",
                                                                             "path": "escape"}})
    assert escape.status_code == 422


def _onnx_classifier(path, classes):
    import torch

    from poe_core.nets import Network, WRNSpec

    torch.onnx.export(Network(WRNSpec(10, 1, 1), classes).eval(), torch.zeros(1, 3, 16, 16), str(path),
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                      dynamo=False)


def test_a_brought_oracle_is_checked_when_the_job_is_queued(client, settings):
    root = settings.allowed_data_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    _onnx_classifier(root / "theirs.onnx", 6)
    _onnx_classifier(root / "five.onnx", 5)
    (root / "junk.onnx").write_bytes(b"not a model")
    ok = client.post("/admin/extractions", headers=ADMIN, json=SYNTHETIC | {"oracle": {"file": "theirs.onnx"}})
    assert ok.status_code == 202, ok.text
    assert ok.json()["request"]["oracle"]["file"] == str(root / "theirs.onnx")
    client.post(f"/admin/jobs/{ok.json()['id']}/cancel", headers=ADMIN)
    for body, message in [
        ({"oracle": {"file": "junk.onnx"}}, "not an ONNX model"),
        ({"oracle": {"file": "five.onnx"}}, "a classifier over the 6 declared classes"),
        ({"oracle": {"file": "/etc/hostname"}}, "allowed data roots"),
        ({"oracle": {"file": "theirs.onnx"}, "reuse": "oracle"}, "use reuse=none"),
        ({"oracle": {"file": "theirs.onnx"}, "bank_views": 0}, "logit bank"),
        ({"oracle": {"classes": "theirs.txt"}}, "give its file too"),
    ]:
        r = client.post("/admin/extractions", headers=ADMIN, json=SYNTHETIC | body)
        assert r.status_code == 422 and message in str(r.json()["detail"]), (body, r.text)


def test_extraction_defaults_are_the_command_lines(client):
    from poe_core.recipe import ExtractionPlan

    r = client.post("/admin/extractions", headers=ADMIN, json=SYNTHETIC)
    stored = r.json()["request"]
    client.post(f"/admin/jobs/{r.json()['id']}/cancel", headers=ADMIN)
    from app.schemas import ExtractionRequest

    assert ExtractionRequest.model_validate({k: v for k, v in stored.items()}).plan() == ExtractionPlan()
