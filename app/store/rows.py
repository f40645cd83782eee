"""Inserts that tolerate a concurrent writer of the same row (another worker or API
process): INSERT ... ON CONFLICT DO NOTHING / DO UPDATE, in each dialect's spelling."""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.store.tables import ActivePool, Artifact, TaskRequests, WorkerSeen, utcnow


def _insert(session: Session, table):
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def insert_ignore(session: Session, table, rows: list[dict]) -> None:
    """Insert rows, skipping those whose key already exists."""
    if rows:
        session.execute(_insert(session, table).on_conflict_do_nothing(), rows)


def add_artifacts(session: Session, artifacts: list[tuple[str, str, int, str]]) -> None:
    """Index blobs as (sha256, kind, size, location) rows; one row per sha256."""
    unique = {a[0]: a for a in artifacts}
    insert_ignore(session, Artifact.__table__, [
        {"sha256": sha, "kind": kind, "size": size, "location": location, "created_at": utcnow()}
        for sha, kind, size, location in unique.values()
    ])


def set_active_pool(session: Session, version: int) -> None:
    """Activation: one upsert of the single active_pool row."""
    stmt = _insert(session, ActivePool.__table__).values(id=1, pool_version=version, activated_at=utcnow())
    session.execute(stmt.on_conflict_do_update(
        index_elements=["id"], set_={"pool_version": version, "activated_at": utcnow()}))


def add_task_requests(session: Session, counts: dict[tuple[int, str], int]) -> None:
    """Add request counts per (pool version, task) to their rows."""
    if not counts:
        return
    now = utcnow()
    stmt = _insert(session, TaskRequests.__table__)
    session.execute(stmt.on_conflict_do_update(
        index_elements=["pool_version", "task"],
        set_={"requests": TaskRequests.__table__.c.requests + stmt.excluded.requests,
              "last_requested_at": stmt.excluded.last_requested_at}),
        [{"pool_version": v, "task": t, "requests": n, "last_requested_at": now} for (v, t), n in counts.items()])


def worker_seen(session: Session, name: str) -> None:
    """Stamp a worker's row: it is alive."""
    stmt = _insert(session, WorkerSeen.__table__).values(name=name, seen_at=utcnow())
    session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"seen_at": stmt.excluded.seen_at}))
