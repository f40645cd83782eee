"""app.http: the protocol `poe serve` runs uvicorn with sends an answer's head with its
body, and answers everything as uvicorn does."""

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn
import uvloop
from service_fixtures import free_port

from app.http import HeadWithBody, Lane

BODY = bytes(range(256)) * 1200  # 300 kB, as a model file


def _pending(sock: socket.socket) -> bytes:
    """What has arrived on `sock` so far, without waiting."""
    try:
        return sock.recv(1 << 20)
    except BlockingIOError:
        return b""


def test_a_head_waits_for_its_body_and_goes_out_with_it():
    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        held = HeadWithBody(transport, loop)
        held.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n")
        assert _pending(theirs) == b""  # not sent alone
        held.write(b"abc")
        await asyncio.sleep(0.05)
        assert _pending(theirs) == b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
        # A head with no body after it (HEAD, 304, 100 Continue) leaves in the same loop iteration.
        held.write(b"HTTP/1.1 304 Not Modified\r\n\r\n")
        await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert _pending(theirs) == b"HTTP/1.1 304 Not Modified\r\n\r\n"
        held.write(b"HTTP/1.1 200 OK\r\n\r\n")
        held.close()  # what is held goes out before the connection closes
        await asyncio.sleep(0.05)
        assert _pending(theirs) == b"HTTP/1.1 200 OK\r\n\r\n"
        theirs.close()

    uvloop.run(main())


def test_a_head_held_for_a_lost_connection_goes_with_it_quietly():
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        ours, theirs = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        held = HeadWithBody(transport, loop)
        transport.abort()  # as a reset does, past the wrapper
        await asyncio.sleep(0.05)
        held.write(b"HTTP/1.1 200 OK\r\n\r\n")  # before uvicorn learns of it
        await asyncio.sleep(0.05)
        assert errors == []
        theirs.close()

    uvloop.run(main())


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    message = await receive()
    body = BODY if scope["path"] == "/big" else message.get("body", b"") or b"hello"
    status = 304 if scope["path"] == "/not-modified" else 200
    headers = [(b"content-type", b"application/octet-stream"), (b"etag", b'"x"')]
    if status == 200:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if status == 304 else body})


@pytest.fixture(scope="module")
def server():
    server, thread, port = _serve(_app)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_answers_on_one_connection_arrive_whole_and_in_order(server):
    with httpx.Client(base_url=server) as client:
        for _ in range(3):
            big = client.get("/big")
            assert big.status_code == 200 and big.content == BODY
            head = client.head("/big")
            assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(BODY))
            assert client.get("/not-modified").status_code == 304
            echo = client.post("/echo", content=b"ping")
            assert echo.status_code == 200 and echo.content == b"ping"


def test_a_client_waiting_for_100_continue_gets_it(server):
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(b"pong")
        answer = b""
        while not answer.endswith(b"pong"):
            chunk = s.recv(4096)
            assert chunk, answer
            answer += chunk
        assert answer.split(b"\r\n")[0] in (b"HTTP/1.1 100 Continue", b"HTTP/1.1 200 OK")


# -- lanes: requests the application answers from the parser's callback, without ASGI ----

class LaneApp:
    """An application with one lane, POST /lane (bodies up to 64 bytes): answered by the
    lane as b"lane:" + body, unless the body asks it to decline or to fail; everything
    else is answered by the ASGI application as b"asgi:" + body (GET /slow after 0.2 s)."""

    def __init__(self) -> None:
        self.lane_bodies: list[bytes] = []
        self.asgi_bodies: list[bytes] = []
        self.http_lanes = {(b"POST", b"/lane"): Lane(self.handle, 64)}

    def handle(self, headers, body: bytes, respond) -> bool:
        self.lane_bodies.append(body)
        if body == b"decline":
            return False
        if body == b"fail":
            raise RuntimeError("a lane's bug, before answering")
        answer = b"lane:" + body
        respond(200, b"content-type: text/plain\r\ncontent-length: %d\r\nx-lane: yes\r\n" % len(answer),
                [answer[:3], answer[3:]])
        if body == b"fail-after":
            raise RuntimeError("a lane's bug, after answering")
        return True

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.asgi_bodies.append(body)
        if scope["path"] == "/slow":
            await asyncio.sleep(0.2)
        answer = b"asgi:" + body
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]})
        await send({"type": "http.response.body", "body": answer})


def _serve(app, **config) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="app.http:HttpProtocol",
                                           loop="uvloop", log_level="warning", lifespan="off", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return server, thread, port


