"""The page's sample images: CIFAR-100 *test* images, as app/web/make_samples.py writes them."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.web import STATIC
from app.web.make_samples import make_samples

SAMPLES = STATIC / "samples"
CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar100"


def test_shipped_samples_are_small_and_complete():
    index = json.loads((SAMPLES / "index.json").read_text())
    files = {index["file"].format(label=label, index=i) for label, ids in index["images"].items() for i in ids}
    assert files == {p.name for p in SAMPLES.glob("*.png")}
    assert index["size"] == [32, 32]  # [height, width]: the page offers them to 32x32 inputs only
    assert len(index["images"]) == 100 and all(len(ids) == 2 for ids in index["images"].values())
    assert sum(p.stat().st_size for p in SAMPLES.iterdir()) < 600_000
    for name in sorted(files)[::37]:
        image = Image.open(SAMPLES / name)
        assert image.size == (32, 32) and image.mode == "RGB"


@pytest.mark.skipif(not (CIFAR / "test_x.npy").exists(), reason=f"CIFAR-100 arrays absent at {CIFAR}")
def test_samples_are_the_test_images_the_generator_writes(tmp_path):
    """Regenerated from the data set, every sample has the same pixels as the shipped PNG, and
    those are the test image of that index, of that class."""
    document = make_samples(CIFAR, tmp_path)
    assert document == json.loads((SAMPLES / "index.json").read_text())
    assert (tmp_path / "index.json").read_bytes() == (SAMPLES / "index.json").read_bytes()
    names = json.loads((CIFAR / "meta.json").read_text())["fine_label_names"]
    x = np.load(CIFAR / "test_x.npy", mmap_mode="r")
    y = np.load(CIFAR / "test_fine.npy")
    for label, ids in document["images"].items():
        for i in ids:
            name = document["file"].format(label=label, index=i)
            shipped = np.asarray(Image.open(SAMPLES / name))
            assert np.array_equal(shipped, np.asarray(Image.open(tmp_path / name)))
            assert np.array_equal(shipped, x[i]) and names[y[i]] == label
