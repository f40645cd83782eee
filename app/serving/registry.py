"""Pool versions loaded for serving, and which one is active.

To serve a version, its files are laid out again as a bundle directory (hard links to
the verified blobs) that poe_core loads. A blob found missing or corrupt is never served
and takes out only what needs it: a damaged file of one expert makes the queries with
that primitive task answer 503 naming the file, every other query is served (same bytes
as ever); a damaged library or manifest takes out the version. A damaged version is
loaded again (laid out from the blobs) at most every `ttl` seconds, so re-importing its
bundle, which repairs the blobs, heals it without a restart. In-flight requests hold the
ServedPool they started with, whatever is activated meanwhile.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.exc import DBAPIError

from app.serving.native import table
from app.store.blobs import BlobError, BlobStore
from app.store.db import Database
from app.store.pools import MANIFEST, PoolNotFound, active_version
from app.store.tables import PoolVersion
from poe_core.assemble import Assembler
from poe_core.formats import FORMATS
from poe_core.manifest import Manifest, parse_manifest
from poe_core.pool import QUERY_MEMO, STUDENT, Pool, PoolError, load_pool, part_key
from poe_core.taxonomy import Taxonomy

log = logging.getLogger(__name__)

class PoolUnavailable(Exception):
    """No pool can be served: none is active, or the active one cannot be loaded. The
    message says why and what repairs it."""


@dataclass(frozen=True)
class ServedPool:
    """A loaded pool version and its assembler; immutable, shared by requests."""

    version: int
    created_at: datetime
    pool: Pool  # without the damaged experts, if any
    assembler: Assembler
    tasks: tuple[str, ...]  # every primitive task of the version, in its order (damaged ones too)
    damaged: Mapping[str, str] = field(default_factory=dict)  # task -> what is wrong
    native: object | None = None  # the native lane's table (app.serving.native.table), if any
    loaded_at: float = field(default_factory=time.monotonic)

    @property
    def pool_id(self) -> str:
        return self.pool.pool_id

    @cached_property
    def positions(self) -> dict[str, int]:
        """Each primitive task's place in the pool's order (its bit in model ids)."""
        return {t: i for i, t in enumerate(self.tasks)}

    @cached_property
    def names(self):
        """What model ids and file names say of a composite model (app.serving.models.names),
        remembered per composite model."""
        from app.serving.models import names

        return lru_cache(maxsize=QUERY_MEMO)(lambda m: names(self, m))

    def require(self, tasks) -> None:
        """Raise PoolUnavailable, naming the file, if a validated task's expert is damaged."""
        if not self.damaged:
            return
        broken = [f"{t} ({self.damaged[t]})" for t in tasks if t in self.damaged]
        if broken:
            raise PoolUnavailable(f"pool version {self.version} cannot serve {', '.join(broken)}; importing "
                                  "its bundle again (`poe pool import DIR`) repairs it")


def _owners(spec: Manifest) -> dict[str, str]:
    """The primitive task whose expert each file belongs to (files of no expert: absent)."""
    owner = {}

    def claim(value, task: str) -> None:
        if isinstance(value, str):
            owner[value] = task
        elif isinstance(value, dict):
            for v in value.values():
                claim(v, task)

    for task, expert in spec.experts.items():
        claim(expert.model_dump(), task)
    return owner


def _without(directory: Path, raw: dict, damaged: Mapping[str, str]) -> Pool:
    """The pool of a partial layout, its damaged experts left out: what load_pool builds,
    without insisting on every file (their hashes were checked when laid out)."""
    spec = parse_manifest(raw)
    spec = spec.model_copy(update={"experts": {t: e for t, e in spec.experts.items() if t not in damaged}})
    parts = {part_key(t, float(w)): p for t, e in spec.experts.items() for w, p in e.widths.items()}
    if spec.student is not None:
        parts[STUDENT] = spec.student

    def logits(rel: str) -> torch.Tensor:
        return torch.from_numpy(np.load(directory / rel).astype(np.float32))

    part_logits = {f: {k: logits(p.files(f).logits) for k, p in parts.items()} for f in FORMATS}
    labels = torch.from_numpy(np.load(directory / spec.val_labels).astype(np.int64))
    return Pool(directory, raw, spec, Taxonomy.from_dict(spec.taxonomy), labels, part_logits)


