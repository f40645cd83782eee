"""The long-lived objects of a process (API or worker) built from the settings."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from app.files import atomic_write
from app.serving import Serving
from app.serving.registry import PoolRegistry
from app.settings import Settings
from app.store import db as store_db
from app.store.blobs import BlobStore
from app.store.db import Database
from app.store.pools import import_default_pool

log = logging.getLogger(__name__)


class Services:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(settings.db_url)
        self.blobs = BlobStore.open(settings.blob_dir, settings.blob_url)
        self.serving = Serving(settings, self.db, self.blobs)

    @property
    def pools(self) -> PoolRegistry:
        """The pool versions loaded for serving (app.serving's registry)."""
        return self.serving.pools

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
        self.serving.close()
        self.db.dispose()


def admin_token(settings: Settings) -> str | None:
    """POE_ADMIN_TOKEN; in embedded mode without it, a token generated once and kept in
    the data directory (mode 0600). None: the admin API is closed."""
    if settings.admin_token:
        return settings.admin_token
    if not settings.embedded:
        return None
    path: Path = settings.admin_token_file
    # Never replaced: a process that starts at the same moment reads either no file or
    # the complete token, and both use the one that was linked first.
    if not path.exists() and atomic_write(path, (secrets.token_urlsafe(32) + "\n").encode(), replace=False):
        log.warning("generated an admin token: it is in %s (readable by this user only)", path.resolve())
    return path.read_text().strip() or None
