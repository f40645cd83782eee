"""Composite models as functions of the query: no bytes and no rows per query.

A model is determined by (pool version, sorted tasks, output, weights), and so is its
id, which spells that query out: "<version>-<pool id[:8]>-<task set as a hex bit mask
over the pool's tasks>-<output>-<weights>". Any id ever issued therefore resolves after
any restart, on any replica: the model is assembled again (a few memory copies) and has
the same bytes and ETag. Bytes live only in bounded in-memory LRU caches; `.ort`
conversions (tens of milliseconds in onnxruntime) run on a small executor of their own,
so they never hold up the event loop or the requests that need no conversion.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

from cachetools import LRUCache

from app.serving.registry import ServedPool
from app.store.db import Database
from app.store.rows import add_task_requests
from poe_core.formats import FORMATS, to_ort

OUTPUTS = ("logits", "probabilities")
ONNX = "application/octet-stream"
MAX_VERSION = 2**31 - 1  # the pools.version column's range
MODEL_ID = re.compile(r"(\d{1,10})-([0-9a-f]{8})-([0-9a-f]{1,64})-(logits|probabilities)-(fp32|fp16|int8)")


class ServerBusy(Exception):
    """Too much conversion work queued; the client should retry shortly."""


@dataclass(frozen=True)
class Query:
    """A validated composite-model query: the sorted primitive tasks and the options."""

    tasks: tuple[str, ...]
    output: str = "logits"
    weights: str = "fp32"

    @classmethod
    def of(cls, tasks, softmax: bool = False, weights: str = "fp32") -> Query:
        return cls(tuple(sorted(tasks)), OUTPUTS[softmax], weights)


def model_id(served: ServedPool, query: Query) -> str:
    position = served.positions
    mask = sum(1 << position[t] for t in query.tasks)
    return f"{served.version}-{served.pool_id[:8]}-{mask:x}-{query.output}-{query.weights}"


def parse_model_id(ident: str) -> tuple[int, str, int, str, str] | None:
    """(version, pool id prefix, task mask, output, weights) of a well-formed id, else None."""
    found = MODEL_ID.fullmatch(ident)
    if found is None or int(found[1]) > MAX_VERSION:
        return None
    return int(found[1]), found[2], int(found[3], 16), found[4], found[5]


def query_of(served: ServedPool, ident: str) -> Query | None:
    """The query an id names in this pool version, or None if it names none (ids are
    canonical: one id per model)."""
    parsed = parse_model_id(ident)
    if parsed is None:
        return None
    version, pool_prefix, mask, output, weights = parsed
    tasks = served.tasks
    if version != served.version or pool_prefix != served.pool_id[:8] or not 0 < mask < 1 << len(tasks):
        return None
    query = Query(tuple(sorted(t for i, t in enumerate(tasks) if mask >> i & 1)), output, weights)
    return query if model_id(served, query) == ident else None


@dataclass(frozen=True)
class ModelInfo:
    """Everything told about a model file except its bytes."""

    id: str
    pool_version: int
    pool_id: str
    tasks: tuple[str, ...]
    output: str
    weights: str
    format: str
    sha256: str
    size: int
    labels: tuple[str, ...]
    params: int
    flops: int
    val_acc: float
    val_acc_by_format: dict[str, float | None]
    val_acc_by_class: dict[str, float]
    normalization: dict
    image_shape: list[int]
    created_at: datetime


def file_name(tasks, output: str, weights: str, ident: str, file_format: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "_", "+".join(tasks))
    if len(stem) > 80:
        stem = f"{len(tasks)}-tasks-{hashlib.sha256(ident.encode()).hexdigest()[:8]}"
    suffix = ("-softmax" if output == "probabilities" else "") + ("" if weights == "fp32" else f"-{weights}")
    return f"poe-{stem}{suffix}.{file_format}"


@dataclass
class ServedModel:
    """A model file (ONNX, or its ORT conversion) and what is told about it."""

    served: ServedPool
    query: Query
    id: str
    data: bytes = field(repr=False)
    labels: tuple[str, ...]
    format: str = "onnx"

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    @cached_property
    def headers(self) -> dict[str, str]:
        q = self.query
        name = file_name(q.tasks, q.output, q.weights, self.id, self.format)
        return {
            "ETag": f'"{self.sha256}"',
            "Cache-Control": "public, max-age=31536000, immutable",
            "X-Model-Id": self.id,
            "Content-Disposition": f'attachment; filename="{name}"',
        }

    @property
    def info(self) -> ModelInfo:
        """Computed when asked (a metadata answer): the ONNX answer needs none of it."""
        pool, q = self.served.pool, self.query
        by_format = {w: pool.composite_accuracy(q.tasks, w) if pool.format_info(w)["available"] else None
                     for w in FORMATS}
        return ModelInfo(
            id=self.id, pool_version=self.served.version, pool_id=self.served.pool_id, tasks=q.tasks,
            output=q.output, weights=q.weights, format=self.format, sha256=self.sha256, size=self.size,
            labels=self.labels, params=pool.composite_params(q.tasks), flops=pool.composite_flops(q.tasks),
            val_acc=by_format[q.weights], val_acc_by_format=by_format,
            val_acc_by_class=pool.accuracy_by_class(pool.query(q.tasks), q.weights),
            normalization={"mean": pool.mean, "std": pool.std}, image_shape=pool.image_shape,
            # The model exists, as a function, since its pool version does.
            created_at=self.served.created_at,
        )


class ModelCache:
    """Assembled ONNX models in a byte-bounded LRU, keyed by model id. Assembly takes
    tens of microseconds, so it runs under the cache's lock: concurrent requests for one
    new model assemble it once."""

    def __init__(self, max_bytes: int) -> None:
        self._models: LRUCache = LRUCache(maxsize=max_bytes, getsizeof=lambda m: m.size)
        self._lock = threading.Lock()
        self.assemblies = 0

    def get(self, served: ServedPool, query: Query) -> ServedModel:
        """The model of a validated query in a weight format the pool offers."""
        ident = model_id(served, query)
        with self._lock:
            model = self._models.get(ident)
            if model is None:
                assembled = served.assembler.assemble(query.tasks, softmax=query.output == "probabilities",
                                                      weights=query.weights)
                self.assemblies += 1
                model = ServedModel(served, query, ident, assembled.data, assembled.labels)
                if model.size <= self._models.maxsize:
                    self._models[ident] = model
        return model

    @property
    def bytes(self) -> int:
        return self._models.currsize

    def __len__(self) -> int:
        return len(self._models)


class OrtFiles:
    """ORT-format conversions, keyed by the ONNX file's sha256 (shared safely by every
    pool version): converted on `workers` threads of their own, once per key however
    many ask at once, at most `max_pending` waiting (then ServerBusy); the last `size`
    results stay in memory."""

    def __init__(self, size: int = 64, workers: int = 1, max_pending: int = 32) -> None:
        self._files: LRUCache = LRUCache(maxsize=size)
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self.max_pending = max_pending

    def _convert(self, model: ServedModel) -> ServedModel:
        converted = ServedModel(model.served, model.query, model.id, to_ort(model.data), model.labels, "ort")
        with self._lock:
            self._files[model.sha256] = converted
            del self._pending[model.sha256]
        return converted

    async def get(self, model: ServedModel) -> ServedModel:
        key = model.sha256
        with self._lock:
            found = self._files.get(key)
            if found is not None:
                return found
            future = self._pending.get(key)
            if future is None:
                if len(self._pending) >= self.max_pending:
                    raise ServerBusy(f"{len(self._pending)} ORT conversions are waiting; retry shortly")
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="ort")
                future = self._pending[key] = self._executor.submit(self._convert, model)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)


class RequestCounts:
    """Requests per (pool version, primitive task), gathered in memory and added to the
    task_requests table by `flush`: bounded by the pools' tasks, whatever clients ask."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[int, str]] = Counter()
        self._lock = threading.Lock()

    def count(self, version: int, tasks) -> None:
        with self._lock:
            for task in tasks:
                self._counts[version, task] += 1

    def flush(self, db: Database) -> None:
        with self._lock:
            counts, self._counts = self._counts, Counter()
        if counts:
            try:
                with db.session() as session:
                    add_task_requests(session, counts)
            except BaseException:
                with self._lock:  # kept for the next flush
                    self._counts.update(counts)
                raise
