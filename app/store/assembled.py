"""The assembled-model cache: hot models in memory, every model ever assembled as a
row plus a blob, and one assembly per key however many requests ask for it at once.

The key is (pool version, sorted tasks, output, weights): a composite task is a set of
primitive tasks, so its model, its bytes and its ETag do not depend on the order the
request listed them in; the class order is the sorted task order and is told in the
metadata (and in the ONNX file's own metadata).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import bindparam, select, update

from app.store.blobs import BlobError, BlobStore, sha256_bytes
from app.store.db import Database
from app.store.pools import PoolRegistry, ServedPool
from app.store.rows import add_artifacts, insert_ignore
from app.store.tables import AssembledModel, PoolVersion, utcnow

log = logging.getLogger(__name__)

OUTPUTS = {False: "logits", True: "probabilities"}


@dataclass(frozen=True)
class ModelInfo:
    """Everything known about an assembled model except its bytes."""

    id: str
    pool_version: int
    pool_id: str
    tasks: tuple[str, ...]
    output: str
    weights: str
    sha256: str
    size: int
    labels: tuple[str, ...]
    params: int
    flops: int
    val_acc: float
    normalization: dict
    image_shape: list[int]
    created_at: datetime


@dataclass(frozen=True)
class CachedModel:
    info: ModelInfo
    data: bytes = field(repr=False)


def model_id(pool_id: str, version: int, tasks: tuple[str, ...], output: str, weights: str) -> str:
    key = f"{pool_id}/{version}/{','.join(tasks)}/{output}/{weights}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class HotModels:
    """A byte-bounded LRU of assembled models, shared by the request threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._models: OrderedDict[str, CachedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedModel | None:
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
            return model

    def put(self, model: CachedModel) -> None:
        size = len(model.data)
        if size > self.max_bytes:
            return
        with self._lock:
            if model.info.id in self._models:
                return
            self._models[model.info.id] = model
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._models.popitem(last=False)
                self.bytes -= len(old.data)

    def __len__(self) -> int:
        return len(self._models)


class ModelWriter:
    """Stores new models (blob, then row) on a thread of its own, so a request that
    assembled a model answers without waiting for the disk and the database. A model is
    findable while it waits: `pending` holds it until its row is committed."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs
        self.pending: dict[str, CachedModel] = {}
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def store(self, model: CachedModel, row: AssembledModel) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="model-writer", daemon=True)
                self._thread.start()
            self.pending[model.info.id] = model
        self._queue.put((model, row))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            model, row = item
            try:
                self._write(model, row)
            except Exception:
                log.exception("storing assembled model %s failed", model.info.id)
            finally:
                self.pending.pop(model.info.id, None)
                self._queue.task_done()

    def _write(self, model: CachedModel, row: AssembledModel) -> None:
        # Derived data: no fsync; a torn blob fails its hash check and is assembled again.
        self.blobs.put(model.data, durable=False)
        values = {c.key: getattr(row, c.key) for c in AssembledModel.__table__.columns}
        with self.db.session() as session:
            add_artifacts(session, [(row.sha256, "model", row.size, self.blobs.location(row.sha256))])
            # Another API process may have stored the same key meanwhile: same bytes, keep its row.
            insert_ignore(session, AssembledModel.__table__, [values])

    def flush(self) -> None:
        """Wait until every model handed over so far is stored."""
        self._queue.join()

    def close(self) -> None:
        """Store what is pending, then stop the thread (a later store starts a new one)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()


class ModelCache:
    def __init__(self, db: Database, blobs: BlobStore, pools: PoolRegistry, max_bytes: int) -> None:
        self.db = db
        self.blobs = blobs
        self.pools = pools
        self.hot = HotModels(max_bytes)
        self.writer = ModelWriter(db, blobs)
        self.assemblies = 0
        self._flights: dict[str, Future] = {}
        self._hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    @staticmethod
    def key(served: ServedPool, tasks, softmax: bool, weights: str) -> tuple[str, tuple[str, ...], str]:
        """(id, sorted tasks, output) of a request; the tasks must be validated already."""
        ordered = tuple(sorted(tasks))
        output = OUTPUTS[softmax]
        return model_id(served.pool_id, served.version, ordered, output, weights), ordered, output

    def peek(self, served: ServedPool, tasks, softmax: bool, weights: str) -> CachedModel | None:
        """A hot model, or None: the cheap path, fit to run on the event loop."""
        model = self.hot.get(self.key(served, tasks, softmax, weights)[0])
        if model is not None:
            self._hit(model.info.id)
        return model

    def get_or_create(self, served: ServedPool, tasks, softmax: bool = False,
                      weights: str = "fp32") -> CachedModel:
        """The model for validated `tasks`: from memory, from the store, or assembled;
        concurrent callers with one key share one load or assembly (single flight)."""
        ident, ordered, output = self.key(served, tasks, softmax, weights)
        model = self.hot.get(ident)
        if model is None:
            model = self._single_flight(ident, lambda: self._load_or_assemble(
                served, ident, ordered, output, weights))
        self._hit(ident)
        return model

    def _single_flight(self, ident: str, produce) -> CachedModel:
        with self._lock:
            flight = self._flights.get(ident)
            leader = flight is None
            if leader:
                flight = self._flights[ident] = Future()
        if not leader:
            return flight.result()
        try:
            model = produce()
            self.hot.put(model)
            flight.set_result(model)
            return model
        except BaseException as e:
            flight.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._flights[ident]

    def _load_or_assemble(self, served: ServedPool, ident: str, tasks: tuple[str, ...], output: str,
                          weights: str) -> CachedModel:
        pending = self.writer.pending.get(ident)
        if pending is not None:
            return pending
        with self.db.session() as session:
            row = session.get(AssembledModel, ident)
            info = None if row is None else self._info(row, served.pool.manifest)
        if info is not None:
            try:
                return CachedModel(info, self.blobs.get(info.sha256))
            except BlobError as e:
                log.error("assembled model %s: %s; assembling it again", ident, e)
                self.blobs.discard(info.sha256)
        return self._assemble(served, ident, tasks, output, weights)

    def _assemble(self, served: ServedPool, ident: str, tasks: tuple[str, ...], output: str,
                  weights: str) -> CachedModel:
        t0 = time.perf_counter()
        assembled = served.assembler.assemble(tasks, softmax=output == "probabilities", weights=weights)
        assembly_ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            self.assemblies += 1
        pool = served.pool
        now = utcnow()
        row = AssembledModel(
            id=ident, pool_version=served.version, tasks=",".join(tasks), output=output, weights=weights,
            sha256=sha256_bytes(assembled.data), size=len(assembled.data), labels=list(assembled.labels),
            params=pool.composite_params(tasks), flops=pool.composite_flops(tasks),
            val_acc=pool.composite_accuracy(tasks, weights), assembly_ms=round(assembly_ms, 3), hits=0,
            created_at=now, last_used_at=now)
        model = CachedModel(self._info(row, pool.manifest), assembled.data)
        log.info("assembled %s for pool %d in %.2f ms (%d bytes)", row.tasks, served.version, assembly_ms,
                 row.size)
        self.writer.store(model, row)
        return model

    @staticmethod
    def _info(row: AssembledModel, manifest: dict) -> ModelInfo:
        return ModelInfo(
            id=row.id, pool_version=row.pool_version, pool_id=manifest["pool_id"],
            tasks=tuple(row.tasks.split(",")), output=row.output, weights=row.weights, sha256=row.sha256,
            size=row.size, labels=tuple(row.labels), params=row.params, flops=row.flops,
            val_acc=row.val_acc, normalization=manifest["normalization"],
            image_shape=manifest["dataset"]["image_shape"], created_at=row.created_at,
        )

    def describe(self, ident: str) -> ModelInfo | None:
        """Metadata of any model ever assembled (of any pool version), or None."""
        model = self.hot.get(ident) or self.writer.pending.get(ident)
        if model is not None:
            return model.info
        with self.db.session() as session:
            found = session.execute(
                select(AssembledModel, PoolVersion.manifest)
                .join(PoolVersion, PoolVersion.version == AssembledModel.pool_version)
                .where(AssembledModel.id == ident)).first()
            return None if found is None else self._info(*found)

    def fetch(self, info: ModelInfo) -> CachedModel:
        """The bytes of a described model; rebuilt from its pool when the blob is damaged."""
        model = self.hot.get(info.id)
        if model is None:
            served = self.pools.get(info.pool_version)
            model = self.get_or_create(served, info.tasks, info.output == "probabilities", info.weights)
        else:
            self._hit(info.id)
        return model

    def _hit(self, ident: str) -> None:
        with self._lock:
            self._hits[ident] += 1

    def flush_hits(self) -> None:
        """Write the hit counts gathered in memory (one UPDATE per model, batched)."""
        self.writer.flush()  # the rows to count on
        with self._lock:
            hits, self._hits = self._hits, Counter()
        if not hits:
            return
        stmt = (update(AssembledModel).where(AssembledModel.id == bindparam("model_id"))
                .values(hits=AssembledModel.hits + bindparam("n"), last_used_at=bindparam("now")))
        now = utcnow()
        with self.db.session() as session:
            session.connection().execute(stmt, [{"model_id": k, "n": n, "now": now} for k, n in hits.items()])
