"""Dependencies of the routers: services, settings, a database session, the pool
version a request is served from, and the admin check."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from app.services import Services
from app.serving.registry import ServedPool
from app.settings import Settings


# async: FastAPI would run a plain function in a worker thread, a hop per request.
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_settings(services: ServicesDep) -> Settings:
    return services.settings


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.db.session() as session:
        yield session


async def get_served_pool(services: ServicesDep) -> ServedPool:
    """The active pool version, taken once: the whole request is served from it. Known in
    memory almost always; a thread reads the database or loads the pool otherwise."""
    pools = services.serving.pools
    return pools.active_if_fresh() or await run_in_threadpool(pools.active)


SettingsDep = Annotated[Settings, Depends(get_settings)]
# Ids of rows (jobs, pool versions) are 32-bit integer columns: larger ones name nothing,
# and must not reach PostgreSQL, which refuses them with an error.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]
SessionDep = Annotated[Session, Depends(get_session)]
ServedPoolDep = Annotated[ServedPool, Depends(get_served_pool)]

bearer = HTTPBearer(auto_error=False, description="POE_ADMIN_TOKEN (or the generated admin-token file)")


def require_admin(request: Request,
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    expected = request.app.state.admin_token
    challenge = {"WWW-Authenticate": "Bearer"}
    if expected is None:
        raise HTTPException(401, "the admin API is disabled: set POE_ADMIN_TOKEN", headers=challenge)
    if credentials is None:
        raise HTTPException(401, "admin token required: send Authorization: Bearer <token>",
                            headers=challenge)
    if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(401, "wrong admin token", headers=challenge)
