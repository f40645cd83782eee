import os
import shutil

import pytest
from service_fixtures import make_settings
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from app.services import Services
from app.serving.registry import PoolRegistry, PoolUnavailable
from app.store.db import Database
from app.store.pools import activate_pool, import_pool
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


def _corrupt(store, path: str) -> None:
    with store.db.session() as session:
        sha = session.scalar(select(PoolFile.sha256).where(PoolFile.path == path))
    blob = store.blobs.path(sha)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1  # one flipped bit
    blob.write_bytes(bytes(data))


def test_a_corrupt_expert_file_takes_out_its_task_only_and_reimport_repairs_it(store, pool):
    version = import_pool(store.db, store.blobs, pool.root, source="test", activate=True)
    whole = PoolRegistry(store.db, store.blobs, store.settings.pools_dir).active()
    expected = {t: whole.assembler.assemble([t, "task2"]).data for t in ("task0", "task1")}
    expert = pool.expert_info("task1")["onnx"]
    # The blob and the laid-out file are one (hard links): both are damaged.
    _corrupt(store, expert)
    fresh = PoolRegistry(store.db, store.blobs, store.settings.pools_dir, ttl=0)
    served = fresh.active()
    assert served.tasks == whole.tasks and served.positions == whole.positions
    assert list(served.damaged) == ["task1"]
    assert whole.native is not None and served.native is None  # no native lane to answer task1's queries
    assert PoolRegistry(store.db, store.blobs, store.settings.pools_dir, native=False).active().native is None
    with pytest.raises(PoolUnavailable, match=f"pool version {version} cannot serve task1 \\(file {expert}: "
                                              r"blob \w+\.\.\. is corrupt\); importing its bundle again") as e:
        served.require(["task2", "task1"])
    assert str(store.settings.data_dir.resolve()) not in str(e.value)
    served.require(["task0", "task2"])
    assert served.assembler.assemble(["task0", "task2"]).data == expected["task0"]  # the same bytes as ever
    assert import_pool(store.db, store.blobs, pool.root, source="again") == version
    healed = fresh.active()
    assert healed.damaged == {} and healed.assembler.assemble(["task1", "task2"]).data == expected["task1"]
    for f in store.db.read(lambda s: s.scalars(select(PoolFile).where(PoolFile.pool_version == version)).all()):
        store.blobs.verify(f.sha256)


def test_a_corrupt_library_takes_out_the_version_naming_the_file(store, pool):
    version = import_pool(store.db, store.blobs, pool.root, source="test", activate=True)
    library = pool.manifest["library"]["onnx"]
    _corrupt(store, library)
    fresh = PoolRegistry(store.db, store.blobs, store.settings.pools_dir, ttl=0)
    with pytest.raises(PoolUnavailable, match=f"pool version {version} cannot be served: file {library}: "
                                              r"blob \w+\.\.\. is corrupt; importing its bundle again"):
        fresh.active()
    import_pool(store.db, store.blobs, pool.root, source="again")
    assert fresh.active().damaged == {}


def test_a_failed_load_is_not_retried_within_the_ttl(store, pool):
    import_pool(store.db, store.blobs, pool.root, source="test", activate=True)
    _corrupt(store, "manifest.json")
    registry = PoolRegistry(store.db, store.blobs, store.settings.pools_dir, ttl=60)
    with pytest.raises(PoolUnavailable) as first:
        registry.active()
    with pytest.raises(PoolUnavailable) as second:
        registry.active()
    assert second.value is first.value


def test_the_active_version_known_last_is_served_while_the_database_is_down(store, pool):
    version = import_pool(store.db, store.blobs, pool.root, source="test", activate=True)
    registry = PoolRegistry(store.db, store.blobs, store.settings.pools_dir, ttl=0)
    assert registry.active().version == version
    registry.db = Database("postgresql+psycopg://nobody@127.0.0.1:9/none?connect_timeout=2")  # nothing listens
    try:
        assert registry.active().version == version
    finally:
        registry.db.dispose()
    with pytest.raises(DBAPIError):  # and with no version known, there is nothing to serve
        PoolRegistry(registry.db, store.blobs, store.settings.pools_dir).active()
