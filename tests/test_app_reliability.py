"""What survives what: a stream of distinct queries leaves no trace on disk; a real server
under concurrent load answers every request; after kill -9 every model id it issued
resolves to the same bytes and ETag; PostgreSQL connections cut under the API are
replaced, and a read cut mid-way is retried."""

import asyncio
import itertools
import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient
from service_fixtures import ADMIN, POSTGRES_URL, make_settings, settings_env, wait_for
from sqlalchemy import create_engine, select, text

from app.main import create_app
from app.services import Services
from app.store.pools import import_pool, shipped_pool
from app.store.tables import PoolFile


def _disk(directory) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _bodies(tasks, n: int) -> list[dict]:
    options = [{"softmax": s, "weights": w} for s in (False, True) for w in ("fp32", "fp16", "int8")]
    combos = itertools.chain.from_iterable(itertools.combinations(tasks, k) for k in (2, 3, 4))
    return list(itertools.islice(({"tasks": list(c), "options": o} for c in combos for o in options), n))


def test_ten_thousand_distinct_queries_leave_the_data_directory_as_it_was(databases, tmp_path):
    if databases.backend != "sqlite":
        pytest.skip("the embedded default keeps its database in the data directory; once is enough")
    bundle = shipped_pool()
    if bundle is None:
        pytest.skip("this build ships no pool with enough primitive tasks")
    settings = make_settings(databases, tmp_path / "var", default_pool=str(bundle))
    bodies = _bodies(json.loads((bundle / "manifest.json").read_text())["experts"], 10_000)
    assert len({json.dumps(b) for b in bodies}) == 10_000
    # Straight into the ASGI app on the event loop: an HTTP client's own cost per request
    # (TestClient's thread hop, httpx's transport) would be most of the test's time.
    async def post(app, body: dict) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/models", "raw_path": b"/models", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]}
        messages = [{"type": "http.request", "body": data, "more_body": False}]
        sent = []

        async def receive():
            return messages.pop() if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["status"], {k.decode(): v.decode() for k, v in sent[0]["headers"]}

    async def stream() -> tuple[int, int, set[str]]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            serving = app.state.services.serving
            assert (await post(app, bodies[0]))[0] == 200
            serving.flush_counts()
            before = _disk(settings.data_dir)
            ids = set()
            for body in bodies[1:]:
                status, headers = await post(app, body)
                assert status == 200
                ids.add(headers["x-model-id"])
            serving.flush_counts()
            return before, _disk(settings.data_dir), ids

    before, after, ids = asyncio.run(stream())
    assert len(ids) == len(bodies) - 1
    assert after - before < 1_000_000, f"the data directory grew by {after - before:,} bytes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(settings, port: int, log) -> subprocess.Popen:
    env = settings_env(settings) | {"POE_PORT": str(port), "OMP_NUM_THREADS": "1", "POE_LOG_LEVEL": "warning"}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker", "--workers", "1"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _ready(base: str, server: subprocess.Popen, log_path) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        assert server.poll() is None, log_path.read_text()
        return False


async def _burst(base: str, connections: int, requests: list[tuple[str, str, dict | None]]):
    """`requests` (method, path, JSON body) over `connections` concurrent keep-alive clients."""
    queue = list(reversed(requests))
    answers = []

    async def client():
        async with httpx.AsyncClient(base_url=base, timeout=60, headers=ADMIN) as c:
            while queue:
                method, path, body = queue.pop()
                r = await c.request(method, path, json=body)
                answers.append((method, path, r.status_code, r.headers.get("x-model-id"), r.headers.get("etag")))

    await asyncio.gather(*(client() for _ in range(connections)))
    return answers