@pytest.fixture(scope="module")
def lane_server():
    app = LaneApp()
    server, thread, port = _serve(app)
    yield app, port
    server.should_exit = True
    thread.join(10)


def _answers(sock: socket.socket, n: int) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """Read `n` whole answers (status line, headers, body by Content-Length) from `sock`."""
    data, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} answers: {data!r}"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        status, *lines = head.split(b"\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}
        length = int(headers.get(b"content-length", b"0"))
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed within a body"
            data += chunk
        out.append((status, headers, data[:length]))
        data = data[length:]
    return out


def _post(path: str, body: bytes, extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return (b"POST %s HTTP/%s\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (path.encode(), version, len(body), extra)
            + body)


def test_a_lane_answers_in_one_write_on_a_kept_connection(lane_server):
    app, port = lane_server
    before = len(app.asgi_bodies)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for body in (b"one", b"two", b"x" * 64):
            r = client.post("/lane", content=body)
            assert r.status_code == 200 and r.content == b"lane:" + body and r.headers["x-lane"] == "yes"
            assert r.headers["date"] and "connection" not in r.headers  # the server's own headers, kept alive
        assert client.get("/other").content == b"asgi:"
    assert app.lane_bodies[-3:] == [b"one", b"two", b"x" * 64] and app.asgi_bodies[before:] == [b""]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # head and body arrive together
        s.sendall(_post("/lane", b"whole"))
        time.sleep(0.1)
        assert s.recv(65536).endswith(b"\r\n\r\nlane:whole")


def test_what_a_lane_declines_or_cannot_take_goes_to_the_application_whole(lane_server):
    app, port = lane_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_post("/lane", b"decline"))
        assert _answers(s, 1)[0][2] == b"asgi:decline"
        s.sendall(_post("/lane", b"split in two")[:-5])  # a body in two segments: gathered, then answered
        time.sleep(0.1)
        s.sendall(b"n two")
        assert _answers(s, 1)[0][2] == b"lane:split in two"
        s.sendall(_post("/lane", b"y" * 65))  # over the lane's limit
        s.sendall(_post("/lane?q=1", b"query"))
        s.sendall(b"POST /lane HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nchunked\r\n0\r\n\r\n")
        assert [a[2] for a in _answers(s, 3)] == [b"asgi:" + b"y" * 65, b"asgi:query", b"asgi:chunked"]
        s.sendall(_post("/lane", b"waits", b"Expect: 100-continue\r\n")[:-5])
        assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"waits")
        assert _answers(s, 1)[0][2] == b"asgi:waits"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # HTTP/1.0: the ordinary way
        s.sendall(_post("/lane", b"old", version=b"1.0"))
        assert _answers(s, 1)[0][2] == b"asgi:old"
    assert app.lane_bodies[-2:] == [b"decline", b"split in two"]


def test_pipelined_requests_are_answered_in_order(lane_server):
    app, port = lane_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_post("/lane", b"a") + b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n" + _post("/lane", b"b")
                  + _post("/lane", b"c"))
        assert [a[2] for a in _answers(s, 4)] == [b"lane:a", b"asgi:", b"asgi:b", b"asgi:c"]
        s.sendall(_post("/lane", b"d") + _post("/lane", b"e"))  # nothing pending: the lane again
        assert [a[2] for a in _answers(s, 2)] == [b"lane:d", b"lane:e"]


def test_a_lane_closes_when_asked_and_after_its_own_failure(lane_server, caplog):
    app, port = lane_server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_post("/lane", b"bye", b"Connection: close\r\n"))
        (status, headers, body), = _answers(s, 1)
        assert body == b"lane:bye" and headers[b"connection"] == b"close" and s.recv(10) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_post("/lane", b"fail"))  # nothing written yet: the application answers
        assert _answers(s, 1)[0][2] == b"asgi:fail"
        s.sendall(_post("/lane", b"fail-after"))  # answered, then the connection is closed
        assert _answers(s, 1)[0][2] == b"lane:fail-after" and s.recv(10) == b""
    assert any("lane POST /lane failed" in r.getMessage() for r in caplog.records)


def test_a_lane_request_in_progress_at_shutdown_is_answered_then_closed():
    app = LaneApp()
    server, thread, port = _serve(app)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_post("/lane", b"last one")[:-3])
        time.sleep(0.1)
        server.should_exit = True
        time.sleep(0.5)  # uvicorn has asked its connections to shut down
        s.sendall(b"one")
        (status, headers, body), = _answers(s, 1)
        assert body == b"lane:last one" and headers[b"connection"] == b"close" and s.recv(10) == b""
    thread.join(10)
    assert not thread.is_alive()
