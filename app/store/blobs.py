"""Content-addressed blobs: a file per sha256 under the blob directory.

Writes go to a temporary file that is renamed into place, so a blob is either absent
or complete; reads check the sha256, so a corrupt blob is reported, never served. Error
messages name the blob, not the directory: they can reach unauthenticated clients.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from app.files import atomic_write, file_sha256


class BlobError(Exception):
    """A blob that cannot be read: missing or corrupt. The message says which."""


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def location(sha256: str) -> str:
        """The blob's path relative to the store root (what the artifacts table records)."""
        return f"{sha256[:2]}/{sha256[2:]}"

    def path(self, sha256: str) -> Path:
        return self.root / self.location(sha256)

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_file(self, source: Path) -> str:
        """Store a copy of `source`; return its sha256. A stored blob that is corrupt is
        replaced by the good copy (a new file: links to the damaged one keep their bytes)."""
        digest = file_sha256(source)
        if self.exists(digest) and file_sha256(self.path(digest)) == digest:
            return digest
        with open(source, "rb") as src:
            atomic_write(self.path(digest), lambda f: shutil.copyfileobj(src, f, 1 << 20), mode=0o444,
                         tmp_dir=self.tmp)
        if file_sha256(self.path(digest)) != digest:
            self.path(digest).unlink(missing_ok=True)
            raise BlobError(f"{source} changed while it was being stored")
        return digest

    def verify(self, sha256: str) -> None:
        """Check a blob without holding it in memory."""
        path = self.path(sha256)
        if not path.is_file():
            raise BlobError(f"blob {sha256[:12]}... is missing")
        if file_sha256(path) != sha256:
            raise BlobError(f"blob {sha256[:12]}... is corrupt")

    def link_to(self, sha256: str, dest: Path) -> None:
        """Make the blob appear at `dest` (a hard link when possible), verified."""
        self.verify(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.path(sha256), dest)
        except OSError:
            shutil.copyfile(self.path(sha256), dest)
