"""The long-lived objects of a process (API or worker) built from the settings."""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from app.settings import Settings
from app.store import db as store_db
from app.store.assembled import ModelCache
from app.store.blobs import BlobStore
from app.store.db import Database
from app.store.pools import PoolRegistry, import_default_pool

log = logging.getLogger(__name__)


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_url)
        self.blobs = BlobStore(settings.blob_dir)
        self.pools = PoolRegistry(self.db, self.blobs, settings.pools_dir, ttl=settings.active_pool_ttl)
        self.models = ModelCache(self.db, self.blobs, self.pools, settings.model_cache_bytes)

    @classmethod
    def start(cls, settings: Settings, *, default_pool: bool = True) -> Services:
        """Migrate the database if configured to, then import the default pool at first start."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.auto_migrate:
            store_db.upgrade(settings.db_url)
        services = cls(settings)
        if default_pool:
            import_default_pool(services.db, services.blobs, settings.default_pool)
        return services

    def close(self) -> None:
        self.models.flush_hits()
        self.models.writer.close()
        self.db.dispose()


def admin_token(settings: Settings) -> str | None:
    """POE_ADMIN_TOKEN; in embedded mode without it, a token generated once and kept in
    the data directory (mode 0600). None: the admin API is closed."""
    if settings.admin_token:
        return settings.admin_token
    if not settings.embedded:
        return None
    path: Path = settings.admin_token_file
    if not path.exists():
        # Written whole under a temporary name, then linked into place: a process that
        # starts at the same moment reads either no file or the complete token.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".admin-token.")
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)
            log.warning("generated an admin token: it is in %s (readable by this user only)",
                        path.resolve())
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return path.read_text().strip() or None
