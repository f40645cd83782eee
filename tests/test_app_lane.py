"""POST /models through a real server, as `poe serve` runs it (uvicorn, app.http's
protocol, uvloop): a file is answered by the protocol's lane, without ASGI, with the
bytes and headers the ASGI way gives, the request id, the metrics and the access line;
whatever the lane declines goes the ordinary way and is answered as ever."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import free_port

from app.http import Lane
from app.main import create_app

JSON = {"Accept": "application/json"}
SAME = ("content-type", "content-length", "etag", "cache-control", "x-model-id", "content-disposition")


@pytest.fixture(scope="module")
def served(settings, versions):
    """A real server on the session's store (the active version known for a second, as by
    default: with POE_ACTIVE_POOL_TTL=0 every request would go the ordinary way), and
    the answers of its lane: the value each call of the lane's handler returned."""
    app = create_app(settings.model_copy(update={"active_pool_ttl": 1.0}))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="app.http:HttpProtocol",
                                           loop="uvloop", log_level="warning", server_header=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        assert client.post("/models", json={"tasks": ["task0"]}).status_code == 200  # the pool loaded
        (key, lane), = app.http_lanes.items()
        answered: list[bool] = []

        def counted(headers, body, respond):  # the lane itself, its answers kept
            answered.append(lane.handle(headers, body, respond))
            return answered[-1]

        app.http_lanes = {key: Lane(counted, lane.max_body)}
        yield client, answered
    server.should_exit = True
    thread.join(30)


def _lane(answered: list[bool], ask):
    """What `ask()` answers, and whether the lane took it (None: the lane was not asked)."""
    before = len(answered)
    r = ask()
    taken = answered[before:]
    assert len(taken) <= 1
    return r, (taken[0] if taken else None)


def test_the_lane_answers_a_file_as_the_asgi_way_does(served, client):
    http, answered = served
    for body in ({"tasks": ["task2", "task0"]}, {"tasks": ["task1"], "options": {"softmax": True, "weights": "fp16"}},
                 {"classes": ["class1_0", "class0_1"]}, {"tasks": ["task0", "task1"], "options": {"fp16": True}}):
        for _ in range(2):  # assembled, then asked again
            r, took = _lane(answered, lambda body=body: http.post("/models", json=body))
            assert took is True and r.status_code == 200
            ordinary = client.post("/models", json=body)  # TestClient: the ASGI way
            assert r.content == ordinary.content
            assert {h: r.headers[h] for h in SAME} == {h: ordinary.headers[h] for h in SAME}
            assert r.headers["date"] and "server" not in r.headers
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    etag = r.headers["etag"]
    cached = http.get(f"/models/{r.headers['x-model-id']}/download", headers={"If-None-Match": etag})
    assert cached.status_code == 304 and cached.headers["etag"] == etag


def test_a_sane_request_id_is_kept_and_the_request_counted_and_logged(served, access_log):
    http, answered = served

    def samples():
        text = http.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    key = ("poe_http_request_duration_seconds_count", (("method", "POST"), ("route", "/models"), ("status", "200")))
    native = ("poe_native_lane_answers_total", ())
    first = samples()
    before, native_before = first.get(key, 0), first.get(native, 0)
    for i in range(3):
        r, took = _lane(answered, lambda i=i: http.post("/models", json={"tasks": ["task1", "task2"]},
                                                        headers={"X-Request-ID": f"lane-{i}"}))
        assert took is True and r.headers.get_list("x-request-id") == [f"lane-{i}"]
    r, took = _lane(answered, lambda: http.post("/models", json={"tasks": ["task1"]},
                                                headers={"X-Request-ID": "not sane"}))
    assert took is True and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    after = samples()
    assert after.get(key, 0) - before == 4  # the lane's requests, on the route the ordinary way counts them on
    assert after.get(native, 0) - native_before == 4  # plain queries all: joined in C (app.serving.native)
    lines = {line["request_id"]: line for line in access_log()}
    for i in range(3):
        line = lines[f"lane-{i}"]
        assert {k: line[k] for k in ("logger", "method", "path", "status")} == {
            "logger": "poe.access", "method": "POST", "path": "/models", "status": 200}
        assert 0 < line["duration_ms"] < 10_000


def test_what_the_lane_declines_is_answered_the_ordinary_way(served, client):
    http, answered = served
    body = {"tasks": ["task0", "task2"]}
    r, took = _lane(answered, lambda: http.post("/models", json=body, headers=JSON | {"X-Request-ID": "meta-1"}))
    assert took is False and r.headers["x-request-id"] == "meta-1"
    assert r.json() == client.post("/models", json=body, headers=JSON).json()
    r, took = _lane(answered, lambda: http.post("/models", json={"tasks": ["nope"]}, headers={"X-Request-ID": "bad-1"}))
    assert took is False and r.status_code == 422 and "nope" in json.dumps(r.json()["detail"])
    assert r.headers["x-request-id"] == "bad-1"
    r, took = _lane(answered, lambda: http.post("/models", content=b"{not json", headers={"Content-Type": "x"}))
    assert took is False and r.status_code == 422
    ort_body = {"tasks": ["task1"], "options": {"format": "ort"}}
    r, took = _lane(answered, lambda: http.post("/models", json=ort_body))
    assert took is False and r.status_code == 200 and r.headers["etag"].startswith('W/"')  # converted each time
    assert r.headers["etag"] == client.post("/models", json=ort_body).headers["etag"]
    r, took = _lane(answered, lambda: http.post("/models", content=iter([b'{"tasks": ', b'["task0"]}'])))
    assert took is None and r.status_code == 200  # chunked: not even offered to the lane
    size = client.app.state.settings.max_body_bytes + 1
    r, took = _lane(answered, lambda: http.post("/models", content=b" " * size))
    assert took is None and r.status_code == 413
