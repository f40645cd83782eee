import os

import pytest
from s3_server import s3_client
from service_fixtures import free_port

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


# With POE_BLOB_URL: blobs in a bucket of a real S3 server (moto), each BlobStore below
# one replica's cache directory.

def _bucket_blobs(tmp_path, s3, name: str) -> BlobStore:
    return BlobStore.open(tmp_path / name, s3[0])


def test_bucket_blob_is_shared_through_each_replicas_cache(tmp_path, s3):
    url, bucket, env = s3
    source = _source(tmp_path, b"library part" * 500)
    a = _bucket_blobs(tmp_path, s3, "a")
    digest = a.put_file(source)
    keys = [o["Key"] for o in s3_client(env["AWS_ENDPOINT_URL"]).list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"blobs/{digest[:2]}/{digest[2:]}"]
    b = _bucket_blobs(tmp_path, s3, "b")
    assert not b.path(digest).exists()
    b.link_to(digest, tmp_path / "pool-b" / "library.onnx")
    assert (tmp_path / "pool-b" / "library.onnx").read_bytes() == b"library part" * 500
    assert b.path(digest).read_bytes() == b"library part" * 500  # cached: read once from the bucket
    assert list(b.tmp.iterdir()) == []


def test_corrupt_object_is_never_cached_and_put_file_repairs_it(tmp_path, s3):
    url, bucket, env = s3
    source = _source(tmp_path, b"expert part")
    digest = _bucket_blobs(tmp_path, s3, "a").put_file(source)
    client = s3_client(env["AWS_ENDPOINT_URL"])
    client.put_object(Bucket=bucket, Key=f"blobs/{digest[:2]}/{digest[2:]}", Body=b"expert pXrt")
    b = _bucket_blobs(tmp_path, s3, "b")
    with pytest.raises(BlobError, match="corrupt") as e:
        b.link_to(digest, tmp_path / "pool-b" / "part.onnx")
    assert bucket not in str(e.value) and "127.0.0.1" not in str(e.value)
    assert not b.path(digest).exists() and list(b.tmp.iterdir()) == []
    assert _bucket_blobs(tmp_path, s3, "c").put_file(source) == digest  # importing the bundle again
    b.verify(digest)
    assert b.path(digest).read_bytes() == b"expert part"


def test_corrupt_cached_copy_is_fetched_again(tmp_path, s3):
    digest = _bucket_blobs(tmp_path, s3, "a").put_file(_source(tmp_path, b"weights"))
    b = _bucket_blobs(tmp_path, s3, "b")
    b.verify(digest)
    os.chmod(b.path(digest), 0o644)
    b.path(digest).write_bytes(b"weighty")
    b.link_to(digest, tmp_path / "pool-b" / "w.safetensors")
    assert (tmp_path / "pool-b" / "w.safetensors").read_bytes() == b"weights"


def test_missing_object_is_reported(tmp_path, s3):
    with pytest.raises(BlobError, match="missing"):
        _bucket_blobs(tmp_path, s3, "a").verify("0" * 64)


def test_unreachable_bucket_is_a_blob_error_without_its_address(tmp_path, s3, monkeypatch):
    closed = free_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    blobs = _bucket_blobs(tmp_path, s3, "a")
    with pytest.raises(BlobError, match="cannot be fetched from the object store") as e:
        blobs.verify("0" * 64)
    assert str(closed) not in str(e.value)


def test_prefetch_caches_what_is_missing_and_leaves_failures_to_verify(tmp_path, s3):
    a = _bucket_blobs(tmp_path, s3, "a")
    digests = [a.put_file(_source(tmp_path, bytes([i]) * 100)) for i in range(5)]
    b = _bucket_blobs(tmp_path, s3, "b")
    b.prefetch([*digests, "0" * 64])
    assert all(b.path(d).read_bytes() == bytes([i]) * 100 for i, d in enumerate(digests))
    assert not b.path("0" * 64).exists() and list(b.tmp.iterdir()) == []
    with pytest.raises(BlobError, match="missing"):
        b.verify("0" * 64)
    BlobStore(tmp_path / "local").prefetch(digests)  # without a bucket: nothing to do