def test_load_then_kill_9_then_every_issued_id_resolves(databases, tmp_path, pool):
    settings = make_settings(databases, tmp_path / "var")
    services = Services.start(settings)
    import_pool(services.db, services.blobs, pool.root, source="test", activate=True)
    services.close()
    port, log_path = _free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        server = _serve(settings, port, log)
        try:
            wait_for(lambda: _ready(base, server, log_path), timeout=90, interval=0.2, what="the server")
            queries = [("POST", "/models", b) for b in _bodies(pool.tasks, 200)] + \
                [("POST", "/models", {"tasks": ["task0"]})] * 200 + [("GET", "/tasks", None)] * 50 + \
                [("GET", "/admin/jobs", None)] * 25 + [("GET", "/ready", None)] * 25
            answers = asyncio.run(_burst(base, 16, queries))
            assert len(answers) == len(queries)
            assert {status for *_, status, _, _ in answers} == {200}, \
                [a for a in answers if a[2] != 200][:5]
        finally:
            server.send_signal(signal.SIGKILL)
            server.wait(10)
        issued = {ident: etag for _, _, _, ident, etag in answers if ident}
        server = _serve(settings, port, log)
        try:
            wait_for(lambda: _ready(base, server, log_path), timeout=90, interval=0.2, what="the restarted server")
            for ident, etag in issued.items():
                r = httpx.get(f"{base}/models/{ident}/download")
                assert (r.status_code, r.headers["etag"]) == (200, etag), ident
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


@pytest.fixture
def postgres_app(databases, tmp_path, pool):
    if databases.backend != "postgresql":
        pytest.skip("cutting server connections is a PostgreSQL matter")
    name = f"poe_cut_{os.getpid()}_{tmp_path.name[-20:]}"
    settings = make_settings(databases, tmp_path / "var")
    settings = settings.model_copy(update={"database_url": f"{settings.database_url}&application_name={name}"})
    services = Services.start(settings)
    import_pool(services.db, services.blobs, pool.root, source="test", activate=True)
    services.close()
    admin = create_engine(POSTGRES_URL)

    def cut() -> int:
        with admin.begin() as conn:
            return conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                     "WHERE application_name = :name"), {"name": name}).scalar()

    with TestClient(create_app(settings)) as client:
        yield client, cut
    admin.dispose()


def test_connections_cut_between_requests_are_replaced(postgres_app):
    client, cut = postgres_app
    assert client.get("/admin/jobs", headers=ADMIN).status_code == 200
    assert client.post("/admin/extractions", headers=ADMIN, json={"data": {"source": "synthetic"}}).status_code == 202
    for _ in range(3):
        assert cut() >= 1
        assert client.get("/admin/pools", headers=ADMIN).status_code == 200
        assert client.get("/admin/jobs", headers=ADMIN).status_code == 200
        assert client.post("/admin/jobs/1/cancel", headers=ADMIN).status_code in (200, 409)
        assert client.post("/models", json={"tasks": ["task0"]}).status_code == 200
        assert client.get("/ready").status_code == 200


def test_a_read_cut_mid_way_is_retried_once(postgres_app):
    client, cut = postgres_app
    db = client.app.state.services.db
    attempts = []

    def read(session):
        attempts.append(session.execute(text("SELECT pg_backend_pid()")).scalar())
        if len(attempts) == 1:
            cut()  # this very connection dies under the read
        return session.execute(text("SELECT 1")).scalar()

    assert db.read(read) == 1
    assert len(attempts) == 2 and attempts[0] != attempts[1]
    assert client.get("/admin/jobs", headers=ADMIN).status_code == 200


def test_a_corrupt_expert_fails_only_its_queries_with_a_503_naming_it(fresh, pool):
    settings, client, version = fresh
    services = client.app.state.services
    before = client.post("/models", json={"tasks": ["task0", "task2"]})
    expert = pool.expert_info("task1")["onnx"]
    sha = services.db.read(lambda s: s.scalar(select(PoolFile.sha256).where(
        PoolFile.pool_version == version, PoolFile.path == expert)))
    blob = services.blobs.path(sha)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x10
    blob.write_bytes(bytes(data))
    with TestClient(create_app(settings)) as starting:  # a process that loads the pool from the store now
        r = starting.post("/models", json={"tasks": ["task1", "task0"]})
        assert r.status_code == 503 and expert in r.json()["detail"] and "repairs it" in r.json()["detail"]
        assert str(settings.data_dir.resolve()) not in r.text
        after = starting.post("/models", json={"tasks": ["task2", "task0"]})
        assert after.status_code == 200 and after.content == before.content
        assert after.headers["etag"] == before.headers["etag"]
        assert [t["name"] for t in starting.get("/tasks").json()["tasks"]] == ["task0", "task2"]
        assert starting.get("/tasks/task1").status_code == 503
        import_pool(services.db, services.blobs, pool.root, source="again")
        assert starting.post("/models", json={"tasks": ["task1", "task0"]}).status_code == 200
