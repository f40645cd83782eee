import os
import shutil

import pytest
from service_fixtures import make_settings
from sqlalchemy import select

from app.services import Services
from app.store.pools import PoolRegistry, PoolUnavailable, activate_pool, import_pool
from app.store.tables import PoolFile, PoolVersion, PrimitiveTask
from poe_core.pool import PoolError


@pytest.fixture
def store(databases, tmp_path):
    services = Services.start(make_settings(databases, tmp_path))
    yield services
    services.close()


def test_import_indexes_the_bundle(store, pool):
    version = import_pool(store.db, store.blobs, pool.root, source="test")
    with store.db.session() as session:
        row = session.get(PoolVersion, version)
        assert row.pool_id == pool.pool_id
        assert {f.path for f in row.files} == {"manifest.json", *pool.manifest["files"]}
        tasks = session.scalars(select(PrimitiveTask).where(PrimitiveTask.pool_version == version)
                                .order_by(PrimitiveTask.position)).all()
        assert [t.name for t in tasks] == pool.tasks
        for task in tasks:
            assert [c.name for c in task.classes] == pool.taxonomy.class_names(task.name)
            info = pool.expert_info(task.name)
            assert (task.expert.params, task.expert.val_acc) == (info["params"], info["val_acc"])
        for f in session.scalars(select(PoolFile).where(PoolFile.pool_version == version)):
            store.blobs.verify(f.sha256)
    assert import_pool(store.db, store.blobs, pool.root, source="again") == version


def test_a_damaged_bundle_is_not_imported(store, pool, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(pool.root, copy)
    (copy / "onnx" / "library.onnx").write_bytes(b"not onnx")
    with pytest.raises(PoolError, match="corrupt"):
        import_pool(store.db, store.blobs, copy, source="test")
    with store.db.session() as session:
        assert session.scalars(select(PoolVersion)).all() == []


def test_activation_switches_new_requests_only(store, pool, second_pool):
    first = import_pool(store.db, store.blobs, pool.root, source="test", activate=True)
    second = import_pool(store.db, store.blobs, second_pool.root, source="test")
    in_flight = store.pools.active()
    assert in_flight.version == first
    activate_pool(store.db, second)
    assert store.pools.active().version == second
    assert in_flight.assembler.assemble(["task2"]).tasks == ("task2",)  # task2 is not in the second pool


def test_no_active_pool_is_unavailable(store):
    with pytest.raises(PoolUnavailable, match="no active pool"):
        store.pools.active()


def test_damaged_layout_is_rebuilt_from_blobs(store, pool):
    version = import_pool(store.db, store.blobs, pool.root, source="test", activate=True)
    directory = store.pools.active().pool.root
    target = directory / "onnx" / "library.onnx"
    target.unlink()
    target.write_bytes(b"damaged")
    fresh = PoolRegistry(store.db, store.blobs, store.settings.pools_dir)
    assert fresh.get(version).pool.pool_id == pool.pool_id


def test_corrupt_blob_makes_the_pool_unavailable(store, pool):
    version = import_pool(store.db, store.blobs, pool.root, source="test", activate=True)
    with store.db.session() as session:
        sha = session.scalar(select(PoolFile.sha256).where(PoolFile.path == "onnx/library.onnx"))
    blob = store.blobs.path(sha)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"bit rot")
    shutil.rmtree(store.settings.pools_dir, ignore_errors=True)
    fresh = PoolRegistry(store.db, store.blobs, store.settings.pools_dir)
    with pytest.raises(PoolUnavailable, match=f"pool version {version} cannot be loaded.*corrupt"):
        fresh.active()
