"""Bad input is a clear 4xx, never a 500; no pool is a 503 with the reason."""

import pytest
from fastapi.testclient import TestClient
from service_fixtures import make_settings

from app.main import create_app


@pytest.mark.parametrize("body, status, message", [
    ({"tasks": ["task0", "vehicles_9"]}, 422, "unknown primitive task(s): 'vehicles_9'; valid tasks: "
                                              "task0, task1, task2"),
    ({"tasks": ["task0", "task0"]}, 422, "listed more than once: task0"),
    ({"tasks": []}, 422, "the task list is empty"),
])
def test_bad_task_lists(client, body, status, message):
    r = client.post("/models", json=body)
    assert r.status_code == status
    assert message in r.json()["detail"]
    assert r.json()["valid_tasks"] == ["task0", "task1", "task2"]


@pytest.mark.parametrize("body", [
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


def test_not_json(client):
    r = client.post("/models", content=b"{tasks: [", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert "JSON" in r.json()["detail"][0]["msg"]


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
