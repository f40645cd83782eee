"""GET /metrics, X-Request-ID and the JSON access log, through the real application."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import ADMIN, ADMIN_TOKEN, make_settings, tiny_extraction

from app.main import create_app

ONNX_JSON = {"Accept": "application/json"}


def _samples(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_answer_has_a_request_id_taken_when_sane(client):
    answers = [client.get("/health"), client.get("/no/such/path"), client.post("/models", json={"tasks": []}),
               client.post("/models", json={"tasks": ["task0"]}),
               client.post("/models", content=b"x" * (client.app.state.settings.max_body_bytes + 1)),
               client.get("/admin/jobs")]
    assert [r.status_code for r in answers] == [200, 404, 422, 200, 413, 401]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)
    given = "nginx-5f2c1a9e0b7d4c3a"
    for path in ("/health", "/models"):
        r = client.request("POST" if path == "/models" else "GET", path, headers={"X-Request-ID": given},
                           json={"tasks": ["task1"]})
        assert r.headers.get_list("x-request-id") == [given]
    for insane in ("has spaces", "x" * 129, "quote\"d"):
        r = client.get("/health", headers={"X-Request-ID": insane})
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])


def test_access_log_is_one_json_object_per_request(client, access_log):
    client.get("/health", headers={"X-Request-ID": "req-1"})
    client.post("/models", json={"tasks": ["task0", "task1"]}, headers={"X-Request-ID": "req-2"})
    client.get("/models/nonsense", headers={"X-Request-ID": "req-3"})
    lines = {line["request_id"]: line for line in access_log()}
    assert {k: lines["req-2"][k] for k in ("method", "path", "status", "logger", "level")} == {
        "method": "POST", "path": "/models", "status": 200, "logger": "poe.access", "level": "info"}
    assert lines["req-1"]["path"] == "/health" and lines["req-3"]["status"] == 404
    assert all(0 < line["duration_ms"] < 10_000 for line in lines.values())


def test_a_500_is_logged_counted_and_answered_with_its_id(fresh, monkeypatch, access_log):
    settings, client, _ = fresh
    served = client.app.state.services.serving.pools.active()

    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(served.assembler, "assemble", broken)
    c = TestClient(client.app, raise_server_exceptions=False)  # the same app, its lifespan running already
    before = _value(_samples(c), "poe_http_request_duration_seconds_count", method="POST", route="/models",
                    status="500")
    r = c.post("/models", json={"tasks": ["task2"]}, headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json() == {"detail": "internal error; see the server log"}
    after = _value(_samples(c), "poe_http_request_duration_seconds_count", method="POST", route="/models",
                   status="500")
    assert after == before + 1
    assert [line["status"] for line in access_log() if line["request_id"] == "boom-1"] == [500]


def test_metrics_count_requests_by_route_template_assembly_and_cache(fresh):
    settings, client, version = fresh
    before = _samples(client)
    body = {"tasks": ["task0", "task2"]}
    for _ in range(3):
        assert client.post("/models", json=body).status_code == 200
    model = client.post("/models", json=body, headers=ONNX_JSON).json()
    for _ in range(2):
        assert client.get(f"/models/{model['id']}/download").status_code == 200
    client.get("/no/such/path")
    after = _samples(client)

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    count = "poe_http_request_duration_seconds_count"
    assert delta(count, method="POST", route="/models", status="200") == 4
    assert delta(count, method="GET", route="/models/{model_id}/download", status="200") == 2
    assert delta(count, method="GET", route="unmatched", status="404") + delta(
        count, method="GET", route="/{path}", status="404") == 1
    assert delta("poe_model_cache_requests_total", result="miss") == 1  # a new app: its cache was empty
    assert delta("poe_model_cache_requests_total", result="hit") == 5
    assert delta("poe_model_assembly_seconds_count") == 1
    assert 0 < delta("poe_model_assembly_seconds_sum") < 1
    served = client.app.state.services.serving.pools.active()
    assert _value(after, "poe_active_pool_version", pool_id=served.pool_id) == version
    assert {s: _value(after, "poe_jobs", state=s) for s in ("queued", "running")} == {"queued": 0, "running": 0}
    job = client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction())
    assert job.status_code == 202
    assert _value(_samples(client), "poe_jobs", state="queued") == 1


def test_metrics_never_show_secrets(databases, tmp_path, pool):
    password = "db-pass-9f81c2"
    url = databases.new()
    if url.startswith("postgresql"):  # trust authentication: the password is carried, not checked
        url = url.replace("postgres@", f"postgres:{password}@", 1)
    settings = make_settings(databases, tmp_path / "data", database_url=url)
    with TestClient(create_app(settings)) as client:
        client.get("/ready")
        client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction())
        text = client.get("/metrics").text
    assert "poe_jobs" in text and "poe_http_request_duration_seconds" in text
    for secret in (ADMIN_TOKEN, password, str(tmp_path)):
        assert secret not in text


def test_tallied_metrics_add_up_to_what_direct_updates_give():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from app.metrics import Tally

    bounds = (0.001, 0.01, 0.1, 1.0)
    amounts = [0.0, 0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 1.0, 3.0, 0.01, 7.5]  # bounds and +Inf included
    texts = []
    for tallied in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h_seconds", "h", ["route"], buckets=bounds, registry=registry)
        counter = Counter("c", "c", ["result"], registry=registry)
        tally = Tally()
        for i, amount in enumerate(amounts):
            child = histogram.labels("/a" if i % 3 else "/b")
            if tallied:
                tally.observe(child, amount)
                tally.inc(counter.labels("hit"))
            else:
                child.observe(amount)
                counter.labels("hit").inc()
        if tallied:
            assert b'h_seconds_count{route="/a"} 0.0' in generate_latest(registry)  # nothing added before flush
            tally.flush()
            tally.flush()  # a second flush adds nothing more
        texts.append(b"\n".join(line for line in generate_latest(registry).splitlines()
                                 if not line.startswith(b"#") and b"_created" not in line))
    assert texts[0] == texts[1]
    assert b'h_seconds_count{route="/a"} 8.0' in texts[1] and b'c_total{result="hit"} 12.0' in texts[1]
