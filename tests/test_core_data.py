import json

import numpy as np
import pytest
from PIL import Image

from poe_core.data import load_image_folder, load_image_folder_test, load_splits


def _tree(root, classes, per_class):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_with_hierarchy(tmp_path):
    _tree(tmp_path / "data", ["cat", "dog", "car"], 6)
    hierarchy = tmp_path / "tasks.json"
    hierarchy.write_text(json.dumps({"pets": ["cat", "dog"], "vehicles": ["car"]}))
    splits = load_image_folder(tmp_path / "data", hierarchy, size=16, val_per_class=2)
    assert splits.taxonomy.tasks == {"pets": (0, 1), "vehicles": (2,)}
    assert splits.train.x.shape == (12, 3, 16, 16) and len(splits.val) == 6 and len(splits.test) == 6
    assert splits.image_shape == (3, 16, 16)


def test_image_folder_missing_class_is_a_clear_error(tmp_path):
    _tree(tmp_path / "data", ["cat"], 3)
    hierarchy = tmp_path / "tasks.json"
    hierarchy.write_text(json.dumps({"pets": ["cat", "dog"]}))
    with pytest.raises(FileNotFoundError, match="'dog' of the hierarchy has no folder"):
        load_image_folder(tmp_path / "data", hierarchy, val_per_class=1)


def test_image_folder_test_split_alone_in_a_pools_class_order(tmp_path):
    _tree(tmp_path / "data", ["cat", "dog", "car"], 1)
    splits = load_image_folder(tmp_path / "data", _hierarchy(tmp_path), size=16, val_per_class=0)
    test = load_image_folder_test(tmp_path / "data", ["car", "cat"], size=16)
    assert test.y.tolist() == [0, 0, 1, 1]
    assert np.array_equal(test.x[:2], splits.test.x[splits.test.y == 2])
    same = load_image_folder_test(tmp_path / "data", ["car", "cat"], _hierarchy(tmp_path), size=16)
    assert np.array_equal(same.x, test.x) and same.y.tolist() == test.y.tolist()
    with pytest.raises(ValueError, match="has no class 'bus'"):
        load_image_folder_test(tmp_path / "data", ["bus", "cat"], _hierarchy(tmp_path), size=16)


def _hierarchy(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps({"pets": ["cat", "dog"], "vehicles": ["car"]}))
    return path


def test_unknown_source_and_missing_cifar_files(tmp_path):
    with pytest.raises(ValueError, match="unknown data source"):
        load_splits("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="missing train_x.npy"):
        load_splits("cifar100-npy", tmp_path)
