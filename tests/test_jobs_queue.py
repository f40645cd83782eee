"""The job queue's state changes, and the worker loop run in this process."""

import threading
from datetime import timedelta

import pytest
from service_fixtures import ADMIN, make_settings, tiny_extraction, wait_for

from app.jobs import queue
from app.jobs.worker import Worker
from app.services import Services
from app.store.pools import import_pool
from app.store.tables import Job, utcnow


@pytest.fixture
def store(databases, tmp_path):
    services = Services.start(make_settings(databases, tmp_path))
    yield services
    services.close()


def _enqueue(store, n=1) -> list[int]:
    with store.db.session() as session:
        return [queue.enqueue(session, {"n": i}).id for i in range(n)]


def _get(store, job_id) -> Job:
    with store.db.session() as session:
        return session.get(Job, job_id)


def test_claim_takes_the_oldest_once(store):
    first, second = _enqueue(store, 2)
    assert queue.claim(store.db, "w1").id == first
    assert queue.claim(store.db, "w2").id == second
    assert queue.claim(store.db, "w3") is None
    job = _get(store, first)
    assert (job.status, job.worker, job.attempts) == ("running", "w1", 1)


def test_only_the_owner_reports(store):
    (job_id,) = _enqueue(store)
    queue.claim(store.db, "w1")
    queue.report(store.db, job_id, "w1", progress=12.5, phase="oracle", lines=["epoch 1"])
    with pytest.raises(queue.JobLost):
        queue.report(store.db, job_id, "w2", progress=50)
    with pytest.raises(queue.JobLost):
        queue.heartbeat(store.db, job_id, "w2")
    job = _get(store, job_id)
    assert (job.progress, job.phase) == (12.5, "oracle") and job.log.endswith("epoch 1")


def test_cancel_reaches_the_worker_through_the_heartbeat(store):
    (job_id,) = _enqueue(store)
    queue.claim(store.db, "w1")
    assert queue.heartbeat(store.db, job_id, "w1") is False
    with store.db.session() as session:
        queue.request_cancel(session, session.get(Job, job_id))
    assert queue.heartbeat(store.db, job_id, "w1") is True


def test_stale_jobs_resume_then_fail(store):
    (job_id,) = _enqueue(store)
    queue.claim(store.db, "w1")
    later = utcnow() + timedelta(seconds=10)
    assert queue.recover_stale(store.db, stale_seconds=60, max_attempts=2, now=later) == []
    much_later = utcnow() + timedelta(seconds=120)
    assert [j.id for j in queue.recover_stale(store.db, 60, 2, now=much_later)] == [job_id]
    assert _get(store, job_id).status == "queued"
    assert queue.claim(store.db, "w2").attempts == 2
    queue.recover_stale(store.db, 60, 2, now=utcnow() + timedelta(seconds=120))
    job = _get(store, job_id)
    assert job.status == "failed"
    assert "worker w2 stopped heartbeating" in job.error and "attempt 2 of 2" in job.error
    with pytest.raises(queue.JobLost):
        queue.finish(store.db, job_id, "w2", "succeeded")


def test_reuse_the_oracle_and_library_of_the_active_pool(fresh, work_dir, second_pool):
    settings, client, _ = fresh
    services = client.app.state.services
    version = import_pool(services.db, services.blobs, second_pool.root, source="extraction",
                          work_dir=str(work_dir), activate=True)
    request = tiny_extraction(reuse="library", tasks=["task2"])
    r = client.post("/admin/extractions", headers=ADMIN, json=request)
    assert r.status_code == 202, r.json()
    assert r.json()["request"]["reuse_from"]["pool_version"] == version
    Worker(services).run(once=True)
    job = client.get(f"/admin/jobs/{r.json()['id']}", headers=ADMIN).json()
    assert job["status"] == "succeeded", job["error"]
    assert any("reusing oracle, library of pool version" in line for line in job["log"])
    assert not any("oracle epoch" in line or "library epoch" in line for line in job["log"])
    assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["task2"]


def test_cancel_a_running_job(fresh):
    settings, client, old = fresh
    services = client.app.state.services
    job = client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction(oracle_epochs=50)).json()
    worker = Worker(services)
    thread = threading.Thread(target=worker.run, kwargs={"once": True})
    thread.start()
    try:
        wait_for(lambda: _get(services, job["id"]).status == "running", timeout=30, what="the job to start")
        assert client.post(f"/admin/jobs/{job['id']}/cancel", headers=ADMIN).json()["cancel_requested"]
        wait_for(lambda: _get(services, job["id"]).status == "cancelled", timeout=30, what="the cancel")
    finally:
        worker.stopping.set()
        thread.join(30)
    assert not (settings.work_dir / f"job-{job['id']}").exists()
    assert client.get("/tasks").json()["pool_version"] == old


def test_a_job_whose_pool_was_imported_just_finishes(fresh, second_pool):
    """A worker that died between importing the pool and marking the job succeeded."""
    settings, client, _ = fresh
    services = client.app.state.services
    job = client.post("/admin/extractions", headers=ADMIN, json=tiny_extraction()).json()
    version = import_pool(services.db, services.blobs, second_pool.root, source="job", job_id=job["id"])
    Worker(services).run(once=True)
    done = client.get(f"/admin/jobs/{job['id']}", headers=ADMIN).json()
    assert (done["status"], done["pool_version"]) == ("succeeded", version)
    assert not any("phase oracle" in line for line in done["log"])
