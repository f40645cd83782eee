"""How failures become HTTP answers: every error is JSON with a readable `detail`, bad
input is a 4xx, and an unexpected fault is a 500 that says nothing internal."""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.requests import ClientDisconnect

from app.jobs.admission import ExtractionRejected, ReuseUnavailable
from app.jobs.queue import JobConflict
from app.serving.models import ServerBusy
from app.serving.registry import PoolUnavailable
from app.store.pools import PoolNotFound
from poe_core.budget import BudgetError
from poe_core.formats import FormatUnavailable, Unavailable

log = logging.getLogger(__name__)


class NotFound(LookupError):
    pass


class InvalidTasks(ValueError):
    """A composite task the active pool cannot serve; the answer lists the valid tasks."""

    def __init__(self, message: str, valid: list[str]) -> None:
        super().__init__(message)
        self.extra = {"valid_tasks": valid}


# Domain errors raised below the routers, and the status each one means.
STATUS = {
    NotFound: 404,
    InvalidTasks: 422,
    PoolNotFound: 404,
    JobConflict: 409,
    ReuseUnavailable: 409,
    ExtractionRejected: 422,
    FormatUnavailable: 422,
    Unavailable: 422,  # a capability the pool lacks (widths, the student head), with the reason
    BudgetError: 422,
    PoolUnavailable: 503,
    ServerBusy: 503,
}


def install(app: FastAPI) -> None:
    for error, status in STATUS.items():
        app.add_exception_handler(error, _answer(status))
    for error in (OperationalError, InterfaceError):  # connection-level failures
        app.add_exception_handler(error, _database_down)
    app.add_exception_handler(ClientDisconnect, _gone)
    app.add_exception_handler(Exception, _unexpected)


def _answer(status: int):
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        headers = {"Retry-After": "30"} if status == 503 else None
        body = {"detail": str(exc), **getattr(exc, "extra", {})}
        return JSONResponse(body, status_code=status, headers=headers)

    return handler


async def _database_down(request: Request, exc: DBAPIError) -> JSONResponse:
    """The database failed under us (connection cut, server restarting): a 503 to retry,
    not a 500; reads were already retried once on a fresh connection."""
    log.error("%s %s: database error: %s", request.method, request.url.path, type(exc.orig).__name__)
    return JSONResponse({"detail": "the database is unavailable; retry shortly"}, status_code=503,
                        headers={"Retry-After": "5"})


async def _gone(_request: Request, _exc: ClientDisconnect) -> Response:
    """The client left before its body arrived: nobody reads an answer, nothing to log."""
    return Response(status_code=400)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """Refuse request bodies over `max_bytes`: by Content-Length before reading, and by
    counting while reading when the body is chunked."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    response = JSONResponse({"detail": str(BodyTooLarge(self.max_bytes).detail)}, 413)
                    return await response(scope, receive, send)
                break
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        return await self.app(scope, counted, send)
