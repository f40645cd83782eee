"""Content-addressed blobs: a file per sha256 under the blob directory, or, with
POE_BLOB_URL=s3://bucket/prefix, an object per sha256 in a bucket that every replica and
worker shares, the blob directory then being this host's read-through cache of it.

Writes go to a temporary file that is renamed into place (S3 puts are atomic too), so a
blob is either absent or complete; reads check the sha256, so a corrupt blob is reported,
never served: a cached copy that fails the check is fetched again from the bucket, and
an object that fails it while it is fetched is not cached. Error messages name the blob,
not the directory or the bucket: they can reach unauthenticated clients.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import obstore
from obstore.store import S3Store

from app.files import atomic_write, file_sha256

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PREFETCH = 8  # blobs fetched at once


class BlobError(Exception):
    """A blob that cannot be read: missing or corrupt. The message says which."""


def s3_bucket(url: str) -> S3Store:
    """The obstore S3Store of `s3://bucket/prefix`. Credentials, region and endpoint come
    from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL, ...); a plain-http endpoint (MinIO
    on a private network) is allowed when the endpoint says http://."""
    endpoint = next((os.environ[v] for v in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")
                     if os.environ.get(v)), "")
    # A bucket that does not answer fails a pool's load in seconds (the registry tries
    # again after its TTL), not after object_store's default three minutes of retries.
    return S3Store.from_url(url, client_options={"allow_http": endpoint.startswith("http://"),
                                                 "connect_timeout": timedelta(seconds=5),
                                                 "timeout": timedelta(seconds=60)},
                            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=20),
                                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                      "max_backoff": timedelta(seconds=2), "base": 2}})


class BlobStore:
    """Blobs under `root`; with `bucket` (an obstore store), blobs in the bucket and
    `root` a cache of those this host has read or written."""

    def __init__(self, root: Path, bucket: S3Store | None = None) -> None:
        self.root = Path(root)
        self.bucket = bucket
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, root: Path, url: str | None) -> BlobStore:
        """The blob store a POE_BLOB_URL names (None: the directory `root` alone)."""
        return cls(root, s3_bucket(url) if url else None)

    @staticmethod
    def location(sha256: str) -> str:
        """The blob's path relative to the store root (what the artifacts table records);
        also its key under the bucket's prefix."""
        return f"{sha256[:2]}/{sha256[2:]}"

    def path(self, sha256: str) -> Path:
        """Where the blob is (or would be) on this host."""
        return self.root / self.location(sha256)

    def put_file(self, source: Path) -> str:
        """Store a copy of `source`; return its sha256. A stored blob that is corrupt is
        replaced by the good copy (a new file: links to the damaged one keep their bytes;
        a new object in the bucket)."""
        digest = file_sha256(source)
        if not (self.path(digest).is_file() and file_sha256(self.path(digest)) == digest):
            with open(source, "rb") as src:
                atomic_write(self.path(digest), lambda f: shutil.copyfileobj(src, f, CHUNK), mode=0o444,
                             tmp_dir=self.tmp)
            if file_sha256(self.path(digest)) != digest:
                self.path(digest).unlink(missing_ok=True)
                raise BlobError(f"{source} changed while it was being stored")
        if self.bucket is not None and self._in_bucket(digest) != digest:
            obstore.put(self.bucket, self.location(digest), self.path(digest))
            log.info("blob %s... uploaded to the bucket", digest[:12])
        return digest

    def _in_bucket(self, sha256: str) -> str | None:
        """The sha256 of the bucket's object for this blob (None: there is none)."""
        digest = hashlib.sha256()
        try:
            for chunk in obstore.get(self.bucket, self.location(sha256)).stream(min_chunk_size=CHUNK):
                digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def _fetch(self, sha256: str) -> None:
        """Copy the blob from the bucket into the cache, checking its sha256 on the way."""
        def write(f) -> None:
            digest = hashlib.sha256()
            for chunk in obstore.get(self.bucket, self.location(sha256)).stream(min_chunk_size=CHUNK):
                digest.update(chunk)
                f.write(chunk)
            if digest.hexdigest() != sha256:
                raise BlobError(f"blob {sha256[:12]}... is corrupt")

        try:
            atomic_write(self.path(sha256), write, mode=0o444, tmp_dir=self.tmp)
        except FileNotFoundError:
            raise BlobError(f"blob {sha256[:12]}... is missing") from None
        except BlobError:
            raise
        except Exception as e:  # the bucket's address and answer stay in the log, not in the message
            log.error("blob %s...: cannot fetch it from the bucket: %s", sha256[:12], e)
            raise BlobError(f"blob {sha256[:12]}... cannot be fetched from the object store "
                            f"({type(e).__name__})") from None
        log.info("blob %s... fetched from the bucket", sha256[:12])

    def prefetch(self, digests: Iterable[str]) -> None:
        """With a bucket: fetch the blobs this host has not cached, PREFETCH at a time, so
        a pool version's first load on a replica waits for a few round trips, not one per
        file. A blob that fails is left for `verify` to report."""
        if self.bucket is None:
            return
        missing = sorted({d for d in digests if not self.path(d).is_file()})
        if len(missing) > 1:
            with ThreadPoolExecutor(PREFETCH, thread_name_prefix="blob-fetch") as pool:
                list(pool.map(self._fetch_or_log, missing))

    def _fetch_or_log(self, sha256: str) -> None:
        try:
            self._fetch(sha256)
        except BlobError as e:
            log.warning("%s", e)

    def verify(self, sha256: str) -> None:
        """Check a blob without holding it in memory (with a bucket: make sure this host's
        cache has an intact copy)."""
        path = self.path(sha256)
        if path.is_file() and file_sha256(path) == sha256:
            return
        if self.bucket is not None:
            if path.is_file():
                log.warning("cached blob %s... is corrupt; fetching it again", sha256[:12])
            return self._fetch(sha256)
        if not path.is_file():
            raise BlobError(f"blob {sha256[:12]}... is missing")
        raise BlobError(f"blob {sha256[:12]}... is corrupt")

    def link_to(self, sha256: str, dest: Path) -> None:
        """Make the blob appear at `dest` (a hard link when possible), verified."""
        self.verify(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(self.path(sha256), dest)
        except OSError:
            shutil.copyfile(self.path(sha256), dest)
