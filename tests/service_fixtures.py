"""Fixtures of the service tests (a pytest plugin named in conftest.py).

Every store-backed fixture runs once against SQLite and once against the PostgreSQL
on 127.0.0.1:5432 (POE_TEST_POSTGRES_URL); each PostgreSQL database is a schema of its
own, dropped at the end, so concurrent runs do not collide. Without a reachable
PostgreSQL those tests are skipped, unless POE_TEST_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app.logs import JsonFormatter
from app.main import create_app
from app.services import Services
from app.settings import Settings
from app.store.pools import import_pool
from poe_core.extract import load_experts, load_wrn
from poe_core.nets import WRNSpec
from poe_core.pool import build_pool

POSTGRES_URL = os.environ.get("POE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Databases:
    """Makes empty databases of one backend: SQLite files, or PostgreSQL schemas."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        self.tmp = tmp
        self.schemas: list[str] = []

    def new(self) -> str:
        name = f"poe_test_{uuid.uuid4().hex[:12]}"
        if self.backend == "sqlite":
            return f"sqlite:///{self.tmp / name}.db"
        with create_engine(POSTGRES_URL).begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{name}"'))
        self.schemas.append(name)
        return f"{POSTGRES_URL}?options=-csearch_path%3D{name}"

    def drop_all(self) -> None:
        if self.schemas:
            engine = create_engine(POSTGRES_URL)
            with engine.begin() as conn:
                for name in self.schemas:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
            engine.dispose()


def _postgres_reachable() -> str | None:
    try:
        engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as e:
        return f"PostgreSQL at {POSTGRES_URL} unreachable: {type(e).__name__}"


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def databases(request, tmp_path_factory):
    if request.param == "postgresql":
        problem = _postgres_reachable()
        if problem:
            if os.environ.get("POE_TEST_REQUIRE_POSTGRES") == "1":
                pytest.fail(problem)
            pytest.skip(problem)
    made = Databases(request.param, tmp_path_factory.mktemp(request.param))
    yield made
    made.drop_all()


def make_settings(databases: Databases, data_dir: Path, **overrides) -> Settings:
    values = dict(data_dir=data_dir, database_url=databases.new(), admin_token=ADMIN_TOKEN,
                  default_pool="none", active_pool_ttl=0, data_roots=[data_dir / "datasets"],
                  heartbeat_seconds=0.3, stale_seconds=2, worker_poll_seconds=0.2)
    return Settings(**(values | overrides))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `poe` subprocess these settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, list):
            value = os.pathsep.join(str(v) for v in value)
        env[f"POE_{name.upper()}"] = str(value)
    return env


@pytest.fixture(scope="session")
def second_pool(tmp_path_factory, work_dir, synthetic):
    """Another bundle from the same extraction: experts of task0 and task1 only."""
    student = load_wrn(work_dir, "library", len(synthetic.taxonomy.classes), synthetic.image_shape[0])
    experts = {t: e for t, e in load_experts(work_dir, synthetic).items() if t in ("task0", "task1")}
    return build_pool(tmp_path_factory.mktemp("pools") / "second", library=student.library,
                      experts=experts, splits=synthetic, library_spec=WRNSpec(10, 0.5, 0.5),
                      expert_spec=WRNSpec(10, 0.5, 0.25))


@pytest.fixture(scope="session")
def settings(databases, tmp_path_factory) -> Settings:
    return make_settings(databases, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def versions(settings, pool, second_pool) -> dict[str, int]:
    """The store of the session: the synthetic pool (active) and a second version."""
    services = Services.start(settings)
    first = import_pool(services.db, services.blobs, pool.root, source="test", activate=True)
    second = import_pool(services.db, services.blobs, second_pool.root, source="test second")
    services.close()
    return {"first": first, "second": second}


@pytest.fixture(scope="session")
def client(settings, versions):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def services(client) -> Services:
    """The API's own services (its model cache, its registry)."""
    return client.app.state.services


def slow_assembly(monkeypatch, served, seconds=0.2):
    """Make assembly slow enough that every concurrent request arrives while it runs."""
    assemble = served.assembler.assemble

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return assemble(*args, **kwargs)

    monkeypatch.setattr(served.assembler, "assemble", slow)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (a server started next takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, process: subprocess.Popen, timeout: float) -> bool:
    """Wait until something accepts connections on 127.0.0.1:`port`; False if `process`
    exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tiny_extraction(oracle_epochs: int = 2, **overrides) -> dict:
    """An extraction request that trains in seconds on the synthetic data set."""
    def phase(depth, kc, ks, epochs):
        return {"arch": {"depth": depth, "kc": kc, "ks": ks}, "epochs": epochs, "lr": 0.05}

    return {"data": {"source": "synthetic"}, "oracle": phase(10, 1, 1, oracle_epochs),
            "library": phase(10, 0.5, 0.5, 2), "experts": phase(10, 0.5, 0.25, 2),
            "tasks": ["task0", "task1"], "batch_size": 16, "precision": "fp32", "device": "cpu"} | overrides


class Lines:
    """A job's reporter (app.jobs.extraction.Reporter) that keeps its phases and lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def phase(self, name: str) -> None:
        self.lines.append(f"phase {name}")

    def progress(self, percent, update) -> None:
        pass

    def line(self, text: str) -> None:
        self.lines.append(text)

    def check(self) -> None:
        pass


def store_with(databases: Databases, data_dir: Path, bundle: Path, **overrides) -> tuple[Settings, int]:
    """Settings of a new store in which the pool bundle is imported and active, and its version."""
    settings = make_settings(databases, data_dir, **overrides)
    services = Services.start(settings)
    version = import_pool(services.db, services.blobs, bundle, source="test", activate=True)
    services.close()
    return settings, version


@pytest.fixture
def fresh(databases, tmp_path, pool):
    """A store of its own with the synthetic pool active, and an API client on it."""
    settings, version = store_with(databases, tmp_path / "data", pool.root)
    with TestClient(create_app(settings)) as c:
        yield settings, c, version


def start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    """A real `poe worker` process on these settings, its output in `log`."""
    env = settings_env(settings) | {"OMP_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
def access_log():
    """The JSON lines the access logger writes meanwhile."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("poe.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(level)
