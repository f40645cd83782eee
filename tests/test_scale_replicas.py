"""Two replicas, one truth: two `poe serve --no-worker` processes with their own data
directories, one `poe worker`, one PostgreSQL schema and one S3 bucket (moto on loopback).
The figures it prints are those quoted in docs/SCALING.md (run with -s to see them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from service_fixtures import (
    ADMIN,
    Databases,
    _postgres_reachable,
    free_port,
    make_settings,
    settings_env,
    tiny_extraction,
)
from service_fixtures import wait_for as wait

from app.services import Services


@pytest.fixture
def postgres(tmp_path):
    problem = _postgres_reachable()
    if problem:
        if os.environ.get("POE_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(problem)
        pytest.skip(f"replicas share a PostgreSQL database: {problem}")
    made = Databases("postgresql", tmp_path)
    yield made
    made.drop_all()


def test_two_replicas_one_worker_one_database_one_bucket(postgres, s3, tmp_path, pool):
    blob_url, bucket, _ = s3
    url = postgres.new()

    def settings(name: str, **extra):
        # The defaults of a deployment where they matter here (not the other tests' short
        # heartbeat, which a loaded 2-core machine can miss).
        return make_settings(postgres, tmp_path / name, database_url=url, blob_url=blob_url, active_pool_ttl=1.0,
                             heartbeat_seconds=5, stale_seconds=60, **extra)

    Services.start(settings("migrate")).close()  # a deployment migrates once, before starting replicas
    figures = {}
    logs, procs = {}, []

    def spawn(name: str, argv: list[str], **extra):
        logs[name] = tmp_path / f"{name}.log"
        env = settings_env(settings(name, **extra)) | {"OMP_NUM_THREADS": "1"}
        with open(logs[name], "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "app.cli", *argv], env=env, stdout=out,
                                          stderr=subprocess.STDOUT))

    ports = {"a": free_port(), "b": free_port()}
    base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    started = time.monotonic()
    for name, port in ports.items():
        spawn(name, ["serve", "--no-worker", "--workers", "1"], port=port)
    spawn("worker", ["worker"])

    def up(name):
        try:
            return httpx.get(f"{base[name]}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            assert all(p.poll() is None for p in procs), {n: p.read_text()[-2000:] for n, p in logs.items()}
            return False

    try:
        for name in base:
            wait(lambda name=name: up(name), timeout=180, interval=0.2, what=f"replica {name.upper()}")
        figures["replicas up (s)"] = round(time.monotonic() - started, 1)

        # A pool imported on A's host (its blobs go to the bucket) and activated through A's API.
        env_a = settings_env(settings("a"))
        imported = subprocess.run([sys.executable, "-m", "app.cli", "pool", "import", str(pool.root),
                                   "--no-activate"], env=env_a, capture_output=True, text=True, timeout=300)
        assert imported.returncode == 0, imported.stderr
        version = int(imported.stderr.split("pool version ")[1].split()[0])
        r = httpx.post(f"{base['a']}/admin/pools/{version}/activate", headers=ADMIN, timeout=60)
        assert r.status_code == 200, r.text
        activated = time.monotonic()
        assert httpx.get(f"{base['a']}/tasks").json()["pool_version"] == version

        def b_serves(v):
            r = httpx.get(f"{base['b']}/tasks", timeout=5)
            return r.status_code == 200 and r.json()["pool_version"] == v

        wait(lambda: b_serves(version), timeout=2, interval=0.02, what="replica B to serve the pool A activated")
        figures["activation on A -> served by B (s)"] = round(time.monotonic() - activated, 2)
        cache_b = tmp_path / "b" / "blobs"
        assert sum(1 for p in cache_b.rglob("*") if p.is_file()) >= len(pool.manifest["files"])

        # A model id issued by A downloads byte-identical from B.
        meta = httpx.post(f"{base['a']}/models", json={"tasks": ["task0", "task2"]},
                          headers={"Accept": "application/json"}).json()
        from_a = httpx.get(f"{base['a']}/models/{meta['id']}/download")
        t = time.perf_counter()
        from_b = httpx.get(f"{base['b']}/models/{meta['id']}/download")
        figures["first download of A's id from B (ms)"] = round(1000 * (time.perf_counter() - t), 1)
        assert from_a.status_code == from_b.status_code == 200
        assert from_a.content == from_b.content and from_a.headers["etag"] == from_b.headers["etag"]
        assert from_b.headers["x-model-id"] == meta["id"]

        # A job queued on B runs on the worker; its pool is served by both.
        queued = time.monotonic()
        job = httpx.post(f"{base['b']}/admin/extractions", headers=ADMIN, json=tiny_extraction()).json()

        def done():
            state = httpx.get(f"{base['a']}/admin/jobs/{job['id']}", headers=ADMIN).json()
            return state if state["status"] in ("succeeded", "failed", "cancelled") else None

        state = wait(done, timeout=300, interval=0.2, what="the job queued on B")
        assert state["status"] == "succeeded", (state["error"], state["log"])
        finished = time.monotonic()
        figures["job queued on B -> succeeded on the worker (s)"] = round(finished - queued, 1)
        new = state["pool_version"]
        for name in base:
            wait(lambda name=name: httpx.get(f"{base[name]}/tasks").json()["pool_version"] == new, timeout=2,
                 interval=0.02, what=f"replica {name.upper()} to serve the job's pool")
        figures["job succeeded -> served by A and B (s)"] = round(time.monotonic() - finished, 2)
        bodies = [httpx.post(f"{base[n]}/models", json={"tasks": ["task1", "task0"]}) for n in base]
        assert bodies[0].status_code == bodies[1].status_code == 200 and bodies[0].content == bodies[1].content
        keys = {o["Key"] for o in _objects(bucket)}  # both pools' blobs, in the one bucket
        assert {f"blobs/{sha[:2]}/{sha[2:]}" for sha in pool.manifest["files"].values()} < keys
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(60) for p in procs]
    assert codes == [0, 0, 0], {n: p.read_text()[-2000:] for n, p in logs.items()}
    # Each replica's log: JSON lines, an access line per request.
    access = [json.loads(line) for line in logs["b"].read_text().splitlines()
              if line.startswith("{") and '"poe.access"' in line]
    assert any(line["path"] == f"/models/{meta['id']}/download" and line["status"] == 200 for line in access)
    print("\ntwo replicas, one truth:", json.dumps(figures))


def _objects(bucket: str) -> list[dict]:
    from s3_server import s3_client

    return s3_client(os.environ["AWS_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket).get("Contents", [])
