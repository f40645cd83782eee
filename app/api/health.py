from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServicesDep
from app.schemas import Health, Readiness
from app.store.pools import PoolUnavailable

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
def health() -> Health:
    return Health()


@router.get("/ready", response_model=Readiness, summary="Readiness: database reachable and a pool active",
            responses={503: {"model": Readiness, "description": "Not ready; `reasons` says why"}})
def ready(services: ServicesDep):
    reasons = []
    database = services.db.ping()
    version = None
    if not database:
        reasons.append("database unreachable")
    else:
        try:
            version = services.pools.active().version
        except PoolUnavailable as e:
            reasons.append(str(e))
    body = Readiness(ready=not reasons, database=database, pool_version=version, reasons=reasons)
    return body if body.ready else JSONResponse(body.model_dump(), status_code=503)
