"""Bad input is a clear 4xx, never a 500; no pool is a 503 with the reason."""

import pytest
from fastapi.testclient import TestClient
from service_fixtures import ADMIN, make_settings

from app.main import create_app


@pytest.mark.parametrize("body, status, message", [
    ({"tasks": ["task0", "vehicles_9"]}, 422, "unknown primitive task(s): 'vehicles_9'; valid tasks: "
                                              "task0, task1, task2"),
    ({"tasks": ["task0", "task0"]}, 422, "listed more than once: task0"),
])
def test_bad_task_lists(client, body, status, message):
    r = client.post("/models", json=body)
    assert r.status_code == status
    assert message in r.json()["detail"]
    assert r.json()["valid_tasks"] == ["task0", "task1", "task2"]


@pytest.mark.parametrize("body", [
    {"tasks": []},  # the schema says minItems: 1
    {"tasks": "task0"},
    {"tasks": [1, 2]},
    {"tasks": [["task0"]]},
    {},
    {"tasks": ["task0"], "options": {"softmax": "very"}},
    {"tasks": ["task0"], "options": {"quantize": True}},
    {"tasks": ["task0"], "extra": 1},
    ["task0"],
    "task0",
])
def test_wrong_types(client, body):
    r = client.post("/models", json=body)
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"]


@pytest.mark.parametrize("body", [b"{tasks: [", b"\xff\xfe\x00", b""])
def test_not_json_is_the_documented_422(client, body):
    r = client.post("/models", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["detail"][0]["msg"]
    assert "422" in client.get("/openapi.json").json()["paths"]["/models"]["post"]["responses"]


def test_oversized_body(client, settings):
    huge = {"tasks": ["task0"] * (settings.max_body_bytes // 8)}
    r = client.post("/models", json=huge)
    assert r.status_code == 413
    assert "larger than" in r.json()["detail"]


def test_oversized_chunked_body(client, settings):
    def chunks():
        yield b'{"tasks": ['
        for _ in range(settings.max_body_bytes // 1000 + 1):
            yield b'"task0",' * 125
        yield b'"task0"]}'

    r = client.post("/models", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_unknown_task_page(client):
    r = client.get("/tasks/nope")
    assert r.status_code == 404
    assert "valid tasks: task0, task1, task2" in r.json()["detail"]


def test_wrong_method_and_path(client):
    assert client.delete("/models/abc").status_code == 405
    assert client.get("/no/such/page").status_code == 404
    for path, allowed in [("/models", "POST"), ("/tasks", "GET"), ("/admin/extractions", "POST")]:
        r = client.options(path)  # the API's answer, not the page's static files
        assert (r.status_code, r.headers["allow"], r.json()) == (405, allowed, {"detail": "Method Not Allowed"})
    assert client.post("/index.html").status_code in (404, 405)


def test_no_active_pool_is_503(databases, tmp_path):
    with TestClient(create_app(make_settings(databases, tmp_path))) as empty:
        r = empty.post("/models", json={"tasks": ["task0"]})
        assert r.status_code == 503
        assert "no active pool" in r.json()["detail"]
        assert empty.get("/tasks").status_code == 503
        ready = empty.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False and "no active pool" in ready.json()["reasons"][0]
        assert empty.get("/health").status_code == 200


@pytest.mark.parametrize("method, path", [
    ("GET", "/admin/jobs/82069590497758789632"), ("POST", "/admin/jobs/82069590497758789632/cancel"),
    ("GET", "/admin/jobs/2147483648"), ("POST", "/admin/jobs/2147483648/cancel"),
    ("POST", "/admin/pools/2147483648/activate"), ("POST", "/admin/pools/-1/activate"),
    ("GET", "/admin/jobs/0"),
])
def test_ids_out_of_the_column_range_are_422(client, method, path):
    r = client.request(method, path, headers=ADMIN)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "path"


def test_ids_in_range_that_name_nothing_are_404(client):
    assert client.get("/admin/jobs/2147483647", headers=ADMIN).status_code == 404
    assert client.post("/admin/jobs/2147483647/cancel", headers=ADMIN).status_code == 404
    assert client.post("/admin/pools/2147483647/activate", headers=ADMIN).status_code == 404


def test_job_status_filter_is_checked(client):
    r = client.get("/admin/jobs?status=bogus", headers=ADMIN)
    assert r.status_code == 422 and "queued" in r.json()["detail"][0]["msg"]
    assert client.get("/admin/jobs?status=failed", headers=ADMIN).status_code == 200


@pytest.mark.parametrize("data", [
    {"source": "cifar100-npy", "path": "ok\u0000/x"},
    {"source": "image-folder", "path": "ok", "hierarchy": "h\u0000.json"},
    {"source": "cifar100-npy", "path": "x" * 300},  # longer than a file name may be
])
def test_paths_the_file_system_cannot_take_are_422(client, data):
    r = client.post("/admin/extractions", headers=ADMIN, json={"data": data})
    assert r.status_code == 422


def test_messages_do_not_show_server_paths(client, settings, databases, tmp_path):
    with TestClient(create_app(make_settings(databases, tmp_path))) as empty:
        for r in (empty.get("/ready"), empty.post("/models", json={"tasks": ["task0"]})):
            assert r.status_code == 503 and str(tmp_path) not in r.text
    assert str(settings.data_dir.resolve()) not in client.get("/ready").text
