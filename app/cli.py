"""The `poe` command: poe_core's commands plus the service's (serve, worker, db, pool)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from poe_core.cli import app, console, fail

db_app = typer.Typer(no_args_is_help=True, help="Migrate the database schema (SQLite or PostgreSQL).")
pool_app = typer.Typer(no_args_is_help=True, help="Pool versions in the store.")
app.add_typer(db_app, name="db")
app.add_typer(pool_app, name="pool")


def _settings(**overrides):
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        fail(f"bad configuration: {e}")


def _services(default_pool: bool = False):
    from app.services import Services

    return Services.start(_settings(), default_pool=default_pool)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on (POE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (POE_PORT).")] = None,
    worker: Annotated[bool, typer.Option(help="Run one `poe worker` beside the server (restarted if it dies).")] = True,
    workers: Annotated[int | None, typer.Option(min=1, help="API processes (uvicorn workers); default one per CPU core.")] = None,
) -> None:
    """Run the API (uvicorn) and one worker on the embedded default (SQLite + blobs in POE_DATA_DIR)."""
    import uvicorn

    from app import logs

    workers = workers or _cores()
    settings = _settings(host=host, port=port)
    logs.use_json(settings.log_level)
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each API process writes its metrics there and /metrics sums them (read by
        # prometheus_client when it is imported: before app.main is).
        metrics_dir = settings.data_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())

    from app.jobs.supervisor import Supervisor
    from app.main import create_app
    from app.services import Services, admin_token

    if worker:
        # Every API process (uvicorn's children read the environment) reports a dead worker in /ready.
        os.environ["POE_REQUIRE_WORKER"] = "true"
    # Migrate and import the default pool here, once, before the worker starts polling.
    Services.start(settings).close()
    if admin_token(settings) and not settings.admin_token:
        console.print(f"admin token: in {settings.admin_token_file.resolve()}")
    supervisor = None
    if worker:
        supervisor = Supervisor([sys.executable, "-m", "app.cli", "worker", "--exit-with", str(os.getpid())])
        supervisor.start()
    console.print(f"serving on http://{settings.host}:{settings.port} with {workers} API process(es) "
                  "(API docs at /docs)")
    # uvicorn re-raises the SIGTERM it handled once it has shut down; exit cleanly
    # through the finally below instead, so the worker is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        # Several processes need an import string; each builds its app from the environment.
        target = create_app(settings) if workers == 1 else "app.main:create_app"
        # A new API process imports onnx and torch before it answers uvicorn's health pings:
        # on a busy machine that takes longer than uvicorn's 5 s, which would kill it in a loop.
        # httptools on uvloop (uvicorn[standard]'s pick, named so a missing one fails loudly),
        # with each answer's head sent together with its body (app.http).
        uvicorn.run(target, factory=workers > 1, workers=workers, host=settings.host, port=settings.port,
                    http="app.http:HttpProtocol", loop="uvloop", server_header=False,
                    log_level=settings.log_level.lower(), log_config=logs.config(settings.log_level),
                    access_log=False, timeout_worker_healthcheck=120)
    finally:
        if supervisor is not None:
            supervisor.stop()


@app.command("worker")
def run_worker(
    once: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    exit_with: Annotated[int | None, typer.Option(hidden=True, help="Stop when this process is gone.")] = None,
) -> None:
    """Claim and run extraction jobs from the jobs table until stopped (SIGTERM)."""
    from app import logs
    from app.jobs.worker import Worker

    logs.use_json(_settings().log_level)
    worker = Worker(_services(), parent_pid=exit_with)
    worker.install_signal_handlers()
    worker.run(once=once)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""
    from app.store import db

    settings = _settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db.upgrade(settings.db_url, revision)
    console.print(f"database at revision {db.current_revision(settings.db_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision; base drops all.")] = "-1") -> None:
    """Revert migrations down to REVISION (default: one step)."""
    from app.store import db

    settings = _settings()
    db.downgrade(settings.db_url, revision)
    console.print(f"database at revision {db.current_revision(settings.db_url)}")


@pool_app.command("import")
def pool_import(
    directory: Annotated[Path, typer.Argument(help="A pool bundle directory (manifest.json, ...).")],
    activate: Annotated[bool, typer.Option(help="Serve it once imported.")] = True,
) -> None:
    """Verify a pool bundle and register it as a new pool version."""
    from app.store.pools import import_pool
    from poe_core.pool import PoolError

    services = _services()
    try:
        version = import_pool(services.db, services.blobs, directory, source=str(directory.resolve()),
                              activate=activate)
    except PoolError as e:
        fail(str(e))
    console.print(f"pool version {version}" + (" is active" if activate else " imported"))


@pool_app.command("list")
def pool_list() -> None:
    """Pool versions, the active one marked with *."""
    from sqlalchemy import select

    from app.store.pools import active_version
    from app.store.tables import PoolVersion

    services = _services()
    with services.db.session() as session:
        active = active_version(session)
        for pool in session.scalars(select(PoolVersion).order_by(PoolVersion.version)):
            mark = "*" if pool.version == active else " "
            typer.echo(f"{mark} {pool.version:4d}  {pool.pool_id}  {len(pool.manifest['experts']):3d} tasks  "
                       f"{pool.created_at:%Y-%m-%d %H:%M}  {pool.source}")


@pool_app.command("activate")
def pool_activate(version: Annotated[int, typer.Argument(min=1, max=2**31 - 1)]) -> None:
    """Serve pool VERSION (it is loaded and verified first)."""
    from app.serving.registry import PoolUnavailable
    from app.store.pools import PoolNotFound, activate_pool

    services = _services()
    try:
        services.pools.get(version)
        activate_pool(services.db, version)
    except (PoolNotFound, PoolUnavailable) as e:
        fail(str(e))
    console.print(f"pool version {version} is active")


def main() -> None:
    level = os.environ.get("POE_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
