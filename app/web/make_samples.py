"""Write the page's sample images: the first PER_CLASS images of every fine class of the
CIFAR-100 *test* split (never train or validation images, so they tell nothing about
what the pool was selected on), as 32x32 PNGs plus an index the page reads. The index
states their size: the page offers them only to a model whose input they are without
resampling (a pool of images stored at 32x32, as CIFAR-100's).

    python -m app.web.make_samples --data-path ../shared/datasets/cifar100

reads the .npy arrays described in that directory's README and rewrites
app/web/static/samples/ (PNG files named <class>-<test index>.png, and index.json: class -> test indices,
and the images' [height, width]).
Output is deterministic: running it again changes no byte."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

PER_CLASS = 2
OUT = Path(__file__).parent / "static" / "samples"
FILE = "{label}-{index}.png"  # index: the image's position in test_x.npy


def make_samples(data_path: Path, out: Path = OUT, per_class: int = PER_CLASS) -> dict:
    """Write the PNGs and index.json into `out` (emptied of older PNGs first); return the index."""
    names = json.loads((data_path / "meta.json").read_text())["fine_label_names"]
    images = np.load(data_path / "test_x.npy", mmap_mode="r")
    labels = np.load(data_path / "test_fine.npy")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    index: dict[str, list[int]] = {}
    for label, name in enumerate(names):
        for i in np.flatnonzero(labels == label)[:per_class].tolist():
            Image.fromarray(np.asarray(images[i]), "RGB").save(out / FILE.format(label=name, index=i), optimize=True)
            index.setdefault(name, []).append(i)
    document = {
        "source": "CIFAR-100 test split (Krizhevsky, 2009)",
        "note": "never used for training or model selection",
        "file": FILE,
        "size": list(images.shape[1:3]),
        "images": index,
    }
    (out / "index.json").write_text(json.dumps(document, separators=(",", ":")) + "\n")
    return document


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, required=True, help="holds test_x.npy, test_fine.npy, meta.json")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--per-class", type=int, default=PER_CLASS)
    args = parser.parse_args()
    document = make_samples(args.data_path, args.out, args.per_class)
    files = sorted(args.out.glob("*.png"))
    total = sum(f.stat().st_size for f in files) + (args.out / "index.json").stat().st_size
    print(f"{len(files)} images of {len(document['images'])} classes, {total:,} bytes in {args.out}")


if __name__ == "__main__":
    main()
