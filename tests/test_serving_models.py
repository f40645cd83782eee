"""The serving runtime without HTTP: model ids are the query, caches are bounded, ORT
conversions happen once and never pile up."""

import asyncio
import hashlib
import itertools

import pytest
from service_fixtures import make_settings
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from app.services import Services
from app.serving.models import ModelCache, OrtFiles, RequestCounts, ServerBusy, model_id, query_of, resolve
from app.store.db import Database
from app.store.pools import import_pool
from app.store.tables import TaskRequests


@pytest.fixture
def started(databases, tmp_path, pool):
    services = Services.start(make_settings(databases, tmp_path))
    import_pool(services.db, services.blobs, pool.root, source="test", activate=True)
    yield services
    services.close()


@pytest.fixture
def served(started):
    return started.serving.pools.active()


def test_an_id_names_its_query_and_nothing_else(served):
    queries = [resolve(served, c, softmax=s, weights=w) for k in (1, 2, 3)
               for c in itertools.combinations(served.tasks, k) for s in (False, True) for w in ("fp32", "fp16")]
    ids = [model_id(served, q) for q in queries]
    assert len(set(ids)) == len(queries)
    assert [query_of(served, i) for i in ids] == queries
    assert resolve(served, ["task2", "task0"]) == resolve(served, ["task0", "task2"])


def test_the_model_cache_is_bounded_in_bytes(served):
    size = len(served.assembler.assemble(["task0"]).data)
    cache = ModelCache(max_bytes=int(size * 1.5))
    first = cache.get(served, resolve(served, ["task0"]))
    assert cache.get(served, resolve(served, ["task0"])) is first and cache.assemblies == 1
    cache.get(served, resolve(served, ["task0"], softmax=True))
    assert len(cache) == 1 and cache.bytes <= size * 1.5
    tiny = ModelCache(max_bytes=10)  # too small for any model: answered, not kept
    assert tiny.get(served, resolve(served, ["task1"])).data and len(tiny) == 0


def test_a_model_is_kept_the_second_time_it_is_asked_for(served):
    size = len(served.assembler.assemble(["task0"]).data)
    cache = ModelCache(max_bytes=size * 4)  # room for three models of about that size
    popular = [resolve(served, ["task0"]), resolve(served, ["task1"])]
    for q in popular:
        first = cache.get(served, q)
        assert len(cache) == popular.index(q)  # asked once: answered, not kept
        assert cache.get(served, q) is first  # asked again right away: the last model assembled, now kept
    assert len(cache) == 2 and cache.assemblies == 2
    one_offs = [resolve(served, c, softmax=s) for k in (1, 2, 3) for c in itertools.combinations(served.tasks, k)
                for s in (False, True)]
    for q in one_offs:  # asked once each: none of them displaces a model asked for twice
        if q not in popular:
            cache.get(served, q)
    before = cache.assemblies
    assert all(cache.get(served, q) for q in popular) and cache.assemblies == before and len(cache) == 2
    again = next(q for q in one_offs if q not in popular)
    cache.get(served, again)  # its second ask: assembled again (not the last one), now kept
    assert cache.assemblies == before + 1 and len(cache) == 3


def test_ort_conversions_happen_once_and_are_bounded(served):
    models = ModelCache(max_bytes=1 << 24)
    model = models.get(served, resolve(served, ["task0", "task1"]))

    async def convert():
        return await asyncio.gather(*(files.get(model) for _ in range(8)))

    files = OrtFiles(size=4)
    converted = asyncio.run(convert())
    assert len({id(c) for c in converted}) == 1 and converted[0].format == "ort"
    assert converted[0].sha256 != model.sha256 and converted[0].id == model.id
    assert converted[0].etag != model.etag and converted[0].etag.startswith(model.etag)
    files.close()

    busy = OrtFiles(max_pending=0)
    with pytest.raises(ServerBusy):
        asyncio.run(busy.get(model))


def test_a_served_model_is_its_chunks_and_its_head_is_its_headers(served):
    model = ModelCache(max_bytes=1 << 24).get(served, resolve(served, ["task2", "task0"], softmax=True))
    assert len(model.chunks) > 3 and model.size == len(model.data) == sum(map(len, model.chunks))
    assert model.data == b"".join(model.chunks) == served.assembler.assemble(model.query.model, softmax=True).data
    assert model.sha256 == hashlib.sha256(model.data).hexdigest()
    assert model.head == b"".join(b"%s: %s\r\n" % header for header in model.raw_headers)
    assert dict(model.raw_headers)[b"content-length"] == str(model.size).encode()
    assert model.headers["x-model-id"] == model.id and model.headers["etag"] == f'"{model.etag}"'


def test_request_counts_spread_composite_tasks_and_survive_a_failed_flush(started, tmp_path):
    version = started.serving.pools.active().version
    counts = RequestCounts()
    for tasks in (("task0",), ("task0", "task1"), ("task0", "task1"), ("task2",)):
        counts.count(version, tasks)
    unreachable = Database(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}")
    with pytest.raises(DBAPIError):
        counts.flush(unreachable)
    counts.count(version, ("task1",))
    counts.flush(started.db)
    counts.flush(started.db)  # nothing new: nothing added
    with started.db.session() as session:
        rows = dict(session.execute(select(TaskRequests.task, TaskRequests.requests)
                                    .where(TaskRequests.pool_version == version)).all())
    assert rows == {"task0": 3, "task1": 3, "task2": 1}
