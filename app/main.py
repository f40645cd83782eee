"""The FastAPI application: create_app(settings) wires services, routers and errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app import errors, web
from app.api import admin, health, models, tasks
from app.services import Services, admin_token
from app.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """Pool of Experts: ask for a composite task (a set of primitive tasks) and get a
small ONNX model for it, assembled in milliseconds from a pool of distilled experts.
Admins run extractions (oracle -> library -> experts) as jobs and activate pool versions."""


async def _flush_hits(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.stats_flush_seconds)
        try:
            await run_in_threadpool(services.models.flush_hits)
        except Exception:
            log.exception("writing model hit counts failed")


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    services = await run_in_threadpool(Services.start, settings)
    app.state.services = services
    app.state.admin_token = admin_token(settings)
    flusher = asyncio.create_task(_flush_hits(services))
    try:
        yield
    finally:
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await run_in_threadpool(services.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    # app.web serves /docs and /redoc from npm packages, with no CDN
    app = FastAPI(title="Pool of Experts", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings or Settings()
    errors.install(app)
    app.add_middleware(errors.BodySizeLimit, max_bytes=app.state.settings.max_body_bytes)
    for module in (health, tasks, models, admin):
        app.include_router(module.router)
    web.mount(app)
    return app
