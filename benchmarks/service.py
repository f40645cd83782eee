"""End-to-end latency and throughput of POST /models through a real server on loopback.

    python benchmarks/service.py [--pool DIR] [--seconds 30] [--uncached 300] [--connections 8]

Starts `poe serve --no-worker` (one uvicorn process, SQLite and blobs in a temporary
data directory) on 127.0.0.1 with the given pool (default: the shipped CIFAR-100 pool if
present, else an untrained pool with the paper's CIFAR-100 widths, see assembly.py), then

  uncached  one request at a time, every one a task list never asked before (so every
            one assembles, stores a blob and a row): p50 / p99 / max end to end;
  cached    one task list over and over from --connections keep-alive connections for
            --seconds: requests per second, and every non-200 answer counted as an error.

The client is a minimal asyncio HTTP/1.1 client, so it costs the 2 cores little.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from assembly import SHIPPED, percentile, untrained_cifar_pool


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads whole answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post(self, path: str, body: dict) -> tuple[int, int]:
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = dict(h.lower().split(":", 1) for h in lines[1:] if ":" in h)
        length = int(fields["content-length"])
        await self.reader.readexactly(length)
        return status, length

    def close(self) -> None:
        self.writer.close()


def task_lists(tasks: list[str], n: int, seed: int = 0) -> list[dict]:
    """`n` distinct requests (task set x options), as many composite tasks of 2..5
    primitives as the pool allows, in random order."""
    rng = random.Random(seed)
    sizes = [k for k in range(2, 6) if k <= len(tasks)] or [1]
    combos = [c for k in sizes for c in itertools.combinations(tasks, k)]
    rng.shuffle(combos)
    options = [{}, {"softmax": True}, {"weights": "fp16"}, {"softmax": True, "weights": "fp16"}]
    bodies = ({"tasks": list(c), "options": o} for o in options for c in combos)
    return list(itertools.islice(bodies, n))


async def uncached(port: int, bodies: list[dict]) -> list[float]:
    conn = await Connection.open(port)
    times = []
    for body in bodies:
        t0 = time.perf_counter()
        status, _ = await conn.post("/models", body)
        times.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            raise SystemExit(f"uncached request {body} answered {status}")
    conn.close()
    return times


async def cached(port: int, body: dict, seconds: float, connections: int) -> tuple[int, int, int]:
    deadline = time.perf_counter() + seconds
    counts = {"ok": 0, "errors": 0, "bytes": 0}

    async def loop():
        conn = await Connection.open(port)
        while time.perf_counter() < deadline:
            status, length = await conn.post("/models", body)
            counts["ok" if status == 200 else "errors"] += 1
            counts["bytes"] = length
        conn.close()

    await asyncio.gather(*(loop() for _ in range(connections)))
    return counts["ok"], counts["errors"], counts["bytes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("the server exited; see its output above")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, help="Pool bundle to serve.")
    parser.add_argument("--seconds", type=float, default=30, help="Length of the cached run.")
    parser.add_argument("--uncached", type=int, default=300, help="Uncached requests (distinct task lists).")
    parser.add_argument("--connections", type=int, default=8, help="Concurrent connections, cached run.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pool = args.pool or (SHIPPED if SHIPPED.is_dir() else None)
        if pool is None:
            pool = Path(tmp) / "pool"
            untrained_cifar_pool(pool)
        manifest = json.loads((pool / "manifest.json").read_text())
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("POE_")} | {
            "POE_DATA_DIR": f"{tmp}/var", "POE_DEFAULT_POOL": str(pool), "POE_PORT": str(port),
            "POE_LOG_LEVEL": "warning", "POE_ADMIN_TOKEN": "bench"}
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker"], env=env,
                                  stdout=subprocess.DEVNULL)
        try:
            wait_ready(port, server)
            bodies = task_lists(list(manifest["experts"]), args.uncached + 1)
            asyncio.run(uncached(port, bodies[:1]))  # first request loads the pool
            times = asyncio.run(uncached(port, bodies[1:]))
            ok, errors, size = asyncio.run(cached(port, bodies[0], args.seconds, args.connections))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    print(f"pool {manifest['pool_id']} ({len(manifest['experts'])} primitive tasks), one uvicorn process, "
          "SQLite, loopback")
    print(f"uncached POST /models: {len(times)} distinct requests, p50 {statistics.median(times):.2f} ms, "
          f"p99 {percentile(times, 0.99):.2f} ms, max {max(times):.2f} ms")
    print(f"cached POST /models:   {ok / args.seconds:.0f} requests/s over {args.seconds:g} s "
          f"({args.connections} connections, {size} bytes each), {errors} errors")


if __name__ == "__main__":
    main()
