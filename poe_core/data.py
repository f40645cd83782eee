"""Data sets, splits, batch augmentation and normalisation.

Every source ends up as `Splits`: uint8 image tensors (N, 3, H, W) with int64 labels,
a train / validation / test split and the taxonomy. Images stay uint8 in memory;
batches are normalised and augmented as whole-tensor ops on the training device.

The input size is the data set's: 32x32 for CIFAR-100, any size for an ImageFolder,
whose photos are resized (shorter side) and center-cropped as `Splits.preprocess`
records; the pool's manifest and every model's `poe.input` repeat it, so a client
prepares a photo the way the training images were.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from poe_core.taxonomy import CIFAR100_CLASSES, Taxonomy, cifar100, folder_taxonomy

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W) and int64 class labels (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.x[index], self.y[index])

    def of_classes(self, classes: list[int]) -> ImageSet:
        return self.subset(torch.isin(self.y, torch.tensor(classes)).nonzero().flatten())


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    taxonomy: Taxonomy
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    preprocess: dict | None = None  # photos: {"resize_shorter_side": R, "center_crop": S}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


def stratified_split(
    labels: torch.Tensor, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held_out): `per_class` random images of every class are held out."""
    g = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= per_class:
            raise ValueError(f"class {c} has {len(idx)} images, cannot hold out {per_class}")
        held.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    held_out = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return mask.nonzero().flatten(), held_out


