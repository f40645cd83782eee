"""The SQL tables: the index over blobs, pools, their tasks and experts, request counts,
jobs and live workers. Alembic migrations in migrations/ create exactly these."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A UTC timestamp, timezone-aware when read back (SQLite stores it without one)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    # Named constraints, so later migrations can alter them on SQLite (batch mode) too.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class Artifact(Base):
    """A content-addressed blob: its sha256 names the file in the blob directory."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    location: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PoolVersion(Base):
    """One imported pool bundle; immutable. `version` is what the API calls a pool's id."""

    __tablename__ = "pools"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pool_id: Mapped[str] = mapped_column(String(32), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(500))
    manifest: Mapped[dict] = mapped_column(JSON)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    work_dir: Mapped[str | None] = mapped_column(String(500))

    files: Mapped[list[PoolFile]] = relationship(cascade="all, delete-orphan", lazy="selectin")
    tasks: Mapped[list[PrimitiveTask]] = relationship(
        cascade="all, delete-orphan", order_by="PrimitiveTask.position")


class PoolFile(Base):
    """A file of a pool bundle (relative path) and the blob holding its bytes."""

    __tablename__ = "pool_files"

    pool_version: Mapped[int] = mapped_column(ForeignKey("pools.version", ondelete="CASCADE"),
                                              primary_key=True)
    path: Mapped[str] = mapped_column(String(300), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))


class ActivePool(Base):
    """One row: the pool version served. Activation is one UPDATE of this row."""

    __tablename__ = "active_pool"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pool_version: Mapped[int] = mapped_column(ForeignKey("pools.version"))
    activated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PrimitiveTask(Base):
    __tablename__ = "primitive_tasks"
    __table_args__ = (UniqueConstraint("pool_version", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pool_version: Mapped[int] = mapped_column(ForeignKey("pools.version", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(Integer)

    classes: Mapped[list[TaskClass]] = relationship(
        cascade="all, delete-orphan", order_by="TaskClass.position", lazy="selectin")
    expert: Mapped[Expert] = relationship(cascade="all, delete-orphan", lazy="selectin")


class TaskClass(Base):
    """A class of a primitive task, in the order its expert emits logits."""

    __tablename__ = "task_classes"

    task_id: Mapped[int] = mapped_column(ForeignKey("primitive_tasks.id", ondelete="CASCADE"),
                                         primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    class_index: Mapped[int] = mapped_column(Integer)


class Expert(Base):
    __tablename__ = "experts"

    task_id: Mapped[int] = mapped_column(ForeignKey("primitive_tasks.id", ondelete="CASCADE"),
                                         primary_key=True)
    weights_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    onnx_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    logits_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    params: Mapped[int] = mapped_column(BigInteger)
    flops: Mapped[int] = mapped_column(BigInteger)
    onnx_bytes: Mapped[int] = mapped_column(BigInteger)
    val_acc: Mapped[float] = mapped_column(Float)


class TaskRequests(Base):
    """How often each primitive task of a pool version was part of a served query: one
    row per task, however many distinct queries clients make (models are not stored)."""

    __tablename__ = "task_requests"

    pool_version: Mapped[int] = mapped_column(ForeignKey("pools.version", ondelete="CASCADE"),
                                              primary_key=True)
    task: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    last_requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkerSeen(Base):
    """A live `poe worker`: it stamps its row while it polls or runs a job; rows of
    workers silent for POE_STALE_SECONDS are deleted when stale jobs are recovered."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """An extraction job. status: queued -> running -> succeeded | failed | cancelled."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), default="extraction")
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    request: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    phase: Mapped[str | None] = mapped_column(String(32))
    log: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    work_dir: Mapped[str | None] = mapped_column(String(500))
    pool_version: Mapped[int | None] = mapped_column(Integer)
