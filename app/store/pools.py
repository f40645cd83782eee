"""Pool versions in the store: import a bundle, activate a version.

A bundle's files become blobs and its manifest becomes rows (pool, primitive tasks,
their classes, experts) in one transaction, so a pool is visible whole or not at all.
Serving a version (loading it, assembling from it) is app.serving's business.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.store.blobs import BlobStore
from app.store.db import Database
from app.store.rows import add_artifacts, set_active_pool
from app.store.tables import ActivePool, Expert, PoolFile, PoolVersion, PrimitiveTask, TaskClass
from poe_core.pool import Pool, load_pool

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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
    bundle already imported (same pool id) is not imported twice: its version is returned,
    and any of its blobs found missing or corrupt is stored again from the bundle."""
    pool = load_pool(bundle)
    paths = [MANIFEST, *pool.manifest["files"]]
    digests = {rel: blobs.put_file(pool.path(rel)) for rel in paths}
    with db.session() as session:
        existing = session.scalar(select(PoolVersion.version).where(PoolVersion.pool_id == pool.pool_id))
    if existing is not None:
        if activate:
            activate_pool(db, existing)
        return existing
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
