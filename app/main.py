"""The FastAPI application: create_app(settings) wires services, routers and errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from app import errors, telemetry, web
from app.api import admin, health, models, tasks
from app.http import Lane
from app.jobs.queue import recover_stale
from app.metrics import TALLY
from app.services import Services, admin_token
from app.settings import Settings
from app.telemetry import RequestTelemetry

log = logging.getLogger(__name__)

DESCRIPTION = """Pool of Experts: ask for a composite task (a set of primitive tasks) and get a
small ONNX model for it, assembled in milliseconds from a pool of distilled experts.
Admins run extractions (oracle -> library -> experts) as jobs and activate pool versions."""


async def _every(seconds: float, work, what: str) -> None:
    """Run `work` on a thread every `seconds`, logging (not raising) its failures."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(work)
        except Exception:
            log.exception("%s failed", what)


def _background(services: Services) -> list:
    """The periodic work of an API process: request counts to the database; tallied
    metrics added up (app.metrics.TALLY); the active
    pool version refreshed ahead of its TTL, so requests never wait for SQL; and stale
    jobs recovered, so a dead worker's job is queued again even when no worker polls."""
    settings = services.settings
    work = [(settings.stats_flush_seconds, services.serving.flush_counts, "writing request counts"),
            (1.0, TALLY.flush, "adding up metrics"),
            (settings.stale_seconds / 2, lambda: recover_stale(services.db, settings.stale_seconds,
                                                                settings.job_max_attempts),
             "recovering stale jobs")]
    if settings.active_pool_ttl > 0:
        work.append((settings.active_pool_ttl / 2, services.serving.pools.refresh, "reading the active pool"))
    return work


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    services = await run_in_threadpool(Services.start, settings)
    app.state.services = services
    app.state.admin_token = admin_token(settings)
    periodic = [asyncio.create_task(_every(*work)) for work in _background(services)]
    try:
        yield
    finally:
        for task in periodic:
            task.cancel()
        for task in periodic:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        TALLY.flush()
        await run_in_threadpool(services.close)


class PoeAPI(FastAPI):
    # What app.http's protocol may answer without ASGI: set with the middleware stack.
    http_lanes: dict[tuple[bytes, bytes], Lane] = {}

    def build_middleware_stack(self):
        # Outside Starlette's error handling, so a 500 is timed and logged, and carries its
        # request id, like any answer. FastLane answers POST /models before the rest of the
        # stack; what it cannot answer goes through it (body limit, error handlers, routing).
        max_bytes = self.state.settings.max_body_bytes
        lane = models.FastLane(super().build_middleware_stack(), max_bytes)
        telemetry = RequestTelemetry(lane, fast_paths={("POST", "/models"): "/models"})
        # Under `poe serve`, POST /models for a file is answered by the HTTP protocol itself,
        # with the same request id, metrics and access log; else it goes the ASGI way.
        self.http_lanes = {(b"POST", b"/models"): Lane(telemetry.lane("POST", "/models", partial(lane.file, self)),
                                                       max_bytes)}
        return telemetry


def create_app(settings: Settings | None = None) -> FastAPI:
    # app.web serves /docs and /redoc from npm packages, with no CDN
    # FastAPI's native OpenTelemetry is off: poe's own metrics are at /metrics, and its
    # check for configured providers costs more per request than a cached answer.
    app = PoeAPI(title="Pool of Experts", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                 docs_url=None, redoc_url=None, telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.settings = settings or Settings()
    errors.install(app)
    app.add_middleware(errors.BodySizeLimit, max_bytes=app.state.settings.max_body_bytes)
    for module in (health, telemetry, tasks, models, admin):
        app.include_router(module.router)
    web.mount(app)
    return app
