"""`poe serve`: the one command of the embedded default, as a real process."""

import glob
import json
import os
import signal
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_fixtures import free_port, wait_for


def _children(pid: int) -> list[int]:
    """Children of every thread of `pid` (the supervisor thread starts new workers)."""
    found = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            found += [int(p) for p in open(task).read().split()]
        except FileNotFoundError:
            pass
    return found


def _workers(pid: int) -> list[int]:
    """The `poe worker` children of a `poe serve` process."""
    found = []
    for child in _children(pid):
        try:
            if b"worker" in open(f"/proc/{child}/cmdline", "rb").read().split(b"\0"):
                found.append(child)
        except FileNotFoundError:
            pass
    return found


def _alive(pid: int) -> bool:
    stat = f"/proc/{pid}/stat"
    return os.path.exists(stat) and open(stat).read().split()[2] != "Z"


def test_serve_starts_api_and_a_supervised_worker_with_the_default_pool(tmp_path, pool):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POE_")}
    env |= {"POE_DATA_DIR": str(tmp_path / "var"), "POE_DEFAULT_POOL": str(pool.root), "POE_PORT": str(port),
            "OMP_NUM_THREADS": "1", "POE_HEARTBEAT_SECONDS": "0.5", "POE_STALE_SECONDS": "3",
            "POE_WORKER_POLL_SECONDS": "0.2"}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--workers", "2"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{base}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            return False

    try:
        # Three processes importing torch at once: well over a minute on a 2-core machine that also trains.
        wait_for(ready, timeout=180, interval=0.2, what="poe serve to be ready (API and worker)")
        assert httpx.get(f"{base}/ready").json()["workers"] == 1
        assert httpx.get(f"{base}/tasks").json()["pool_id"] == pool.pool_id
        assert httpx.post(f"{base}/models", json={"tasks": ["task0"]}).status_code == 200
        # A connection each: the kernel spreads them over both API processes, and /metrics,
        # whichever answers, counts them all.
        for i in range(12):
            r = httpx.post(f"{base}/models", json={"tasks": ["task1"]}, headers={"X-Request-ID": f"serve-{i}"})
            assert r.headers["x-request-id"] == f"serve-{i}"
        def posts() -> float:
            [count] = [s.value for f in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
                       for s in f.samples if s.name == "poe_http_request_duration_seconds_count"
                       and s.labels == {"method": "POST", "route": "/models", "status": "200"}]
            return count

        # Each process adds up its tallies once a second (app.metrics.TALLY).
        wait_for(lambda: posts() == 13, timeout=5, interval=0.2, what="both processes' requests in /metrics")
        for _ in range(3):
            assert posts() == 13
        token = (tmp_path / "var" / "admin-token").read_text().strip()
        jobs = httpx.get(f"{base}/admin/jobs", headers={"Authorization": f"Bearer {token}"})
        assert jobs.status_code == 200
        [first] = _workers(server.pid)
        os.kill(first, signal.SIGKILL)
        # Restarted within 10 s, and ready again once the new worker polls.
        [second] = wait_for(lambda: [w for w in _workers(server.pid) if w != first], timeout=10, interval=0.1,
                            what="a new worker process")
        wait_for(ready, timeout=60, interval=0.2, what="the new worker to poll")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(30)
    assert code == 0, (tmp_path / "serve.log").read_text()
    assert not _alive(second)
    text = (tmp_path / "serve.log").read_text()
    assert "admin token" in text and "with 2 API process(es)" in text
    assert f"worker process {first} exited" in text
    logged = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [line for line in logged if line.get("request_id", "").startswith("serve-")]
    assert sorted(line["request_id"] for line in access) == sorted(f"serve-{i}" for i in range(12))
    assert all(line["method"] == "POST" and line["path"] == "/models" and line["status"] == 200
               and line["duration_ms"] > 0 for line in access)
    assert any(line["logger"] == "app.jobs.worker" and "polling" in line["message"] for line in logged)