def _split(
    train: ImageSet, test: ImageSet | None, taxonomy: Taxonomy, val_per_class: int, seed: int,
    name: str, mean=None, std=None, preprocess: dict | None = None,
) -> Splits:
    """Hold out the validation split; the normalisation is the training images' own
    channel statistics unless given."""
    kept, held = stratified_split(train.y, val_per_class, seed)
    train, val = train.subset(kept), train.subset(held)
    if mean is None or std is None:
        mean, std = channel_stats(train.x)
    return Splits(train, val, test, taxonomy, tuple(mean), tuple(std), name, preprocess)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (rounded to 4 digits,
    so the same images give the same figures on every machine)."""
    f = x.to(torch.float64).div_(255)
    mean, std = f.mean((0, 2, 3)), f.std((0, 2, 3))
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def load_cifar100_npy(root: str | Path, val_per_class: int = 50, seed: int = 0) -> Splits:
    """CIFAR-100 from train_x.npy / train_fine.npy / test_x.npy / test_fine.npy (NHWC uint8)."""
    root = Path(root)
    missing = [f for f in ("train_x.npy", "train_fine.npy", "test_x.npy", "test_fine.npy")
               if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a CIFAR-100 .npy directory: missing {', '.join(missing)}")

    def load(prefix: str) -> ImageSet:
        x = np.load(root / f"{prefix}_x.npy", mmap_mode="r")
        y = np.load(root / f"{prefix}_fine.npy")
        return ImageSet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
                        torch.from_numpy(y.astype(np.int64)))

    return _split(load("train"), load("test"), cifar100(), val_per_class, seed, "cifar100")


def load_cifar100_torchvision(
    root: str | Path, download: bool = False, val_per_class: int = 50, seed: int = 0
) -> Splits:
    """CIFAR-100 through torchvision; downloads only when asked to."""
    from torchvision.datasets import CIFAR100

    def load(train: bool) -> ImageSet:
        ds = CIFAR100(str(root), train=train, download=download)
        if list(ds.classes) != list(CIFAR100_CLASSES):
            raise ValueError("torchvision's CIFAR-100 class order differs from poe's")
        return ImageSet(torch.from_numpy(ds.data.transpose(0, 3, 1, 2).copy()),
                        torch.tensor(ds.targets, dtype=torch.int64))

    return _split(load(True), load(False), cifar100(), val_per_class, seed, "cifar100")


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_photo(path: Path, size: int, resize: int) -> np.ndarray:
    """uint8 (3, size, size): the photo resized so its shorter side is `resize`, then
    center-cropped (the `preprocess` of an ImageFolder's Splits)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = resize / min(img.size)
    img = img.resize((max(resize, round(img.width * scale)), max(resize, round(img.height * scale))),
                     Image.BILINEAR)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def load_image_folder(
    root: str | Path, hierarchy: str | Path, size: int = 32, val_per_class: int = 5, seed: int = 0,
    resize: int | None = None,
) -> Splits:
    """An ImageFolder tree and a hierarchy JSON (task name -> class names, or WordNet ids:
    see poe_core.taxonomy.folder_taxonomy). Training images are those under
    root/train/<class>/ (subfolders too, as Tiny-ImageNet's <wnid>/images/); the test
    split is root/test/<class>/ or, in the Tiny-ImageNet layout, root/val/images/ labelled
    by root/val/val_annotations.txt. Photos are resized (shorter side `resize`, default
    `size`) and center-cropped to size x size."""
    resize = _photo_resize(size, resize)
    root = Path(root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root} has no train/ folder")
    taxonomy, folders = folder_taxonomy(root, hierarchy)
    train = _photos(root, _in_folders(root / "train", folders, taxonomy.classes), size, resize)
    test = _test_split(root, folders, taxonomy.classes, size, resize)
    return _split(train, test, taxonomy, val_per_class, seed, root.name,
                  preprocess={"resize_shorter_side": resize, "center_crop": size})


def load_image_folder_test(
    root: str | Path, classes: Sequence[str], hierarchy: str | Path | None = None, size: int = 32,
    resize: int | None = None,
) -> ImageSet | None:
    """The test split of an ImageFolder alone (as load_image_folder finds it), labelled by
    the index of each image's class in `classes` (a pool's): a class's folder is the one
    the hierarchy JSON gives it (WordNet ids too) or, without one, its name. The folder's
    other classes are left out; None when it has no test split."""
    resize = _photo_resize(size, resize)
    root = Path(root)
    if hierarchy is None:
        folders = list(classes)
    else:
        taxonomy, found = folder_taxonomy(root, hierarchy)
        folder_of = dict(zip(taxonomy.classes, found, strict=True))
        missing = [c for c in classes if c not in folder_of]
        if missing:
            raise ValueError(f"the hierarchy {hierarchy} has no class {', '.join(map(repr, missing))}")
        folders = [folder_of[c] for c in classes]
    return _test_split(root, folders, classes, size, resize)


def _photo_resize(size: int, resize: int | None) -> int:
    resize = size if resize is None else resize
    if not 8 <= size <= resize:
        raise ValueError(f"image size {size} must be at least 8 and at most the resize {resize}")
    return resize


def _in_folders(split: Path, folders: Sequence[str], names: Sequence[str]) -> list[tuple[Path, int]]:
    """The images under split/<folder>/ of every class, labelled by the class's index."""
    out = []
    for label, folder in enumerate(folders):
        path = split / folder
        if not path.is_dir():
            raise FileNotFoundError(f"class {names[label]!r} of the hierarchy has no folder {path}")
        out += [(f, label) for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    return out


def _test_split(root: Path, folders: Sequence[str], names: Sequence[str], size: int,
                resize: int) -> ImageSet | None:
    annotations = root / "val" / "val_annotations.txt"
    if annotations.is_file():
        label_of = {folder: label for label, folder in enumerate(folders)}
        rows = [line.split("\t")[:2] for line in annotations.read_text().splitlines() if line.strip()]
        return _photos(root, [(root / "val" / "images" / f, label_of[w]) for f, w in rows if w in label_of],
                       size, resize)
    return _photos(root, _in_folders(root / "test", folders, names), size, resize) \
        if (root / "test").is_dir() else None


def _photos(root: Path, labelled: list[tuple[Path, int]], size: int, resize: int) -> ImageSet:
    if not labelled:
        raise FileNotFoundError(f"{root}: no image in the classes' folders")
    return ImageSet(torch.from_numpy(np.stack([load_photo(f, size, resize) for f, _ in labelled])),
                    torch.tensor([label for _, label in labelled]))


def make_synthetic(
    tasks: int = 3, classes_per_task: int = 2, per_class: int = 24, size: int = 16,
    test_per_class: int = 8, val_per_class: int = 4, seed: int = 0,
) -> Splits:
    """A hierarchical toy data set that generates in well under a second.

    Every class is a fixed random low-frequency pattern; classes of one task share a
    colour tint, so tasks are groups of related classes like CIFAR's superclasses.
    """
    g = torch.Generator().manual_seed(seed)
    n_classes = tasks * classes_per_task
    tints = torch.rand(tasks, 3, 1, 1, generator=g)
    coarse = torch.rand(n_classes, 1, 4, 4, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    templates = 0.5 * patterns + 0.5 * tints.repeat_interleave(classes_per_task, 0)

    def sample(n: int) -> ImageSet:
        y = torch.arange(n_classes).repeat_interleave(n)
        x = templates[y] + 0.15 * torch.randn(len(y), 3, size, size, generator=g)
        return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y)

    taxonomy = Taxonomy.from_hierarchy({
        f"task{t}": [f"class{t}_{c}" for c in range(classes_per_task)] for t in range(tasks)
    })
    train = sample(per_class + val_per_class)
    return _split(train, sample(test_per_class), taxonomy, val_per_class, seed, "synthetic")


def load_splits(source: str, path: str | Path | None = None, *, hierarchy: str | Path | None = None,
                val_per_class: int = 50, seed: int = 0, download: bool = False,
                size: int = 32, resize: int | None = None) -> Splits:
    """One entry point for the CLI and the service: source is cifar100-npy,
    cifar100-torchvision, image-folder or synthetic; `size` and `resize` are an
    image-folder's (see load_image_folder)."""
    if source == "cifar100-npy":
        return load_cifar100_npy(_need(path, source), val_per_class, seed)
    if source == "cifar100-torchvision":
        return load_cifar100_torchvision(_need(path, source), download, val_per_class, seed)
    if source == "image-folder":
        if hierarchy is None:
            raise ValueError("image-folder needs a hierarchy JSON (task name -> class names)")
        return load_image_folder(_need(path, source), hierarchy, size, val_per_class, seed, resize)
    if source == "synthetic":
        return make_synthetic(seed=seed)
    raise ValueError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")


SOURCES = ("cifar100-npy", "cifar100-torchvision", "image-folder", "synthetic")


def input_options(image_shape, preprocess: dict | None) -> dict:
    """The `load_splits` size options that give a pool's input (its manifest's
    dataset.image_shape and preprocess) again."""
    return {"size": image_shape[1], "resize": (preprocess or {}).get("resize_shorter_side")}


def _need(path, source: str) -> Path:
    if path is None:
        raise ValueError(f"data source {source} needs a path")
    return Path(path)


class Normalize:
    """uint8 (N, C, H, W) -> float normalised by the data set's mean and std."""

    def __init__(self, mean, std, device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def crop_pad(height: int) -> int:
    """Zero padding of the random-crop augmentation: the WRN recipe's 4 pixels up to
    32x32 images, an eighth of the side above (8 at 64x64, 16 at 128x128)."""
    return max(4, height // 8)


def random_views(n: int, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """(n, 3) int64 augmentation parameters: crop offsets dy, dx in [0, 2*pad] and flip."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = (torch.rand(n, generator=g) < 0.5).long()
    return torch.stack([dy, dx, flip], 1)


def apply_views(x: torch.Tensor, views: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Crop each image of (N, C, H, W) after zero padding at its (dy, dx) and flip it
    if asked; `views` as from `random_views`. The logit bank stores these parameters,
    so a student sees exactly the view its stored oracle target was computed on."""
    n, c, h, w = x.shape
    views = views.to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (views[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (views[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None],
                 torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    return torch.where(views[:, 2, None, None, None].bool(), out.flip(3), out)


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding and random horizontal flip, for a whole batch."""
    return apply_views(x, random_views(len(x), g, pad), pad)


def batches(
    images: ImageSet, batch_size: int, *, seed: int | None = None, augmented: bool = False,
    normalize: Normalize, device: torch.device, channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (x, y) batches. With a seed: shuffled and the same order for the same
    seed (that is what makes a resumed epoch, or one expert trained alone, see exactly
    the batches it would have seen); without: in order, no augmentation."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    order = torch.randperm(len(images), generator=g) if g is not None else torch.arange(len(images))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = images.x[idx].to(device, non_blocking=True)
        if augmented:
            x = augment(x, g, crop_pad(x.shape[-2]))
        x = normalize(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, images.y[idx].to(device, non_blocking=True)
