"""The serving runtime of an API process: pool versions loaded for serving and the
active one (registry), composite models and their ORT conversions in bounded memory
caches (models), and request counts. Nothing here is stored per query; app.store keeps
the tables, the blobs and pool import/activation."""

from __future__ import annotations

from cachetools import LRUCache

from app.serving.models import ModelCache, OrtFiles, RequestCounts
from app.serving.registry import PoolRegistry
from app.settings import Settings
from app.store.blobs import BlobStore
from app.store.db import Database

# Request bodies up to this size are remembered with the query they parse to, so a
# repeated request skips JSON parsing and validation; bigger ones are rare and parsed.
MEMO_BODY_BYTES = 1024


class Serving:
    def __init__(self, settings: Settings, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.pools = PoolRegistry(db, blobs, settings.pools_dir, ttl=settings.active_pool_ttl,
                                  native=settings.native_lane)
        self.models = ModelCache(settings.model_cache_bytes)
        self.ort = OrtFiles()
        self.counts = RequestCounts()
        # (pool version, body) -> (query, file format, model id); bounded in entries
        # and, by MEMO_BODY_BYTES, in bytes.
        self.queries: LRUCache = LRUCache(maxsize=4096)
        # (pool version, size measure, base URL, body) -> POST /models/plan's answer, likewise bounded.
        self.plans: LRUCache = LRUCache(maxsize=256)

    def flush_counts(self) -> None:
        self.counts.flush(self.db)

    def close(self) -> None:
        self.ort.close()
        self.flush_counts()
