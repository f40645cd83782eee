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
    """Request id, metrics and access log of every HTTP request (see the module's docstring),
    also of the requests app.http's lane answers without ASGI (`lane`)."""

    def __init__(self, app, fast_paths: dict[tuple[str, str], str] | None = None) -> None:
        self.app = app
        # Requests answered before routing (app.api.models.FastLane, app.http's lane): their route by (method, path).
        self.fast_paths = fast_paths or {}
        self._children: dict[tuple[str, str, int], Histogram] = {}

    @staticmethod
    def request_id(headers) -> str:
        """The request's own X-Request-ID when it is sane, else a new random one."""
        for name, value in headers:
            if name == b"x-request-id":
                if SANE_REQUEST_ID(value):
                    return value.decode()
                break
        # An id, not a secret: Mersenne Twister is 10x cheaper than urandom.
        return f"{random.getrandbits(128):032x}"

    def record(self, method: str, path: str, route: str | None, status: int, seconds: float) -> None:
        """One request's histogram observation and access log line (`route`: its template,
        None for "unmatched")."""
        label = method if method in METHODS else "other"
        key = (label, route or "unmatched", status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = HTTP_SECONDS.labels(label, key[1], str(status))
        TALLY.observe(child, seconds)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %d", label, path, status,
                     extra={"method": method, "path": path, "status": status,
                            "duration_ms": round(seconds * 1000, 3)})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        request_id = self.request_id(scope["headers"])
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
            method, path = scope["method"], scope["path"]
            route = self.fast_paths.get((method, path)) if "route" not in scope else None
            self.record(method, path, route or _template(scope), status, time.perf_counter() - started)
            REQUEST_ID.reset(token)

    def lane(self, method: str, path: str, answer):
        """The handler of an app.http.Lane: `answer(headers, body)` gives the status, header
        lines and body chunks of an answer, or None for the ordinary way; the handler adds
        the request id to the answer, and tallies and logs the request as __call__ does."""
        route = self.fast_paths[(method, path)]

        def handle(headers, body: bytes, respond) -> bool:
            started = time.perf_counter()
            request_id = self.request_id(headers)
            token = REQUEST_ID.set(request_id)
            try:
                answered = answer(headers, body)
                if answered is None:
                    return False
                status, head, chunks = answered
                respond(status, b"%sx-request-id: %s\r\n" % (head, request_id.encode()), chunks)
                self.record(method, path, route, status, time.perf_counter() - started)
                return True
            finally:
                REQUEST_ID.reset(token)

        return handle
