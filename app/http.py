"""The HTTP/1.1 protocol `poe serve` runs uvicorn with: uvicorn's own (httptools, on
uvloop), except that an answer's head goes out with its body, in one system call, and
that the application may answer some requests itself, synchronously, from the parser's
callback (a lane), without an ASGI task.

uvicorn writes the status line and headers with one transport.write and the body with
another, and uvloop sends each at once: two send calls per answer, and the head alone
in a segment of its own, so the client wakes up twice. HeadWithBody holds a small write
(an answer's head) until the next write or the end of the event loop's current
iteration, whichever comes first, and sends both with writelines: one writev, no copy
of the body. Bytes keep their order and nothing waits beyond the iteration that wrote
it, so an answer without a body (HEAD, 304) or a 100 Continue still goes out at once.

Lanes: the application (or what uvicorn wraps it in) has `http_lanes`, a dict of
(method, raw path) -> Lane. A request to one of them, HTTP/1.1, with a Content-Length
within the lane's limit, no Transfer-Encoding, no Expect: 100-continue, no upgrade,
while no other answer of the connection is pending or held up by a slow reader, has its
body gathered by the protocol; when it is complete, the lane's handler answers it (its
head and body chunks written with one writelines: one writev, the chunks not joined)
or declines, and then the request goes the ordinary way, to the ASGI application, as
if it had just arrived whole. What a lane saves is what ASGI costs per request: the
task, the request-response cycle, the messages, the middleware calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

# Writes up to this size wait for the next one: an answer's head, never a model file.
HOLD_BYTES = 16384


class HeadWithBody:
    """A transport that sends a small write together with the write after it (see the
    module's docstring); everything else is the wrapped transport's."""

    __slots__ = ("transport", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._held: bytes | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self.transport.writelines((held, data))
        elif len(data) <= HOLD_BYTES:
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def writelines(self, chunks) -> None:
        self.flush()
        self.transport.writelines(chunks)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            # A connection lost meanwhile (reset, abort) takes the head with it, as it would
            # have taken a head written at once; writing to it would raise in the loop.
            if not self.transport.is_closing():
                self.transport.write(held)

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:  # asked per request: not through __getattr__, which comes after an AttributeError
        return self.transport.is_closing()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


# respond(status, header lines, body chunks): writes a whole answer.
Respond = Callable[[int, bytes, Sequence[bytes]], None]


@dataclass(frozen=True)
class Lane:
    """A request the application answers in the parser's callback (see the module's
    docstring). `handle(headers, body, respond)` calls `respond` once and returns True,
    or returns False, having written nothing, to send the request the ordinary way.
    Header lines are "name: value" and CRLF each, Content-Length among them; the protocol
    adds the status line, the server's own headers (Date) and Connection: close when it
    closes the connection after the answer."""

    handle: Callable[[list[tuple[bytes, bytes]], bytes, Respond], bool]
    max_body: int


def _lanes_holder(app):
    """The object whose `http_lanes` the protocol reads, under the wrappers uvicorn puts
    around the application (each keeps it as `.app`), or None."""
    for _ in range(16):
        if app is None or hasattr(app, "http_lanes"):
            return app
        app = getattr(app, "app", None)
    return None


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through HeadWithBody, with lanes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._holder = _lanes_holder(self.app)
        self._lane: Lane | None = None  # the lane of the request being read
        self._lane_body = b""
        self._closing = False  # shutdown came while a lane's request was being read
        self._written = False
        self._defaults: tuple[object, bytes] = (None, b"")  # server_state.default_headers, as lines

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lane = None
        self._lane_body = b""
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._lane is None:
            super().shutdown()
        else:  # answered first, as uvicorn lets a running answer finish, then closed
            self._closing = True

    def _lane_of_request(self) -> Lane | None:
        lanes = getattr(self._holder, "http_lanes", None)
        if not lanes:
            return None
        lane = lanes.get((self.parser.get_method(), self.url))
        if (lane is None or self.expect_100_continue or self.pipeline or self.limit_concurrency is not None
                or (self.cycle is not None and not self.cycle.response_complete) or self.flow.write_paused
                or self.parser.get_http_version() != "1.1" or self.parser.should_upgrade()):
            return None
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                if length is not None:
                    return None
                length = value
            elif name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or int(length) > lane.max_body:
            return None
        return lane

    def on_headers_complete(self) -> None:
        self._lane = self._lane_of_request()
        if self._lane is None:
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._lane is None:
            super().on_body(body)
        else:
            self._lane_body += body

    def on_message_complete(self) -> None:
        lane = self._lane
        if lane is None:
            return super().on_message_complete()
        body, self._lane, self._lane_body = self._lane_body, None, b""
        if not self.transport.is_closing():
            keep_alive = not self._closing and self.parser.should_keep_alive()
            self._written = False
            try:
                if lane.handle(self.headers, body, partial(self._respond, keep_alive)):
                    return
            except Exception:
                log.exception("lane %s %s failed", self.parser.get_method().decode(), self.url.decode("latin-1"))
                if self._written:
                    self.transport.close()
                    return
        # The ordinary way: to the ASGI application, as if the request had just arrived whole.
        super().on_headers_complete()
        if self._closing:
            self.cycle.keep_alive = False
        if body:
            super().on_body(body)
        super().on_message_complete()

    def _respond(self, keep_alive: bool, status: int, head: bytes, chunks: Sequence[bytes]) -> None:
        self._written = True
        source, lines = self._defaults
        if source is not self.server_state.default_headers:  # a new Date every second
            source = self.server_state.default_headers
            lines = b"".join([b"%s: %s\r\n" % header for header in source])
            self._defaults = (source, lines)
        end = b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
        self.transport.writelines([STATUS_LINE[status] + lines + head + end, *chunks])
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
