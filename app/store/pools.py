"""Pool versions: import a bundle into the store, activate a version, and load the
active one for serving.

A bundle's files become blobs and its manifest becomes rows (pool, primitive tasks,
their classes, experts) in one transaction, so a pool is visible whole or not at all.
To serve a version, its files are laid out again as a bundle directory (hard links to
the verified blobs) that poe_core loads; an in-flight request holds the ServedPool it
started with, whatever is activated meanwhile.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.store.blobs import BlobError, BlobStore
from app.store.db import Database
from app.store.rows import add_artifacts, set_active_pool
from app.store.tables import ActivePool, Expert, PoolFile, PoolVersion, PrimitiveTask, TaskClass
from poe_core.assemble import Assembler
from poe_core.pool import Pool, PoolError, load_pool

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class PoolUnavailable(Exception):
    """No pool can be served: none is active, or the active one cannot be loaded."""


class PoolNotFound(LookupError):
    pass


def _file_kind(path: str) -> str:
    if path == MANIFEST:
        return "manifest"
    if path.endswith(".onnx"):
        return "onnx"
    if path.endswith(".npy"):
        return "logits"
    return "weights"


def import_pool(db: Database, blobs: BlobStore, bundle: Path, *, source: str, job_id: int | None = None,
                work_dir: str | None = None, activate: bool = False) -> int:
    """Register a pool bundle as a new version (verified first); return the version. A
    bundle already imported (same pool id) is not imported twice: its version is returned."""
    pool = load_pool(bundle)
    with db.session() as session:
        existing = session.scalar(select(PoolVersion.version).where(PoolVersion.pool_id == pool.pool_id))
    if existing is not None:
        if activate:
            activate_pool(db, existing)
        return existing
    paths = [MANIFEST, *pool.manifest["files"]]
    digests = {rel: blobs.put_file(pool.path(rel)) for rel in paths}
    with db.session() as session:
        add_artifacts(session, [(sha, _file_kind(rel), blobs.path(sha).stat().st_size, blobs.location(sha))
                                for rel, sha in digests.items()])
        row = PoolVersion(pool_id=pool.pool_id, source=source, manifest=pool.manifest, job_id=job_id,
                          work_dir=work_dir)
        row.files = [PoolFile(path=rel, sha256=sha) for rel, sha in digests.items()]
        row.tasks = [_task_row(pool, name, i, digests) for i, name in enumerate(pool.tasks)]
        session.add(row)
        session.flush()
        if activate:
            set_active_pool(session, row.version)
        version = row.version
    log.info("imported pool %s from %s as version %d%s", pool.pool_id, source, version,
             " (active)" if activate else "")
    return version


def _task_row(pool: Pool, name: str, position: int, digests: dict[str, str]) -> PrimitiveTask:
    info = pool.expert_info(name)
    classes = pool.taxonomy.tasks[name]
    return PrimitiveTask(
        name=name, position=position,
        classes=[TaskClass(position=i, name=pool.taxonomy.classes[c], class_index=c)
                 for i, c in enumerate(classes)],
        expert=Expert(weights_sha256=digests[info["weights"]], onnx_sha256=digests[info["onnx"]],
                      logits_sha256=digests[info["logits"]], params=info["params"], flops=info["flops"],
                      onnx_bytes=info["onnx_bytes"], val_acc=info["val_acc"]),
    )


def activate_pool(db: Database, version: int) -> None:
    with db.session() as session:
        if session.get(PoolVersion, version) is None:
            raise PoolNotFound(f"pool version {version} does not exist")
        set_active_pool(session, version)
    log.info("pool version %d is now active", version)


def active_version(session: Session) -> int | None:
    return session.scalar(select(ActivePool.pool_version).where(ActivePool.id == 1))


def shipped_pool() -> Path | None:
    """The default pool bundle that ships inside poe_core, when this build has one."""
    candidate = resources.files("poe_core") / "pools" / "cifar100"
    path = Path(str(candidate))
    return path if (path / MANIFEST).is_file() else None


def import_default_pool(db: Database, blobs: BlobStore, setting: str | None) -> int | None:
    """At first start (no pool at all), import and activate the default bundle:
    POE_DEFAULT_POOL, else the shipped one; 'none' disables this."""
    if setting is not None and setting.strip().lower() in ("", "none"):
        return None
    with db.session() as session:
        if session.scalar(select(func.count()).select_from(PoolVersion)):
            return None
    bundle = Path(setting) if setting else shipped_pool()
    if bundle is None:
        log.warning("no pool to serve yet: this build ships no default pool; import one with "
                    "`poe pool import DIR` or run an extraction job")
        return None
    return import_pool(db, blobs, bundle, source=f"default pool {bundle}", activate=True)


@dataclass(frozen=True)
class ServedPool:
    """A loaded pool version and its assembler; immutable, shared by requests."""

    version: int
    pool: Pool
    assembler: Assembler

    @property
    def pool_id(self) -> str:
        return self.pool.pool_id


class PoolRegistry:
    """Loads pool versions on demand and knows which one is active.

    The active version is read from the database at most every `ttl` seconds, so an
    activation by another process (a worker, the CLI) is seen within that time; an
    activation through this process is seen at once.
    """

    def __init__(self, db: Database, blobs: BlobStore, pools_dir: Path, ttl: float = 1.0,
                 keep: int = 4) -> None:
        self.db = db
        self.blobs = blobs
        self.pools_dir = Path(pools_dir)
        self.ttl = ttl
        self.keep = keep
        self._loaded: dict[int, ServedPool] = {}
        self._lock = threading.Lock()
        self._active: tuple[float, int | None] = (0.0, None)

    def active_version(self) -> int | None:
        checked, version = self._active
        if time.monotonic() - checked > self.ttl:
            with self.db.session() as session:
                version = active_version(session)
            self._active = (time.monotonic(), version)
        return version

    def active_if_fresh(self) -> ServedPool | None:
        """The active pool when that needs neither a query nor a load (else None): for
        callers on the event loop, who go to a thread otherwise."""
        checked, version = self._active
        if version is None or time.monotonic() - checked > self.ttl:
            return None
        return self._loaded.get(version)

    def forget_active(self) -> None:
        self._active = (0.0, None)

    def active(self) -> ServedPool:
        version = self.active_version()
        if version is None:
            raise PoolUnavailable("no active pool: import one (`poe pool import DIR`) or run an "
                                  "extraction job (POST /admin/extractions)")
        return self.get(version)

    def get(self, version: int) -> ServedPool:
        served = self._loaded.get(version)
        if served is not None:
            return served
        with self._lock:
            if version not in self._loaded:
                self._loaded[version] = self._load(version)
                self._evict()
            return self._loaded[version]

    def _evict(self) -> None:
        active = self._active[1]
        for version in list(self._loaded)[:-self.keep]:
            if version != active:
                del self._loaded[version]

    def _load(self, version: int) -> ServedPool:
        with self.db.session() as session:
            row = session.get(PoolVersion, version)
            if row is None:
                raise PoolNotFound(f"pool version {version} does not exist")
            files = {f.path: f.sha256 for f in row.files}
            directory = self.pools_dir / f"{version}-{row.pool_id}"
        try:
            pool = self._load_dir(directory, files)
        except (PoolError, BlobError) as e:
            raise PoolUnavailable(f"pool version {version} cannot be loaded: {e}") from e
        return ServedPool(version, pool, Assembler(pool, pool_version=str(version)))

    def _load_dir(self, directory: Path, files: dict[str, str]) -> Pool:
        if (directory / MANIFEST).is_file():
            try:
                return load_pool(directory)
            except PoolError as e:
                log.warning("laid-out pool %s is damaged (%s); laying it out again from the blobs",
                            directory, e)
                shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            for rel, sha in files.items():
                self.blobs.link_to(sha, tmp / rel)
            try:
                tmp.rename(directory)
            except OSError:
                if not (directory / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process laid it out first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return load_pool(directory)
