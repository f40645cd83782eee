"""A tiny data set in the Tiny-ImageNet layout, written as photos for the ImageFolder source."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from poe_core.build import build_pool, normalised
from poe_core.data import load_image_folder, make_synthetic
from poe_core.nets import ArchSpec, BranchedModel, MobileNetV2Spec, WRNSpec, expert_head

# Three WordNet groups of two classes each: the groups name synsets above the classes.
SYNSETS = {"canine": ("n02083346", ["n02085620", "n02099601"]),
           "feline": ("n02120997", ["n02123045", "n02129165"]),
           "bird": ("n01503061", ["n01530575", "n01531178"])}
WORDS = {"n02085620": "Chihuahua", "n02099601": "golden retriever", "n02123045": "tabby, tabby cat",
         "n02129165": "lion, king of beasts", "n01530575": "brambling", "n01531178": "goldfinch",
         "n02083346": "canine, canid", "n02120997": "feline, felid", "n01503061": "bird"}


def write_tiny_imagenet(root: Path, width: int = 80, height: int = 72, per_class: int = 8, test_per_class: int = 2):
    """root/train/<wnid>/images/<wnid>_<i>.JPEG (+ the boxes file Tiny-ImageNet has),
    root/val/images/ + val_annotations.txt, words.txt, wordnet.is_a.txt; and the groups
    JSON beside root. Photos are the synthetic data set's patterns, `width` x `height`."""
    splits = make_synthetic(tasks=3, classes_per_task=2, per_class=per_class, size=max(width, height),
                            test_per_class=test_per_class, val_per_class=1)
    wnids = [w for _, leaves in SYNSETS.values() for w in leaves]

    def save(x, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()[:height, :width]).save(path, format="JPEG", quality=95)

    for images in (splits.train, splits.val):
        for i, (x, y) in enumerate(zip(images.x, images.y.tolist(), strict=True)):
            save(x, root / "train" / wnids[y] / "images" / f"{wnids[y]}_{images is splits.val}{i}.JPEG")
    for w in wnids:
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
    rows = []
    for i, (x, y) in enumerate(zip(splits.test.x, splits.test.y.tolist(), strict=True)):
        save(x, root / "val" / "images" / f"val_{i}.JPEG")
        rows.append(f"val_{i}.JPEG\t{wnids[y]}\t0\t0\t{width}\t{height}")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name in WORDS.items()))
    (root / "wordnet.is_a.txt").write_text("".join(f"{group} {leaf}\n" for group, leaves in SYNSETS.values()
                                                   for leaf in leaves))
    groups = root.parent / "groups.json"
    groups.write_text(json.dumps({task: [synset] for task, (synset, _) in SYNSETS.items()}))
    return groups


# The authors' settings, untrained and narrow: Tiny-ImageNet's WRN with conv1's stride 2 at
# 64x64 and ImageNet's MobileNetV2 (library: stem + 3 stages) at 128x128.
PHOTO_ARCHITECTURES: dict[str, tuple[ArchSpec, ArchSpec]] = {
    "wrn": (WRNSpec(10, 0.5, 0.5, stride=2), WRNSpec(10, 0.5, 0.25)),
    "mobilenet_v2": (MobileNetV2Spec(3, 0.25, 0.25), MobileNetV2Spec(3, 0.25, 0.1)),
}


def untrained_photo_pool(root: Path, size: int = 64, resize: int = 72, family: str = "wrn"):
    """A pool of untrained networks of `family` (PHOTO_ARCHITECTURES) over the photos of
    write_tiny_imagenet, cropped to `size` from a shorter side of `resize` (the photos are
    written `resize` high): built in seconds, for what serves and runs a model (its
    figures are meaningless). Its batch norms hold the statistics of the training photos."""
    groups = write_tiny_imagenet(root / "tiny-imagenet", width=resize + resize // 9, height=resize)
    splits = load_image_folder(root / "tiny-imagenet", groups, size=size, resize=resize, val_per_class=2)
    library_spec, expert_spec = PHOTO_ARCHITECTURES[family]
    library = library_spec.library()
    experts = {t: expert_head(expert_spec, library.out_channels, len(splits.taxonomy.class_names(t)), seed=i)
               for i, t in enumerate(splits.taxonomy.task_names)}
    fit_batch_norm(BranchedModel(library, list(experts.values())),
                   torch.from_numpy(normalised(splits.train, splits.mean, splits.std)))
    # Random weights: int8's accuracy drop means nothing here, so it is not refused.
    return build_pool(root / "pool", library=library, experts=experts, splits=splits, library_spec=library_spec,
                      expert_spec=expert_spec, int8_max_mean_drop=1.0, calibration_images=16), splits


def fit_batch_norm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of `x`, weights untouched: an
    untrained MobileNetV2's outputs fade to about 1e-7 with the initial statistics, and a
    test comparing such outputs to 1e-4, or their top-1, would compare nothing."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one batch gives its statistics
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
