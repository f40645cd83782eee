"""What survives a dead worker: any process recovers its job, and /ready says no worker
is alive when one is required."""

from fastapi.testclient import TestClient
from service_fixtures import ADMIN, make_settings, start_worker, tiny_extraction, wait_for

from app.jobs import queue
from app.main import create_app


def test_the_api_recovers_a_dead_workers_job(fresh):
    settings, client, _ = fresh
    job = client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction()).json()
    db = client.app.state.services.db
    assert queue.claim(db, "lost-host:1").id == job["id"]  # a worker that then dies without a word

    def requeued():
        state = client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()
        return state if state["status"] == "queued" else None

    state = wait_for(requeued, timeout=20, interval=0.2, what="the API to recover the stale job")
    assert any("stopped heartbeating" in line for line in state["log"])


def test_ready_reports_a_missing_worker_when_one_is_required(databases, tmp_path, pool):
    settings = make_settings(databases, tmp_path, require_worker=True, default_pool=str(pool.root))
    with TestClient(create_app(settings)) as client:
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["workers"] == 0
        assert "no worker alive" in r.json()["reasons"][0]
        worker = start_worker(settings, tmp_path / "worker.log")
        try:
            wait_for(lambda: client.get("/ready").status_code == 200, timeout=60, interval=0.2,
                     what="the worker to say it is alive")
            assert client.get("/ready").json()["workers"] == 1
        finally:
            worker.terminate()
            worker.wait(30)
