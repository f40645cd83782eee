"""The native lane (app/_lane.c, app.serving.native): for a plain query, the same file,
id and headers as the Python path, byte for byte; for anything else, no answer, so
that the Python path answers it (or says what is wrong)."""

from __future__ import annotations

import itertools
import json
import random
from datetime import UTC, datetime

import pytest
from test_shipped_pool import SHIPPED

from app.api.models import _onnx, _parsed
from app.serving import native
from app.serving.models import ModelCache, resolve
from app.serving.registry import ServedPool
from poe_core.assemble import Assembler
from poe_core.pool import load_pool


def test_the_extension_is_built():
    # setup.py builds it optionally (an install without a C compiler goes on without it):
    # where the tests run, it must be there, or none of the tests below would test it.
    assert native.available()


def _python(serving, body: bytes):
    """What the Python path answers: (tasks, head, file bytes), or the exception it raises."""
    served = serving.pools.active()
    try:
        query, file_format, ident = _parsed(serving, served, body)
        if file_format != "onnx":
            return None
        model = _onnx(serving, served, query, ident)
    except Exception as e:  # noqa: BLE001 -- the error is the answer to compare
        return type(e)
    return model.query.tasks, model.head, model.data


def _native(table, body: bytes):
    answer = table.answer(body)
    if answer is None:
        return None
    tasks, head, chunks = answer
    return tasks, head, b"".join(chunks)


@pytest.fixture
def lane(services, versions):
    serving = services.serving
    served = serving.pools.active()
    assert served.native is not None
    return serving, served.native


def test_every_plain_query_is_the_python_paths_file(lane, services):
    serving, table = lane
    served = serving.pools.active()
    tasks = served.pool.tasks
    spellings = [lambda b: json.dumps(b).encode(), lambda b: json.dumps(b, separators=(",", ":")).encode(),
                 lambda b: json.dumps(b, indent=2).encode()]
    answered = 0
    for k in range(1, len(tasks) + 1):
        for combo in itertools.permutations(tasks, k):
            for options in ({}, {"softmax": True}, {"weights": "fp16"}, {"softmax": True, "weights": "int8"},
                            {"weights": "fp32", "softmax": False}):
                for spell in spellings:
                    body = spell({"tasks": list(combo)} | ({"options": options} if options else {}))
                    got = _native(table, body)
                    assert got is not None, body
                    assert got == _python(serving, body), body
                    answered += 1
    assert answered > 100


# Bodies the native lane leaves alone, and what the Python path makes of each: a model
# (an escaped name, classes, another option, lax or repeated values) or an error it explains.
DECLINED = {
    b'{"tasks": ["task0", "nope"]}': "error", b'{"tasks": ["task0", "task0"]}': "error", b'{"tasks": []}': "error",
    b'{"tasks": "task0"}': "error", b'{"tasks": ["task\\u0030"]}': "model", b'{"classes": ["class0_1"]}': "model",
    b'{"tasks": ["task0"], "classes": ["class1_0"]}': "model",
    b'{"tasks": ["task0"], "options": {"format": "ort"}}': "ort", b'{"tasks": ["task0"], "options": {"fp16": true}}':
    "model", b'{"tasks": ["task0"], "options": {"method": "mask"}}': "model",
    b'{"tasks": ["task0"], "options": {"reject_output": true}}': "model",
    b'{"tasks": ["task0"], "options": {"widths": {"task0": 0.5}}}': "error",
    b'{"tasks": ["task0"], "options": {"softmax": 1}}': "model",
    b'{"tasks": ["task0"], "options": {"weights": "fp64"}}': "error",
    b'{"tasks": ["task0"], "options": {"weights": null}}': "model",
    b'{"tasks": ["task0"], "options": {"softmax": true, "softmax": false}}': "model",
    b'{"tasks": ["task0"], "tasks": ["task1"]}': "model", b'{"tasks": ["task0"]} x': "error",
    b'{"tasks": ["task0"],}': "error", b'{"tasks": ["task0",]}': "error", b'["task0"]': "error", b'': "error",
    b'{': "error", b'{"tasks": ["task0"]': "error", b'\xef\xbb\xbf{"tasks": ["task0"]}': "error",
    b'{"tasks": ["task0\x00"]}': "error", b'{"tasks": ["ta\nsk0"]}': "error",
    b'{"tasks": ["task0"], "options": {"softmax": true,}}': "error", b'{"tasks": ["task0"], "options": []}': "error",
}


@pytest.mark.parametrize("body", DECLINED)
def test_what_is_not_a_plain_query_is_left_to_the_python_path(lane, body):
    serving, table = lane
    assert table.answer(body) is None
    python = _python(serving, body)
    kind = "ort" if python is None else "model" if isinstance(python, tuple) else "error"
    assert kind == DECLINED[body]


def test_a_mangled_body_is_the_python_paths_answer_or_none(lane):
    """Random edits of plain bodies: whatever the native lane answers, the Python path
    answers the same; it never answers what the Python path refuses."""
    serving, table = lane
    rng = random.Random(7)
    seeds = [json.dumps({"tasks": ["task2", "task0"], "options": {"softmax": True, "weights": "fp16"}}).encode(),
             b'{"tasks":["task1"]}', b' { "options" : { } , "tasks" : [ "task0" , "task1" ] } ']
    alphabet = b'{}[],:" \t\n\\tasko0123fpmxe'
    agreed = 0
    for _ in range(3000):
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(body) + 1)
            edit = rng.randrange(3)
            if edit == 0:
                body[at:at] = bytes([rng.choice(alphabet)])
            elif edit == 1 and at < len(body):
                del body[at]
            elif at < len(body):
                body[at] = rng.choice(alphabet)
        got = _native(table, bytes(body))
        if got is not None:
            assert got == _python(serving, bytes(body)), bytes(body)
            agreed += 1
    assert agreed > 50  # some edits keep a plain query (whitespace, reordering)


def test_a_damaged_pool_version_has_no_native_lane():
    from app.serving.native import table

    class Damaged:
        damaged = {"task1": "file onnx/task1.onnx: corrupt"}

    assert table(Damaged()) is None  # its queries with task1 must answer 503, not a file


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="this checkout ships no CIFAR-100 pool")
def test_the_shipped_pools_plain_queries_are_the_python_paths_files():
    """Twenty tasks, two widths (the poe.widths entry), long names (hashed download
    names) and task masks that start with hex digit c (downloads named by class)."""
    pool = load_pool(SHIPPED)
    served = ServedPool(3, datetime.now(UTC), pool, Assembler(pool, pool_version="3"), tuple(pool.spec.experts))
    table = native.table(served)
    cache = ModelCache(0)  # every model assembled anew, by the Python assembler
    rng = random.Random(1)
    names = {"hashed": 0, "by class": 0}
    for _ in range(400):
        tasks = rng.sample(pool.tasks, rng.randint(1, 7))
        softmax, weights = rng.random() < 0.5, rng.choice(("fp32", "fp16", "int8"))
        body = json.dumps({"tasks": tasks, "options": {"softmax": softmax, "weights": weights}}).encode()
        model = cache.get(served, resolve(served, tasks, softmax=softmax, weights=weights))
        assert _native(table, body) == (model.query.tasks, model.head, model.data), body
        names["hashed"] += b"-tasks-" in model.head or b"-classes-" in model.head
        names["by class"] += model.id.split("-")[2].startswith("c")
    assert min(names.values()) > 0, names
