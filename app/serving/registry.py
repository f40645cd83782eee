"""Pool versions loaded for serving, and which one is active.

To serve a version, its files are laid out again as a bundle directory (hard links to
the verified blobs) that poe_core loads. A blob found missing or corrupt makes the
version answer 503 naming the file (never its bytes); re-importing the bundle repairs
the blob, and the next load, at most `ttl` seconds later, lays the version out again.
In-flight requests hold the ServedPool they started with, whatever is activated meanwhile.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from app.store.blobs import BlobError, BlobStore
from app.store.db import Database
from app.store.pools import MANIFEST, PoolNotFound, active_version
from app.store.tables import PoolVersion
from poe_core.assemble import Assembler
from poe_core.pool import Pool, PoolError, load_pool

log = logging.getLogger(__name__)

class PoolUnavailable(Exception):
    """No pool can be served: none is active, or the active one cannot be loaded. The
    message says why and what repairs it."""


@dataclass(frozen=True)
class ServedPool:
    """A loaded pool version and its assembler; immutable, shared by requests."""

    version: int
    created_at: datetime
    pool: Pool
    assembler: Assembler

    @property
    def pool_id(self) -> str:
        return self.pool.pool_id

    @property
    def tasks(self) -> list[str]:
        """The primitive tasks, in the pool's order."""
        return self.pool.tasks

    @cached_property
    def positions(self) -> dict[str, int]:
        """Each primitive task's place in the pool's order (its bit in model ids)."""
        return {t: i for i, t in enumerate(self.pool.tasks)}


class PoolRegistry:
    """Loads pool versions on demand and knows which one is active.

    The active version is read from the database at most every `ttl` seconds (the API
    refreshes it in the background, so requests never wait for SQL), so an activation by
    another process (a worker, the CLI) is seen within that time; an activation through
    this process is seen at once.
    """

    def __init__(self, db: Database, blobs: BlobStore, pools_dir: Path, ttl: float = 1.0,
                 keep: int = 4) -> None:
        self.db = db
        self.blobs = blobs
        self.pools_dir = Path(pools_dir)
        self.ttl = ttl
        self.keep = keep
        self._loaded: dict[int, ServedPool] = {}
        self._failed: dict[int, tuple[float, PoolUnavailable]] = {}
        self._lock = threading.Lock()
        self._active: tuple[float, int | None] = (0.0, None)

    def refresh(self) -> int | None:
        """Read the active version from the database now."""
        version = self.db.read(active_version)
        self._active = (time.monotonic(), version)
        return version

    def active_version(self) -> int | None:
        checked, version = self._active
        if time.monotonic() - checked > self.ttl:
            try:
                version = self.refresh()
            except DBAPIError:
                if version is None:
                    raise
                # The database is down: the version known last keeps being served, and the
                # database is asked again after another TTL, not by every request.
                log.warning("cannot read the active pool version; serving version %d", version)
                self._active = (time.monotonic(), version)
        return version

    def active_if_fresh(self) -> ServedPool | None:
        """The active pool when that needs neither a query nor a load (else None): for
        callers on the event loop, who go to a thread otherwise."""
        checked, version = self._active
        if version is None or time.monotonic() - checked > self.ttl:
            return None
        return self.loaded(version)

    def forget_active(self) -> None:
        self._active = (0.0, None)

    def active(self) -> ServedPool:
        version = self.active_version()
        if version is None:
            raise PoolUnavailable("no active pool: import one (`poe pool import DIR`) or run an "
                                  "extraction job (POST /admin/extractions)")
        return self.get(version)

    def loaded(self, version: int) -> ServedPool | None:
        """Version `version` if it is loaded (else None): for callers on the event loop,
        who go to a thread otherwise."""
        return self._loaded.get(version)

    def get(self, version: int) -> ServedPool:
        served = self._loaded.get(version)
        if served is not None:
            return served
        with self._lock:
            if version not in self._loaded:
                failed = self._failed.get(version)
                if failed is not None and time.monotonic() - failed[0] <= self.ttl:
                    raise failed[1]  # tried moments ago: a damaged pool is not re-verified per request
                try:
                    self._loaded[version] = self._load(version)
                except PoolUnavailable as e:
                    self._failed[version] = (time.monotonic(), e)
                    raise
                self._failed.pop(version, None)
                self._evict()
            return self._loaded[version]

    def _evict(self) -> None:
        active = self._active[1]
        for version in list(self._loaded)[:-self.keep]:
            if version != active:
                del self._loaded[version]

    def _load(self, version: int) -> ServedPool:
        def row(session):
            found = session.get(PoolVersion, version)
            if found is None:
                raise PoolNotFound(f"pool version {version} does not exist")
            return found, {f.path: f.sha256 for f in found.files}

        found, files = self.db.read(row)
        directory = self.pools_dir / f"{version}-{found.pool_id}"
        try:
            self._lay_out(directory, files)
            pool = load_pool(directory)
        except BlobError as e:
            raise PoolUnavailable(f"pool version {version} cannot be served: {e}; importing its bundle "
                                  "again (`poe pool import DIR`) repairs it") from e
        except PoolError as e:  # said without the data directory's path: clients read it
            reason = str(e).replace(str(directory), directory.name)
            raise PoolUnavailable(f"pool version {version} cannot be loaded: {reason}") from e
        return ServedPool(version, found.created_at, pool, Assembler(pool, pool_version=str(version)))

    def _lay_out(self, directory: Path, files: dict[str, str]) -> None:
        """Make `directory` a bundle of the version's files, each verified (BlobError
        names the first damaged one). An intact layout is kept as it is."""
        if (directory / MANIFEST).is_file():
            try:
                load_pool(directory)
                return
            except PoolError as e:
                log.warning("laid-out pool %s is damaged (%s); laying it out again from the blobs",
                            directory.name, e)
                shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            for rel, sha in files.items():
                try:
                    self.blobs.link_to(sha, tmp / rel)
                except BlobError as e:
                    raise BlobError(f"file {rel}: {e}") from e
            try:
                tmp.rename(directory)
            except OSError:
                if not (directory / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process laid it out first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