class PoolRegistry:
    """Loads pool versions on demand and knows which one is active.

    The active version is read from the database at most every `ttl` seconds (the API
    refreshes it in the background, so requests never wait for SQL), so an activation by
    another process (a worker, the CLI) is seen within that time; an activation through
    this process is seen at once.
    """

    def __init__(self, db: Database, blobs: BlobStore, pools_dir: Path, ttl: float = 1.0,
                 keep: int = 4, native: bool = True) -> None:
        self.db = db
        self.blobs = blobs
        self.pools_dir = Path(pools_dir)
        self.ttl = ttl
        self.keep = keep
        self.native = native  # give each version its native lane's table where it can have one
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
        """Version `version` if it is loaded and due no reload (else None): for callers
        on the event loop, who go to a thread otherwise."""
        served = self._loaded.get(version)
        return None if served is None or self._stale(served) else served

    def _stale(self, served: ServedPool) -> bool:
        return bool(served.damaged) and time.monotonic() - served.loaded_at > self.ttl

    def get(self, version: int) -> ServedPool:
        served = self.loaded(version)
        if served is not None:
            return served
        with self._lock:
            if self.loaded(version) is None:
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
        home = self.pools_dir / f"{version}-{found.pool_id}"
        try:
            directory, damaged = self._lay_out(home, files, found.manifest)
        except BlobError as e:
            raise PoolUnavailable(f"pool version {version} cannot be served: {e}; importing its bundle "
                                  "again (`poe pool import DIR`) repairs it") from e
        try:
            pool = load_pool(directory) if directory == home else _without(directory, found.manifest, damaged)
            assembler = Assembler(pool, pool_version=str(version))
        except PoolError as e:  # said without the data directory's path: clients read it
            reason = str(e).replace(str(directory), directory.name)
            raise PoolUnavailable(f"pool version {version} cannot be loaded: {reason}") from e
        finally:
            if directory != home:  # all that is served is in memory now; the next load lays it out again
                shutil.rmtree(directory, ignore_errors=True)
        for task, why in damaged.items():
            log.error("pool version %d: primitive task %s cannot be served: %s", version, task, why)
        tasks = tuple(parse_manifest(found.manifest).experts)
        served = ServedPool(version, found.created_at, pool, assembler, tasks, damaged)
        return replace(served, native=table(served)) if self.native else served

    def _lay_out(self, directory: Path, files: dict[str, str], raw: dict) -> tuple[Path, dict[str, str]]:
        """Make `directory` a bundle of the version's verified files and return it. If
        experts' files are damaged, return instead a temporary layout without them (the
        caller removes it) and the damaged experts (task -> reason). A damaged file of no
        expert raises BlobError naming it. An intact layout is kept as it is."""
        if (directory / MANIFEST).is_file():
            try:
                load_pool(directory)
                return directory, {}
            except PoolError as e:
                log.warning("laid-out pool %s is damaged (%s); laying it out again from the blobs",
                            directory.name, e)
                shutil.rmtree(directory, ignore_errors=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        owners = None
        damaged: dict[str, str] = {}
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.blobs.prefetch(files.values())  # with a bucket: in parallel, before the checks below
            for rel, sha in files.items():
                try:
                    self.blobs.link_to(sha, tmp / rel)
                except BlobError as e:
                    if owners is None:
                        owners = _owners(parse_manifest(raw))
                    if rel not in owners:
                        raise BlobError(f"file {rel}: {e}") from e
                    damaged.setdefault(owners[rel], f"file {rel}: {e}")
            if damaged:
                return tmp, damaged
            try:
                tmp.rename(directory)
            except OSError:
                if not (directory / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process laid it out first
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory, {}
