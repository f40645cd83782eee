"""The job queue is the jobs table. These functions are its only writers.

Claiming uses SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL, so any number of workers
can poll one database; every state change is also guarded by a WHERE on the state it
expects, so a worker that lost its job (declared stale meanwhile) cannot overwrite it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.store.db import Database
from app.store.rows import worker_seen
from app.store.tables import Job, WorkerSeen, utcnow

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "cancelled")
LOG_LINES = 200  # recent log lines kept on a job row


class JobConflict(Exception):
    """A state change the job's current state does not allow."""


class JobLost(Exception):
    """This worker no longer owns the job (it was declared stale, or deleted)."""


def _stamp(line: str) -> str:
    return f"{utcnow():%Y-%m-%d %H:%M:%S} {line}"


def _appended(log_text: str, lines: list[str]) -> str:
    old = log_text.splitlines() if log_text else []
    return "\n".join((old + [_stamp(x) for x in lines])[-LOG_LINES:])


def enqueue(session: Session, request: dict, kind: str = "extraction") -> Job:
    job = Job(kind=kind, status="queued", request=request, log=_stamp("queued"), progress=0.0,
              attempts=0, cancel_requested=False)
    session.add(job)
    session.flush()
    return job


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one when its worker next checks."""
    if job.status in FINISHED:
        raise JobConflict(f"job {job.id} already {job.status}")
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
        job.log = _appended(job.log, ["cancelled before it started"])
    else:
        job.cancel_requested = True
        job.log = _appended(job.log, ["cancel requested"])
    session.flush()
    return job


def claim(db: Database, worker: str) -> Job | None:
    """Take the oldest queued job and mark it running for `worker`."""
    with db.session() as session:
        job = session.scalars(
            select(Job).where(Job.status == "queued").order_by(Job.id).limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if job is None:
            return None
        now = utcnow()
        claimed = session.execute(
            update(Job).where(Job.id == job.id, Job.status == "queued").values(
                status="running", worker=worker, attempts=Job.attempts + 1, heartbeat_at=now,
                started_at=job.started_at or now, phase=None,
                log=_appended(job.log, [f"attempt {job.attempts + 1} started by {worker}"]),
            )
        ).rowcount
        if not claimed:
            return None
        session.refresh(job)
        return job


def heartbeat(db: Database, job_id: int, worker: str) -> bool:
    """Record that `worker` is alive; return whether a cancel was requested."""
    with db.session() as session:
        owned = session.execute(
            update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
            .values(heartbeat_at=utcnow())
        ).rowcount
        if not owned:
            raise JobLost(f"job {job_id} is no longer run by {worker}")
        return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def report(db: Database, job_id: int, worker: str, *, progress: float | None = None,
           phase: str | None = None, lines: list[str] = ()) -> None:
    """Persist progress (0..100), the current phase and new log lines."""
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id, Job.worker == worker,
                                                Job.status == "running")).first()
        if job is None:
            raise JobLost(f"job {job_id} is no longer run by {worker}")
        if progress is not None:
            job.progress = round(max(job.progress, min(progress, 100.0)), 2)
        if phase is not None:
            job.phase = phase
        if lines:
            job.log = _appended(job.log, list(lines))
        job.heartbeat_at = utcnow()


def finish(db: Database, job_id: int, worker: str, status: str, *, error: str | None = None,
           pool_version: int | None = None, line: str | None = None) -> None:
    """End a running job: succeeded, failed, cancelled, or back to queued (to be resumed)."""
    with db.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id, Job.worker == worker,
                                                Job.status == "running")).first()
        if job is None:
            raise JobLost(f"job {job_id} is no longer run by {worker}")
        job.status = status
        job.error = error
        if pool_version is not None:
            job.pool_version = pool_version
        if status == "succeeded":
            job.progress = 100.0
        if status in FINISHED:
            job.finished_at = utcnow()
        if status == "queued":
            job.worker = None
        job.log = _appended(job.log, [line or status])


def alive(db: Database, worker: str) -> None:
    """Record that `worker` is running (polling, or running a job)."""
    with db.session() as session:
        worker_seen(session, worker)


def live_workers(db: Database, stale_seconds: float) -> int:
    """Workers that said they were alive within `stale_seconds`."""
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    return db.read(lambda session: session.scalar(
        select(func.count()).select_from(WorkerSeen).where(WorkerSeen.seen_at >= cutoff)))


def recover_stale(db: Database, stale_seconds: float, max_attempts: int,
                  now: datetime | None = None) -> list[Job]:
    """Running jobs whose worker stopped heartbeating: back to queued (resumed from their
    checkpoints by the next worker) while attempts remain, else failed with the reason.
    Any process may call this (workers and API processes do, periodically). Rows of
    silent workers are deleted too."""
    cutoff = (now or utcnow()) - timedelta(seconds=stale_seconds)
    recovered = []
    with db.session() as session:
        session.execute(delete(WorkerSeen).where(WorkerSeen.seen_at < cutoff))
        stale = session.scalars(
            select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)
            .with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            reason = (f"worker {job.worker} stopped heartbeating "
                      f"(last heartbeat {job.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC)")
            if job.cancel_requested:
                job.status, job.finished_at = "cancelled", utcnow()
                line = f"{reason}; cancelled as requested"
            elif job.attempts < max_attempts:
                job.status = "queued"
                line = f"{reason}; queued again to resume from its checkpoint"
            else:
                job.status, job.finished_at = "failed", utcnow()
                job.error = f"{reason} on attempt {job.attempts} of {max_attempts}"
                line = job.error
            job.worker = None
            job.log = _appended(job.log, [line])
            log.warning("job %d: %s", job.id, line)
            recovered.append(job)
    return recovered
