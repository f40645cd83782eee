"""docker/nginx.conf with Debian's nginx: the configuration test, then a real nginx in
front of a real HTTP server on loopback (no Docker engine runs here).

The only change to the shipped file: the upstream `replica:8000` (a compose service
name, which only Docker's DNS resolves) becomes a loopback server, and nginx listens on
a free loopback port; the replacements are asserted, so a renamed upstream fails here."""

from __future__ import annotations

import http.client
import http.server
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from service_fixtures import free_port, listening

from app.settings import Settings

CONF = Path(__file__).parent.parent / "docker" / "nginx.conf"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

pytestmark = pytest.mark.skipif(not Path(NGINX).is_file(),
                                reason="Debian's nginx is not installed (apt-get install nginx; .ci/run does)")


def _local_copy(tmp_path: Path, upstream_port: int, listen_port: int) -> Path:
    text = CONF.read_text()
    text, upstreams = re.subn(r"server replica:8000\b", f"server 127.0.0.1:{upstream_port}", text)
    text, listens = re.subn(r"listen 8080;", f"listen 127.0.0.1:{listen_port};", text)
    assert (upstreams, listens) == (1, 1)
    # nginx's temporary directories default to /var/lib/nginx: keep the test's own.
    temp = "".join(f"    {d}_temp_path {tmp_path / d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    return conf


def _nginx(conf: Path, *args: str) -> list[str]:
    return [NGINX, "-c", str(conf), "-p", str(conf.parent), "-g", f"pid {conf.parent / 'nginx.pid'};", *args]


def test_the_configuration_passes_nginx_t(tmp_path):
    conf = _local_copy(tmp_path, 8000, free_port())
    run = subprocess.run(_nginx(conf, "-t"), capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert "test is successful" in run.stderr


def test_the_body_limit_is_the_apis():
    limit = re.search(r"client_max_body_size (\d+)k;", CONF.read_text())
    assert limit and int(limit[1]) * 1024 == Settings.model_fields["max_body_bytes"].default


class _Echo(http.server.BaseHTTPRequestHandler):
    """A replica stand-in: answers with the X-Request-ID and Connection headers it got."""

    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def do_GET(self):
        self.seen.append({"id": self.headers.get("X-Request-ID"), "connection": self.headers.get("Connection"),
                          "peer": self.client_address[1]})
        body = b"x" * 300_000  # a model file's size: streams through unbuffered
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-ID", "from-the-replica")
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(tmp_path):
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    conf = _local_copy(tmp_path, upstream.server_address[1], port)
    nginx = subprocess.Popen(_nginx(conf, "-g", "daemon off; master_process off;"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if not listening(port, nginx, timeout=10):
        nginx.kill()
        pytest.fail(f"nginx did not listen on {port} within 10 s: {nginx.stderr.read().decode()}")
    _Echo.seen = []
    yield port
    nginx.terminate()
    nginx.wait(10)
    upstream.shutdown()


def _get(port: int, headers: dict | None = None, body: bytes | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST" if body else "GET", "/models", body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def test_request_ids_are_passed_through_or_generated_and_answered_once(proxy):
    response, data = _get(proxy, {"X-Request-ID": "abc-123"})
    assert response.status == 200 and len(data) == 300_000
    assert response.headers.get_all("X-Request-ID") == ["abc-123"]
    response, _ = _get(proxy)
    generated = response.headers.get_all("X-Request-ID")
    assert len(generated) == 1 and re.fullmatch(r"[0-9a-f]{32}", generated[0])
    assert [s["id"] for s in _Echo.seen] == ["abc-123", generated[0]]


def test_connections_to_the_replicas_are_kept_alive(proxy):
    for _ in range(3):
        _get(proxy)
    assert all(s["connection"] is None for s in _Echo.seen)  # no "Connection: close" to the replica
    assert len({s["peer"] for s in _Echo.seen}) == 1  # one upstream connection for all three


def test_a_body_over_the_apis_limit_stops_at_nginx(proxy):
    response, _ = _get(proxy, {"Content-Type": "application/json"}, b"x" * (64 * 1024 + 1))
    assert response.status == 413 and _Echo.seen == []
    response, _ = _get(proxy, {"Content-Type": "application/json"}, b"x" * (60 * 1024))
    assert response.status == 200
