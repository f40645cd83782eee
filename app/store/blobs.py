"""Content-addressed blobs: a file per sha256 under the blob directory.

Writes go to a temporary file that is renamed into place, so a blob is either absent
or complete; reads check the sha256, so a corrupt blob is reported, never served.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from poe_core.pool import sha256_file


class BlobError(Exception):
    """A blob that cannot be read: missing or corrupt. The message says which and where."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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

    def put(self, data: bytes, *, durable: bool = True) -> str:
        """Store `data`; return its sha256. `durable` fsyncs before the rename: skipped for
        blobs that can be derived again (assembled models), where a torn write after a
        power cut is caught by the hash check and rebuilt."""
        digest = sha256_bytes(data)
        if not self.exists(digest):
            self._place(digest, lambda f: f.write(data), durable)
        return digest

    def put_file(self, source: Path) -> str:
        digest = sha256_file(source)
        if not self.exists(digest):
            with open(source, "rb") as src:
                self._place(digest, lambda f: shutil.copyfileobj(src, f, 1 << 20), True)
            if sha256_file(self.path(digest)) != digest:
                self.path(digest).unlink(missing_ok=True)
                raise BlobError(f"{source} changed while it was being stored")
        return digest

    def _place(self, digest: str, write, durable: bool) -> None:
        target = self.path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=digest[:12] + ".")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, verified against its name."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobError(f"blob {sha256[:12]}... is missing from {self.root}") from None
        actual = sha256_bytes(data)
        if actual != sha256:
            raise BlobError(f"blob {sha256[:12]}... in {self.root} is corrupt "
                            f"(its content hashes to {actual[:12]}...)")
        return data

    def verify(self, sha256: str) -> None:
        """Check a blob without holding it in memory."""
        path = self.path(sha256)
        if not path.is_file():
            raise BlobError(f"blob {sha256[:12]}... is missing from {self.root}")
        if sha256_file(path) != sha256:
            raise BlobError(f"blob {sha256[:12]}... in {self.root} is corrupt")

    def link_to(self, sha256: str, dest: Path) -> None:
        """Make the blob appear at `dest` (a hard link when possible), verified."""
        self.verify(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.path(sha256), dest)
        except OSError:
            shutil.copyfile(self.path(sha256), dest)

    def discard(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
