"""The HTTP/1.1 protocol `poe serve` runs uvicorn with: uvicorn's own (httptools, on
uvloop), except that an answer's head goes out with its body, in one system call.

uvicorn writes the status line and headers with one transport.write and the body with
another, and uvloop sends each at once: two send calls per answer, and the head alone
in a segment of its own, so the client wakes up twice. HeadWithBody holds a small write
(an answer's head) until the next write or the end of the event loop's current
iteration, whichever comes first, and sends both with writelines: one writev, no copy
of the body. Bytes keep their order and nothing waits beyond the iteration that wrote
it, so an answer without a body (HEAD, 304) or a 100 Continue still goes out at once.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through HeadWithBody."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))
