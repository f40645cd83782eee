"""docker-compose.yml, the Dockerfile and docker/ checked against each other and the code
(no Docker engine runs here): the services of each profile, the images they build, the
files they reference, the settings and commands they use."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from app.cli import app as poe
from app.settings import Settings

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
NGINX = (ROOT / "docker" / "nginx.conf").read_text()


def _profile(name: str | None) -> set[str]:
    """The services of a profile; None: those without a profile (the default `up`)."""
    return {s for s, spec in SERVICES.items() if spec.get("profiles", [None]).count(name)}


def test_the_default_and_the_scale_profile():
    assert _profile(None) == {"postgres", "api", "worker"}
    assert _profile("scale") == {"replica", "nginx", "minio", "minio-bucket", "worker-gpu"}
    assert SERVICES["replica"]["deploy"]["replicas"] == 2
    devices = SERVICES["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_the_poe_services_build_this_repository_and_run_existing_commands():
    runner = CliRunner()
    for name in ("api", "worker", "worker-gpu", "replica"):
        spec = SERVICES[name]
        build = spec["build"] if isinstance(spec["build"], dict) else {"context": spec["build"]}
        assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}\b", DOCKERFILE, re.M), f"{name} passes build arg {arg}"
        command = spec.get("command") or []
        entrypoint = spec.get("entrypoint")
        if entrypoint:  # installed by the Dockerfile from docker/, and runs `poe worker`
            source = re.search(rf"^COPY (\S+) /usr/local/bin/{entrypoint[0]}$", DOCKERFILE, re.M)
            assert source, f"the Dockerfile does not install {entrypoint[0]}"
            assert "exec poe worker" in (ROOT / source[1]).read_text()
            command = ["poe", "worker"]
        assert command[0] == "poe"
        words = [w for w in command[1:] if not w.startswith("-")]
        help_text = runner.invoke(poe, [*words[:1], "--help"], terminal_width=200).output
        for option in (w for w in command if w.startswith("--")):
            assert option in help_text, f"{name}: poe {words[0]} has no option {option}"


def _ignored(path: str) -> bool:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)


def test_every_file_the_images_and_services_use_exists_in_the_build_context():
    copies = re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M)
    assert copies
    for line in copies:
        *sources, _target = shlex.split(line)
        for source in sources:
            assert (ROOT / source).exists() and not _ignored(source), f"COPY {source}"
    mounts = [v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", []) if v.startswith("./")]
    # ./datasets is the operator's data directory (Docker creates it when absent)
    assert {m for m in mounts if m != "./datasets"} == {"./docker/nginx.conf"}
    for mount in mounts:
        if mount != "./datasets":
            assert (ROOT / mount).is_file()
    mode = subprocess.run(["git", "ls-files", "-s", "docker/worker-entrypoint.sh"], cwd=ROOT,
                          capture_output=True, text=True).stdout
    assert mode.startswith("100755"), "docker/worker-entrypoint.sh must be executable in git"


def test_the_web_stage_installs_the_lockfile_where_app_web_looks():
    from app.web import NODE_MODULES

    assert "app/web/node_modules" in (ROOT / ".dockerignore").read_text().split()  # never the developer's copy
    assert re.search(r"^COPY app/web/package.json app/web/package-lock.json \./$", DOCKERFILE, re.M)
    assert re.search(r"^RUN npm ci\b", DOCKERFILE, re.M)
    target = re.search(r"^COPY --from=web /web/node_modules (\S+)$", DOCKERFILE, re.M)[1]
    assert target == "/usr/local/lib/python${PYTHON}/site-packages/" + str(NODE_MODULES.relative_to(ROOT))


@pytest.mark.parametrize("where", ["compose", "Dockerfile"])
def test_every_poe_variable_is_a_setting(where):
    settings = {f"POE_{name.upper()}" for name in Settings.model_fields}
    if where == "compose":
        used = {k for s in SERVICES.values() for k in (s.get("environment") or {}) if k.startswith("POE_")}
    else:
        used = set(re.findall(r"\b(POE_[A-Z_]+)=", DOCKERFILE))
    assert used and used <= settings, used - settings


def test_nginx_balances_the_replica_service_on_the_apis_port():
    upstream = re.search(r"upstream api \{\s*server (\S+):(\d+)", NGINX)
    assert upstream[1] == "replica" and upstream[1] in SERVICES
    assert int(upstream[2]) == int(re.search(r"POE_PORT=(\d+)", DOCKERFILE)[1])
    listen = re.search(r"listen (\d+);", NGINX)[1]
    assert any(p.endswith(f":{listen}") for p in SERVICES["nginx"]["ports"])
