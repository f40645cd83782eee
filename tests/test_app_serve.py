"""`poe serve`: the one command of the embedded default, as a real process."""

import os
import signal
import socket
import subprocess
import sys

import httpx
from service_fixtures import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


def test_serve_starts_api_and_worker_with_the_default_pool(tmp_path, pool):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POE_")}
    env |= {"POE_DATA_DIR": str(tmp_path / "var"), "POE_DEFAULT_POOL": str(pool.root), "POE_PORT": str(port),
            "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{base}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            return False

    try:
        wait_for(ready, timeout=60, interval=0.2, what="poe serve to be ready")
        assert httpx.get(f"{base}/tasks").json()["pool_id"] == pool.pool_id
        assert httpx.post(f"{base}/models", json={"tasks": ["task0"]}).status_code == 200
        token = (tmp_path / "var" / "admin-token").read_text().strip()
        jobs = httpx.get(f"{base}/admin/jobs", headers={"Authorization": f"Bearer {token}"})
        assert jobs.status_code == 200
        workers = _children(server.pid)
        assert len(workers) == 1
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(30)
    assert code == 0, (tmp_path / "serve.log").read_text()
    worker_stat = f"/proc/{workers[0]}/stat"
    assert not os.path.exists(worker_stat) or open(worker_stat).read().split()[2] == "Z"
    assert "admin token" in (tmp_path / "serve.log").read_text()
