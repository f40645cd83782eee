"""Operating the service: Prometheus metrics (GET /metrics), request ids and the access log.

RequestTelemetry is a plain ASGI middleware around the whole application (outside
Starlette's error handling, so a 500 is timed, logged and answered with its id too):
per request it reads or makes the X-Request-ID, adds it to the answer, tallies one
histogram observation (app.metrics.TALLY: added to the histogram once a second) and
writes one JSON log line, a few microseconds in all. The request count is the histogram's `_count`.

Metrics updated as things happen are app.metrics'. What the database knows (jobs by
state) and which pool version is active are read when /metrics is scraped. No setting, token, URL or path is
ever a label or a value.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from starlette.routing import Mount

from app.logs import REQUEST_ID
from app.metrics import HTTP_SECONDS, TALLY
from app.store.tables import Job

log = logging.getLogger("poe.access")

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Printable, no spaces or quotes, bounded: what nginx's $request_id and common tracing ids look like.
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}").fullmatch

router = APIRouter(tags=["health"])


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class ServiceState:
    """A Prometheus collector of what is read at scrape time: the active pool version and
    the jobs by state (one small SQL count; left out while the database is unreachable)."""

    def __init__(self, services) -> None:
        self.services = services

    def collect(self):
        pools = self.services.serving.pools
        active = GaugeMetricFamily("poe_active_pool_version", "The pool version this process serves",
                                   labels=["pool_id"])
        try:
            version = pools.active_version()
        except DBAPIError:
            version = None
        if version is not None:
            served = pools.loaded(version)
            active.add_metric([served.pool_id if served else ""], version)
        yield active
        try:
            counts = self.services.db.read(lambda s: dict(s.execute(
                select(Job.status, func.count()).group_by(Job.status)).all()))
        except DBAPIError:
            return
        jobs = GaugeMetricFamily("poe_jobs", "Jobs in the jobs table by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format (not in the OpenAPI schema: it is for the scraper)."""
    TALLY.flush()  # this process's; the others' are at most a second behind
    state = CollectorRegistry(auto_describe=False)
    state.register(ServiceState(request.app.state.services))
    if _multiprocess_dir():
        live = CollectorRegistry()
        MultiProcessCollector(live)
    else:
        live = REGISTRY
    return Response(generate_latest(live) + generate_latest(state), media_type=CONTENT_TYPE_LATEST)


def _template(scope) -> str:
    """The route template a request matched: a bounded label whatever paths clients send."""
    route = scope.get("route")
    if route is None:
        return "unmatched"
    if isinstance(route, Mount):
        return f"{route.path}/{{path}}"
    return route.path


class RequestTelemetry:
    """Request id, metrics and access log of every HTTP request (see the module's docstring)."""

    def __init__(self, app, fast_paths: dict[tuple[str, str], str] | None = None) -> None:
        self.app = app
        # Requests answered before routing (app.api.models.FastLane): their route by (method, path).
        self.fast_paths = fast_paths or {}
        self._children: dict[tuple[str, str, int], Histogram] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if SANE_REQUEST_ID(value):
                    request_id = value.decode()
                break
        if request_id is None:  # an id, not a secret: Mersenne Twister is 10x cheaper than urandom
            request_id = f"{random.getrandbits(128):032x}"
        header = (b"x-request-id", request_id.encode())
        token = REQUEST_ID.set(request_id)
        status = 500  # unless an answer starts

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = self.fast_paths.get((method, scope["path"])) if "route" not in scope else None
            route = route or _template(scope)
            key = (method, route, status)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = HTTP_SECONDS.labels(method, route, str(status))
            TALLY.observe(child, seconds)
            if log.isEnabledFor(logging.INFO):
                log.info("%s %s %d", method, scope["path"], status,
                         extra={"method": scope["method"], "path": scope["path"], "status": status,
                                "duration_ms": round(seconds * 1000, 3)})
            REQUEST_ID.reset(token)
