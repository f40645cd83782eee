from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from app.deps import RowId, ServicesDep, SessionDep, SettingsDep, require_admin
from app.errors import NotFound
from app.jobs import queue
from app.jobs.admission import prepare
from app.jobs.custom_task import KIND as ADD_TASK
from app.jobs.custom_task import prepare_task
from app.schemas import Error, ExtractionRequest, JobOut, JobStatus, PoolOut, TaskRequest
from app.store.pools import activate_pool, active_version
from app.store.tables import Job, PoolVersion, TaskRequests
from poe_core.extract import phase_done

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses={401: {"model": Error, "description": "Missing or wrong admin token"}})


def job_out(job: Job) -> JobOut:
    return JobOut(
        id=job.id, kind=job.kind, status=job.status, progress=job.progress, phase=job.phase,
        attempts=job.attempts, worker=job.worker, error=job.error, cancel_requested=job.cancel_requested,
        pool_version=job.pool_version, request=job.request, log=job.log.splitlines() if job.log else [],
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        heartbeat_at=job.heartbeat_at,
    )


def _job(session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"no job {job_id}")
    return job


@router.post("/extractions", status_code=202, response_model=JobOut,
             summary="Queue an extraction: train oracle, library and experts into a new pool version",
             responses={400: {"model": Error, "description": "A body that is not UTF-8 JSON"},
                        409: {"model": Error, "description": "Nothing to reuse"},
                        422: {"description": "Bad request, data path outside POE_DATA_ROOTS"}})
def create_extraction(body: ExtractionRequest, session: SessionDep, settings: SettingsDep) -> JobOut:
    job = queue.enqueue(session, prepare(session, body, settings.allowed_data_roots))
    return job_out(job)


@router.post("/tasks", status_code=202, response_model=JobOut,
             summary="Queue a custom primitive task: its expert trained from the active pool's kept oracle, "
                     "added to a new pool version",
             responses={400: {"model": Error, "description": "A body that is not UTF-8 JSON"},
                        422: {"description": "Name taken, unknown or repeated classes, no classes, an active "
                                             "pool without a kept oracle, data not the pool's or outside "
                                             "POE_DATA_ROOTS"},
                        503: {"model": Error, "description": "No active pool can be loaded"}})
def create_task(body: TaskRequest, session: SessionDep, services: ServicesDep, settings: SettingsDep) -> JobOut:
    job = queue.enqueue(session, prepare_task(session, body, services.pools, settings.allowed_data_roots),
                        kind=ADD_TASK)
    return job_out(job)


@router.get("/jobs", response_model=list[JobOut], summary="Jobs, newest first")
def list_jobs(services: ServicesDep, status: Annotated[JobStatus | None, Query()] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[JobOut]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    return services.db.read(lambda session: [job_out(j) for j in session.scalars(query)])


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A job's status, progress and log",
            responses={404: {"model": Error}})
def get_job(job_id: RowId, services: ServicesDep) -> JobOut:
    return services.db.read(lambda session: job_out(_job(session, job_id)))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, summary="Cancel a queued or running job",
             responses={404: {"model": Error}, 409: {"model": Error, "description": "Already finished"}})
def cancel_job(job_id: RowId, session: SessionDep) -> JobOut:
    return job_out(queue.request_cancel(session, _job(session, job_id)))


def pool_out(session, pool: PoolVersion, active: int | None) -> PoolOut:
    work = pool.work_dir
    reusable = [p for p in ("oracle", "library") if work and phase_done(Path(work), p)]
    requests = dict(session.execute(select(TaskRequests.task, TaskRequests.requests)
                                    .where(TaskRequests.pool_version == pool.version)).all())
    return PoolOut(version=pool.version, pool_id=pool.pool_id, active=pool.version == active,
                   source=pool.source, job_id=pool.job_id, created_at=pool.created_at,
                   tasks=list(pool.manifest["experts"]), dataset=pool.manifest.get("dataset", {}),
                   reusable=reusable, requests=requests)


@router.get("/pools", response_model=list[PoolOut], summary="Pool versions, newest first")
def list_pools(services: ServicesDep) -> list[PoolOut]:
    def pools(session) -> list[PoolOut]:
        active = active_version(session)
        rows = session.scalars(select(PoolVersion).order_by(PoolVersion.version.desc()))
        return [pool_out(session, p, active) for p in rows]

    return services.db.read(pools)


@router.post("/pools/{version}/activate", response_model=PoolOut, summary="Serve this pool version",
             responses={404: {"model": Error}, 503: {"model": Error, "description": "Pool cannot be loaded"}})
def activate(version: RowId, services: ServicesDep) -> PoolOut:
    pools = services.serving.pools
    pools.get(version)  # loads and verifies it before any request is sent to it
    activate_pool(services.db, version)
    pools.forget_active()
    with services.db.session() as session:
        return pool_out(session, session.get(PoolVersion, version), version)
