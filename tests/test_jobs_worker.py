"""Extraction jobs through real `poe worker` processes."""

import signal

from service_fixtures import ADMIN, start_worker, tiny_extraction, wait_for


def _job(client, job_id: int) -> dict:
    return client.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()


def test_extraction_end_to_end(fresh, tmp_path):
    settings, client, old = fresh
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        job = client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction(oracle_epochs=3)).json()
        assert job["status"] == "queued"
        seen = []

        def finished():
            state = _job(client, job["id"])
            seen.append((state["status"], state["progress"], state["phase"]))
            return state if state["status"] in ("succeeded", "failed", "cancelled") else None

        state = wait_for(finished, timeout=120, what="the job to finish")
        assert state["status"] == "succeeded", state["error"]
        running = [progress for status, progress, _ in seen if status == "running"]
        assert len(set(running)) >= 3 and running == sorted(running) and 0 < running[-1] < 100
        assert {phase for _, _, phase in seen} - {None}  # the job said which phase it was in
        # Every phase reported its epochs (polling alone can miss a phase of a fraction of a second).
        assert all(any(f"{p} epoch" in line for line in state["log"]) for p in ("oracle", "library", "experts"))
        assert state["progress"] == 100 and state["attempts"] == 1
        assert any("oracle epoch 3/3" in line for line in state["log"])
        new = state["pool_version"]
        assert new > old
        tasks = client.get("/tasks").json()
        assert tasks["pool_version"] == new and [t["name"] for t in tasks["tasks"]] == ["task0", "task1"]
        r = client.post("/models", json={"tasks": ["task1", "task0"]}, headers={"Accept": "application/json"})
        assert r.status_code == 200 and r.json()["pool_version"] == new
        pools = client.get("/admin/pools", headers=ADMIN).json()
        assert pools[0]["version"] == new and pools[0]["active"] and pools[0]["job_id"] == job["id"]
        assert pools[0]["reusable"] == ["oracle", "library"]
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_killed_worker_job_resumes_while_old_pool_serves(fresh, tmp_path):
    settings, client, old = fresh
    log = tmp_path / "worker.log"
    first = start_worker(settings, log)
    job = client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction(oracle_epochs=4)).json()
    try:
        wait_for(lambda: _job(client, job["id"])["progress"] > 0, timeout=90, what="training progress")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    killed = _job(client, job["id"])
    assert killed["status"] == "running" and killed["progress"] < 100
    assert client.get("/tasks").json()["pool_version"] == old
    assert client.post("/models", json={"tasks": ["task2"]}).status_code == 200

    second = start_worker(settings, log)
    try:
        def finished():
            served = client.get("/tasks").json()["pool_version"]
            if served != old:  # only the job's own pool may replace it
                pools = client.get("/admin/pools", headers=ADMIN).json()
                assert next(p["job_id"] for p in pools if p["version"] == served) == job["id"]
            state = _job(client, job["id"])
            return state if state["status"] in ("succeeded", "failed", "cancelled") else None

        state = wait_for(finished, timeout=120, interval=0.2, what="the resumed job to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    assert state["status"] == "succeeded", state["error"]
    assert state["attempts"] == 2
    assert any("stopped heartbeating" in line and "resume" in line for line in state["log"])
    assert client.get("/tasks").json()["pool_version"] == state["pool_version"] > old
