from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServicesDep
from app.jobs.queue import live_workers
from app.schemas import Health, Readiness
from app.serving.registry import PoolUnavailable

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
def health() -> Health:
    return Health()


@router.get("/ready", response_model=Readiness,
            summary="Readiness: database reachable, a pool active (and a worker alive, if required)",
            responses={503: {"model": Readiness, "description": "Not ready; `reasons` says why"}})
def ready(services: ServicesDep):
    reasons = []
    database = services.db.ping()
    version = workers = None
    if not database:
        reasons.append("database unreachable")
    else:
        try:
            version = services.serving.pools.active().version
        except PoolUnavailable as e:
            reasons.append(str(e))
        settings = services.settings
        workers = live_workers(services.db, settings.stale_seconds)
        if settings.require_worker and not workers:
            reasons.append(f"no worker alive in the last {settings.stale_seconds:g} s: extraction jobs "
                           "would not run")
    body = Readiness(ready=not reasons, database=database, pool_version=version, workers=workers,
                     reasons=reasons)
    return body if body.ready else JSONResponse(body.model_dump(), status_code=503)
