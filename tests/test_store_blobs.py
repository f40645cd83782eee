import os

import pytest

from app.store.blobs import BlobError, BlobStore, sha256_bytes


def test_put_get_roundtrip_is_content_addressed(tmp_path):
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"expert weights")
    assert digest == sha256_bytes(b"expert weights")
    assert blobs.put(b"expert weights") == digest
    assert blobs.get(digest) == b"expert weights"
    assert blobs.location(digest) == f"{digest[:2]}/{digest[2:]}"
    assert list(blobs.tmp.iterdir()) == []  # written through a temporary file, renamed into place


def test_put_file_stores_a_copy(tmp_path):
    source = tmp_path / "library.onnx"
    source.write_bytes(b"\x08\x07" * 1000)
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put_file(source)
    source.write_bytes(b"changed later")
    assert blobs.get(digest) == b"\x08\x07" * 1000


def test_corrupt_blob_is_reported_never_returned(tmp_path):
    blobs = BlobStore(tmp_path)
    digest = blobs.put(b"a" * 100)
    path = blobs.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"b" * 100)
    with pytest.raises(BlobError, match="corrupt"):
        blobs.get(digest)
    with pytest.raises(BlobError, match="corrupt"):
        blobs.verify(digest)
    with pytest.raises(BlobError, match="corrupt"):
        blobs.link_to(digest, tmp_path / "out" / "file")


def test_missing_blob_is_reported(tmp_path):
    blobs = BlobStore(tmp_path)
    with pytest.raises(BlobError, match="missing"):
        blobs.get("0" * 64)


def test_link_to_lays_out_a_verified_copy(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put(b"logits")
    blobs.link_to(digest, tmp_path / "pool" / "logits" / "x.npy")
    assert (tmp_path / "pool" / "logits" / "x.npy").read_bytes() == b"logits"
