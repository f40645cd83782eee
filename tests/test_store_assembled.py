from concurrent.futures import ThreadPoolExecutor

import pytest
from service_fixtures import make_settings, slow_assembly
from sqlalchemy import func, select

from app.services import Services
from app.store.assembled import ModelCache
from app.store.pools import import_pool
from app.store.tables import AssembledModel


@pytest.fixture
def store(databases, tmp_path, pool):
    services = Services.start(make_settings(databases, tmp_path))
    import_pool(services.db, services.blobs, pool.root, source="test", activate=True)
    yield services
    services.close()


def _rows(store) -> int:
    store.models.writer.flush()
    with store.db.session() as session:
        return session.scalar(select(func.count()).select_from(AssembledModel))


def test_concurrent_requests_assemble_once(store, monkeypatch):
    served = store.pools.active()
    slow_assembly(monkeypatch, served)
    with ThreadPoolExecutor(16) as ex:
        models = list(ex.map(lambda _: store.models.get_or_create(served, ["task2", "task0"]), range(32)))
    assert store.models.assemblies == 1
    assert len({m.data for m in models}) == 1
    assert models[0].info.tasks == ("task0", "task2")
    assert _rows(store) == 1


def test_order_and_options_make_the_key(store):
    served = store.pools.active()
    a = store.models.get_or_create(served, ["task0", "task1"])
    assert store.models.get_or_create(served, ["task1", "task0"]) is a
    soft = store.models.get_or_create(served, ["task0", "task1"], softmax=True)
    half = store.models.get_or_create(served, ["task0", "task1"], weights="fp16")
    assert len({a.info.id, soft.info.id, half.info.id}) == 3
    assert half.info.size < a.info.size
    assert store.models.assemblies == 3


def test_a_cold_process_reads_the_stored_model(store):
    served = store.pools.active()
    made = store.models.get_or_create(served, ["task1"])
    store.models.writer.flush()
    cold = ModelCache(store.db, store.blobs, store.pools, max_bytes=1 << 20)
    again = cold.get_or_create(served, ["task1"])
    assert cold.assemblies == 0
    assert again.data == made.data and again.info == made.info


def test_a_corrupt_model_blob_is_assembled_again(store):
    served = store.pools.active()
    made = store.models.get_or_create(served, ["task0"])
    store.models.writer.flush()
    path = store.blobs.path(made.info.sha256)
    path.chmod(0o644)
    path.write_bytes(b"x" * made.info.size)
    cold = ModelCache(store.db, store.blobs, store.pools, max_bytes=1 << 20)
    again = cold.get_or_create(served, ["task0"])
    assert cold.assemblies == 1
    assert again.data == made.data
    cold.writer.flush()
    assert store.blobs.get(made.info.sha256) == made.data


def test_hits_are_counted(store):
    served = store.pools.active()
    for _ in range(3):
        model = store.models.get_or_create(served, ["task2"])
    store.models.flush_hits()
    with store.db.session() as session:
        assert session.get(AssembledModel, model.info.id).hits == 3


def test_hot_cache_is_bounded(store):
    served = store.pools.active()
    size = store.models.get_or_create(served, ["task0"]).info.size
    small = ModelCache(store.db, store.blobs, store.pools, max_bytes=int(size * 1.5))
    small.get_or_create(served, ["task0"])
    small.get_or_create(served, ["task0"], softmax=True)
    assert len(small.hot) == 1 and small.hot.bytes <= size * 1.5
