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

from app.http import HeadWithBody

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
    port = free_port()
    config = uvicorn.Config(_app, host="127.0.0.1", port=port, http="app.http:HttpProtocol", loop="uvloop",
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
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
