"""Pools of photos through the service: a 64x64 pool states its input size and how a
photo becomes it (GET /tasks, the metadata of POST /models); the admin API's data spec
takes the image size and resize of `poe extract`, refuses nonsense ones, and the jobs
load photos at them."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from photo_folders import write_tiny_imagenet
from service_fixtures import ADMIN, Databases, Lines, make_settings, store_with, tiny_extraction

from app.jobs.custom_task import run_add_task
from app.jobs.extraction import run_extraction
from app.main import create_app
from app.services import Services
from app.store.pools import import_pool
from poe_core.data import load_photo
from poe_core.pool import load_pool

JSON = {"Accept": "application/json"}


@pytest.fixture
def photo_client(databases, tmp_path, photo_pool):
    pool, _ = photo_pool
    settings, _ = store_with(databases, tmp_path / "data", pool.root)
    with TestClient(create_app(settings)) as c:
        yield c


RESIZE = {64: 72, 128: 144}  # input side -> shorter side of the photos (tests/photo_folders.py)


def test_a_photo_pool_states_its_input_and_preprocessing(photo_client, photo_pool):
    """The 64x64 WRN pool and the 128x128 MobileNetV2 pool alike."""
    pool, splits = photo_pool
    size = pool.image_shape[-1]
    expected = {"name": "input", "shape": ["batch", 3, size, size], "mean": pytest.approx(pool.mean),
                "std": pytest.approx(pool.std), "scale": "pixel / 255, then (x - mean) / std, RGB",
                "resize_shorter_side": RESIZE[size], "center_crop": size}
    assert photo_client.get("/tasks").json()["input"] == expected
    meta = photo_client.post("/models", json={"tasks": ["feline", "bird"]}, headers=JSON).json()
    assert meta["input"] == expected
    assert photo_client.get(f"/models/{meta['id']}").json()["input"] == expected
    # The file says the same in poe.input, and it runs on a photo prepared as the metadata says.
    data = photo_client.get(meta["download_url"]).content
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    stated = json.loads(props["poe.input"])
    assert (stated["resize_shorter_side"], stated["center_crop"], stated["shape"]) == \
        (RESIZE[size], size, ["batch", 3, size, size])
    photo = next((pool.root.parent / "tiny-imagenet" / "val" / "images").iterdir())
    mean, std = (np.array(meta["input"][k], np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
    x = (load_photo(photo, size, RESIZE[size])[None].astype(np.float32) / 255 - mean) / std
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x})
    with torch.no_grad():
        expected_logits = pool.branched_model(["bird", "feline"])(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0)
    assert meta["labels"] == ["brambling", "goldfinch", "tabby", "lion"]
    # The reported accuracy is the delivered file's on the validation photos of its classes.
    classes = pool.taxonomy.class_indices(meta["labels"])
    val = splits.val.of_classes(classes)
    x = (val.x.numpy().astype(np.float32) / 255 - mean) / std
    (logits,) = session.run(None, {"input": x})
    truth = np.array([classes.index(y) for y in val.y.tolist()])
    assert len(val) == 8 and meta["val_acc"] == pytest.approx(float((logits.argmax(1) == truth).mean()))


def test_a_pool_of_stored_images_states_no_preprocessing(client):
    tasks = client.get("/tasks").json()
    assert tasks["input"]["shape"] == ["batch", 3, 16, 16]
    assert tasks["input"]["resize_shorter_side"] is None and tasks["input"]["center_crop"] is None
    meta = client.post("/models", json={"tasks": ["task0"]}, headers=JSON).json()
    assert meta["input"] == tasks["input"]


FOLDER = {"source": "image-folder", "path": "tin", "hierarchy": "groups.json"}


@pytest.mark.parametrize(("data", "message"), [
    ({"image_size": 4}, "greater than or equal to 8"),
    ({"image_size": 0}, "greater than or equal to 8"),
    ({"image_size": 100000}, "less than or equal to 1024"),
    ({"image_size": "big"}, "valid integer"),
    ({"image_size": 64.5}, "valid integer"),
    ({"image_size": 64, "resize": 48}, "resize 48 is smaller than the image size 64"),
    ({"resize": 10**6}, "less than or equal to 4096"),
])
def test_nonsense_image_sizes_are_422(client, data, message):
    for path, body in (("/admin/extractions", {}), ("/admin/tasks", {"name": "pets", "classes": ["class0_0"]})):
        r = client.post(path, headers=ADMIN, json=body | {"data": FOLDER | data})
        assert r.status_code == 422, r.text
        assert message in json.dumps(r.json()), (path, r.text)


def test_a_resize_below_the_default_image_size_is_422(client, settings):
    (settings.allowed_data_roots[0] / "tin" / "train").mkdir(parents=True, exist_ok=True)
    (settings.allowed_data_roots[0] / "groups.json").write_text(json.dumps({"pets": ["cat"]}))
    r = client.post("/admin/extractions", headers=ADMIN, json={"data": FOLDER | {"resize": 16}})
    assert r.status_code == 422 and "resize 16 is smaller than the image size 32" in r.json()["detail"]


def test_only_photo_folders_take_an_image_size(client):
    r = client.post("/admin/extractions", headers=ADMIN, json={"data": {"source": "synthetic", "image_size": 64}})
    assert r.status_code == 422 and "Extra inputs are not permitted" in r.text


def test_jobs_load_photos_at_the_requested_size(tmp_path):
    """An extraction asked over the API at 24x24 from a shorter side of 28 builds a pool of
    that input; a custom task on it loads the photos at the pool's size, and asking
    another is refused. The jobs run in this process, as a worker runs them."""
    settings = make_settings(Databases("sqlite", tmp_path), tmp_path / "data", default_pool="none")
    root = settings.allowed_data_roots[0]
    write_tiny_imagenet(root / "tin", per_class=6, test_per_class=1)
    tiny = tiny_extraction(oracle_epochs=1, bank_views=1, tasks=None)
    with TestClient(create_app(settings)) as client:
        r = client.post("/admin/extractions", headers=ADMIN,
                        json=tiny | {"data": FOLDER | {"image_size": 24, "resize": 28, "val_per_class": 1}})
        assert r.status_code == 202, r.text
        stored = r.json()["request"]
        assert (stored["data"]["image_size"], stored["data"]["resize"]) == (24, 28)
        default = client.post("/admin/extractions", headers=ADMIN, json=tiny | {"data": FOLDER})
        assert (default.json()["request"]["data"]["image_size"], default.json()["request"]["data"]["resize"]) == \
            (32, 32)

        work = tmp_path / "work"
        bundle = run_extraction(stored, work, settings.allowed_data_roots, Lines())
        pool = load_pool(bundle)
        assert pool.image_shape == [3, 24, 24]
        assert pool.spec.dataset.preprocess == {"resize_shorter_side": 28, "center_crop": 24}
        services = Services.start(settings)
        import_pool(services.db, services.blobs, bundle, source="test", activate=True)
        services.close()
        assert client.get("/tasks").json()["input"]["center_crop"] == 24

        task = {"name": "pets", "classes": ["tabby", "Chihuahua"], "epochs": 1, "batch_size": 16,
                "bank_views": 1, "precision": "fp32", "device": "cpu"}
        other = client.post("/admin/tasks", headers=ADMIN, json=task | {"data": FOLDER | {"image_size": 32}})
        assert other.status_code == 422
        assert "image_size 32 and resize 32 are not the active pool's" in other.json()["detail"]
        r = client.post("/admin/tasks", headers=ADMIN, json=task | {"data": FOLDER | {"val_per_class": 1}})
        assert r.status_code == 202, r.text
        stored = r.json()["request"]
        assert (stored["data"]["image_size"], stored["data"]["resize"]) == (24, 28)
        extended = load_pool(run_add_task(stored, tmp_path / "task-work", client.app.state.services.pools,
                                          [work], settings.allowed_data_roots, Lines()))
    assert extended.tasks[-1] == "pets" and extended.image_shape == [3, 24, 24]
    assert extended.spec.dataset.preprocess == pool.spec.dataset.preprocess
