import os

import pytest

from app.files import file_sha256
from app.store.blobs import BlobError, BlobStore


def _source(tmp_path, data: bytes):
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path


def test_put_file_is_content_addressed_and_stores_a_copy(tmp_path):
    source = _source(tmp_path, b"\x08\x07" * 1000)
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put_file(source)
    assert digest == file_sha256(source)
    assert blobs.put_file(source) == digest
    assert blobs.location(digest) == f"{digest[:2]}/{digest[2:]}"
    assert list(blobs.tmp.iterdir()) == []  # written through a temporary file, renamed into place
    source.write_bytes(b"changed later")
    assert blobs.path(digest).read_bytes() == b"\x08\x07" * 1000
    blobs.verify(digest)


def test_corrupt_blob_is_reported_never_returned(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put_file(_source(tmp_path, b"a" * 100))
    path = blobs.path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(b"b" * 100)
    with pytest.raises(BlobError, match="corrupt"):
        blobs.verify(digest)
    with pytest.raises(BlobError, match="corrupt") as e:
        blobs.link_to(digest, tmp_path / "out" / "file")
    assert str(tmp_path) not in str(e.value)  # messages reach clients: no paths


def test_put_file_repairs_a_corrupt_blob_without_touching_its_links(tmp_path):
    source = _source(tmp_path, b"expert part")
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put_file(source)
    link = tmp_path / "pool" / "part.onnx"
    blobs.link_to(digest, link)
    os.chmod(link, 0o644)
    link.write_bytes(b"expert pXrt")  # the blob too: one inode
    with pytest.raises(BlobError, match="corrupt"):
        blobs.verify(digest)
    assert blobs.put_file(source) == digest
    blobs.verify(digest)
    assert link.read_bytes() == b"expert pXrt"  # a new file took the blob's name


def test_missing_blob_is_reported(tmp_path):
    blobs = BlobStore(tmp_path)
    with pytest.raises(BlobError, match="missing"):
        blobs.verify("0" * 64)


def test_link_to_lays_out_a_verified_copy(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    digest = blobs.put_file(_source(tmp_path, b"logits"))
    blobs.link_to(digest, tmp_path / "pool" / "logits" / "x.npy")
    assert (tmp_path / "pool" / "logits" / "x.npy").read_bytes() == b"logits"
