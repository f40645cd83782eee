"""Custom primitive tasks: a pool extended with one expert for a class group of the
operator's choosing, without the preprocessing phases.

The new expert is the paper's: a head on the pool's frozen library, trained by
conditional KD from the oracle on all training images. The oracle is the one kept in
the pool (`manifest.oracle`); its targets come from a logit bank (poe_core.bank): a
bank of that oracle left in one of `bank_dirs` (the work directory of an earlier
extension, or of the extraction that built the pool, whose experts learned from the
same oracle before it was rounded to fp16 for keeping: reused when the kept oracle
reproduces a sample of it), else one filled here. The new pool is the old one, byte
for byte, plus the task (poe_core.build.extend_pool); the old pool is not touched.

The new task may share classes with the pool's tasks (a composite task may not mix
overlapping tasks, see Taxonomy.check_disjoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from poe_core.bank import CHUNK, LogitBank, ViewRecipe, bank_key, build_bank, build_features
from poe_core.data import ImageSet, Normalize, Splits, apply_views
from poe_core.device import machine_summary, pick_device, resolve_precision
from poe_core.nets import spec_from_dict
from poe_core.oracle import Oracle, OracleError, load_onnx_oracle, load_poe_oracle
from poe_core.pool import Pool, part_key
from poe_core.recipe import (
    COLD_OTHERS_PER_CLASS,
    COLD_VIEWS,
    TASK_EPOCHS,
    ExtractionPlan,
    Progress,
    ProgressFn,
    TrainConfig,
)
from poe_core.taxonomy import TaskError, Taxonomy

log = logging.getLogger(__name__)

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# A bank of another copy of the oracle is reused if, on a sample of its views, the kept
# oracle agrees on this share of top-1 classes and its logits differ by at most this
# share of their mean magnitude (fp16 rounding of weights and of stored logits).
BANK_CHECK_IMAGES = 64
BANK_MIN_AGREEMENT = 0.95
BANK_MAX_RELATIVE_ERROR = 0.05


class ExtensionError(ValueError):
    """A task this pool cannot be extended with; the message says why, for the admin."""


def check_task(pool: Pool, name: str, classes: Sequence[str]) -> list[int]:
    """The class indices of a new primitive task `name` over `classes`, or ExtensionError
    saying what is wrong: the name, the classes, or a pool that keeps no oracle."""
    if not TASK_NAME.match(name):
        raise ExtensionError(f"task name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                             "starting with a letter or digit")
    if name in pool.spec.experts:
        raise ExtensionError(f"pool {pool.pool_id} already has a primitive task {name!r}; choose another name")
    if isinstance(classes, str) or not classes:
        raise ExtensionError("the task's classes must be a non-empty list of class names")
    try:
        indices = pool.taxonomy.class_indices(classes)
    except TaskError as e:
        raise ExtensionError(f"{e}; the pool's classes are those of its data set "
                             f"({len(pool.taxonomy.classes)}, e.g. {', '.join(pool.taxonomy.classes[:3])})") from None
    same = [t for t, members in pool.taxonomy.tasks.items() if sorted(members) == sorted(indices)]
    if same:
        raise ExtensionError(f"primitive task {same[0]!r} already has exactly these classes")
    if pool.spec.oracle is None:
        raise ExtensionError(f"pool {pool.pool_id} keeps no oracle, and a new expert is distilled from "
                             "the oracle: build the pool with `poe extract` (which keeps it), or import a "
                             "bundle that has an oracle/ directory")
    return indices


def check_data(pool: Pool, splits: Splits) -> Splits:
    """`splits` as the pool's students saw them (the pool's normalisation), or
    ExtensionError if they are not the pool's data set: the same classes, split sizes
    and validation images (checked on the library's outputs cached in the pool)."""
    spec = pool.spec.dataset
    found = (list(splits.taxonomy.classes), len(splits.train), len(splits.val), list(splits.image_shape))
    wanted = (list(pool.taxonomy.classes), spec.train_images, spec.val_images, spec.image_shape)
    if found != wanted or not torch.equal(splits.val.y, pool.val_labels):
        what = ["classes", "training images", "validation images", "image shape"]
        differ = [w for w, a, b in zip(what, found, wanted, strict=True) if a != b] or ["validation labels"]
        raise ExtensionError(f"the data set given is not the one pool {pool.pool_id} was built on "
                             f"({spec.name}): its {', '.join(differ)} differ")
    splits = dataclasses.replace(splits, mean=tuple(pool.mean), std=tuple(pool.std))
    task = pool.tasks[0]
    sample = min(len(splits.val), 100)
    with torch.no_grad():
        x = (splits.val.x[:sample].float() / 255 - torch.tensor(pool.mean).view(1, -1, 1, 1)) \
            / torch.tensor(pool.std).view(1, -1, 1, 1)
        ours = pool.expert(task)(pool.library(x))
    cached = pool.logits("fp32")[task][:sample]
    if not torch.allclose(ours, cached, atol=0.05 + 0.01 * cached.abs().max().item()):
        raise ExtensionError(f"the validation images given are not those of pool {pool.pool_id}: its expert "
                             f"{task!r} gives other logits on them (another split seed or val_per_class?)")
    return splits


def kept_oracle(pool: Pool, device: torch.device) -> Oracle:
    """The oracle kept in the pool's bundle, as the students see it."""
    entry = pool.spec.oracle
    if entry is None:
        raise ExtensionError(f"pool {pool.pool_id} keeps no oracle")
    path = pool.path(entry.weights)
    try:
        if entry.format == "onnx":
            norm = entry.normalization
            return load_onnx_oracle(path, pool.taxonomy.classes, entry.classes, norm.mean, norm.std,
                                    pool.image_shape)
        return load_poe_oracle(path, pool.taxonomy.classes, device)
    except OracleError as e:
        raise ExtensionError(f"pool {pool.pool_id}: its kept oracle cannot be loaded: {e}") from None


def default_config(pool: Pool) -> TrainConfig:
    """The recipe the pool's own experts were trained with (else poe extract's default),
    for at most TASK_EPOCHS epochs: a pool built offline may have spent more on its
    experts than a task added while users wait should."""
    stored = pool.spec.training.get("experts", {}).get("config")
    if not stored:
        cfg = ExtractionPlan().expert_cfg
    else:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in stored.items() if k in known})
    return dataclasses.replace(cfg, epochs=min(cfg.epochs, TASK_EPOCHS))


def _stored_bank(root: Path, images: int) -> LogitBank | None:
    """A complete bank in `root` (see poe_core.bank) over `images` images, or None."""
    try:
        state = json.loads((root / "state.json").read_text())
        recipe = ViewRecipe(**state["recipe"])
        if state["images"] != images or state["done"] < recipe.views * math.ceil(images / CHUNK):
            return None
        logits = torch.from_numpy(np.load(root / "logits.npy"))
        views = torch.from_numpy(np.load(root / "views.npy").astype(np.int64))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return LogitBank(logits, views, recipe, state["key"])


def _reproduces(oracle: Oracle, bank: LogitBank, splits: Splits, device: torch.device) -> bool:
    """Whether `oracle` gives the bank's logits on a sample of its views (both views 0 and 1)."""
    n = min(BANK_CHECK_IMAGES, len(splits.train))
    for v in range(min(2, bank.recipe.views)):
        x = apply_views(splits.train.x[:n], bank.views[v, :n], bank.recipe.pad).to(device)
        ours, stored = oracle.logits(x).cpu(), bank.logits[v, :n].float()
        agree = (ours.argmax(1) == stored.argmax(1)).float().mean().item()
        error = (ours - stored).abs().mean().item() / max(stored.abs().mean().item(), 1e-6)
        if agree < BANK_MIN_AGREEMENT or error > BANK_MAX_RELATIVE_ERROR:
            return False
    return True


def find_bank(pool: Pool, oracle: Oracle, splits: Splits, recipe: ViewRecipe, bank_dirs: Sequence[Path],
              device: torch.device) -> tuple[LogitBank, Path] | None:
    """A finished bank of the pool's oracle in one of `bank_dirs`: one of the kept oracle
    itself with this view recipe, or the one the pool's experts learned from."""
    own = bank_key(oracle, splits.train, recipe)
    experts_bank = pool.spec.training.get("experts", {}).get("bank", {}).get("key")
    for key in dict.fromkeys(k for k in (own, experts_bank) if k):
        for directory in bank_dirs:
            bank = _stored_bank(Path(directory) / f"bank-{key}", len(splits.train))
            if bank is not None and (key == own or _reproduces(oracle, bank, splits, device)):
                return bank, Path(directory)
    return None


def cold_images(train: ImageSet, classes: Sequence[int], others_per_class: int, seed: int = 0) -> torch.Tensor:
    """The training images a bank filled for one task covers (in their order): every
    image of the task's `classes`, and `others_per_class` images of each other class
    drawn at random (seeded), which CKD needs to learn what the task is not."""
    inside = torch.isin(train.y, torch.tensor(list(classes)))
    rank = torch.empty(len(train), dtype=torch.int64)
    rank[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))] = torch.arange(len(train))
    keep = inside.clone()
    for c in torch.unique(train.y[~inside]).tolist():
        members = (train.y == c).nonzero().flatten()
        keep[members[rank[members].argsort()[:others_per_class]]] = True
    return keep.nonzero().flatten()


def add_task(
    pool: Pool, out: str | Path, splits: Splits, name: str, classes: Sequence[str], *,
    work: Path, cfg: TrainConfig | None = None, views: int = COLD_VIEWS, bank_dirs: Sequence[Path] = (),
    others_per_class: int | None = COLD_OTHERS_PER_CLASS,
    progress: ProgressFn | None = None, say: Callable[[str], None] | None = None,
) -> Pool:
    """Train the expert of a new primitive task `name` over `classes` (at every width the
    pool holds) and write the extended pool to `out`; return it. `work` holds the
    logit bank filled here (if none is found in `work` or `bank_dirs`) and the
    training checkpoint, so an interrupted run resumes. `cfg` defaults to the recipe of
    the pool's experts; `views` = 0 runs the oracle on every batch (poe oracles only).

    A bank found covers every training image. One filled here covers the task's own
    images and `others_per_class` of every other class (None: every image), at `views`
    views, and the expert trains on those images for as many steps as `cfg.epochs`
    epochs over all of them: the oracle's forward passes, not the expert's steps, are
    what such a cold start saves."""
    from poe_core.build import extend_pool
    from poe_core.train import train_experts

    say = say or log.info
    indices = check_task(pool, name, classes)
    splits = check_data(pool, splits)
    cfg = cfg or default_config(pool)
    if cfg.init == "student" and pool.unavailable("mask"):
        raise ExtensionError(f"expert init 'student' cuts the new expert from the library's student head: "
                             f"{pool.unavailable('mask')}; use init 'random'")
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device.type)
    oracle = kept_oracle(pool, device)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    coverage = {"images": len(splits.train)}
    train_splits = splits
    if views == 0:
        if oracle.module is None:
            raise ExtensionError("an ONNX oracle is read through a logit bank: use at least one view")
        teacher, teacher_info = oracle.module, {"teacher": "live oracle"}
    else:
        recipe = ViewRecipe(views, seed=cfg.seed).at_size(splits.image_shape[1])
        found = find_bank(pool, oracle, splits, recipe, [work, *bank_dirs], device)
        if found is not None:
            teacher, where = found
            say(f"reusing the logit bank {teacher.key} of the pool's oracle ({teacher.recipe.views} views) "
                f"in {where.name}")
        else:
            if others_per_class is not None:
                keep = cold_images(splits.train, indices, others_per_class, cfg.seed)
                train_splits = dataclasses.replace(splits, train=splits.train.subset(keep))
                coverage = {"images": len(keep), "others_per_class": others_per_class}
                cfg = dataclasses.replace(cfg, epochs=math.ceil(cfg.epochs * len(splits.train) / len(keep)))
            say(f"filling a logit bank of the kept oracle: {views} views of {len(train_splits.train)} images"
                + ("" if others_per_class is None else
                   f" (the task's and {others_per_class} of every other class; {cfg.epochs} epochs over them)"))

            def report(done: int, total: int) -> None:
                if progress is not None:
                    progress(Progress("bank", 1, 1, done, total, 0.0))

            teacher = build_bank(oracle, train_splits.train, recipe, work, device=device, precision=precision,
                                 progress=report)
            where = work
        # The library's stored features of the bank's views (left by the pool's own expert
        # phase, or computed here when the epochs outnumber the views) spare its forward pass.
        library, normalize = pool.library.to(device), Normalize(splits.mean, splits.std, device)
        for directory, compute in ((where, False), (work, cfg.epochs > teacher.recipe.views)):
            if teacher.features is None:
                teacher = build_features(library, teacher, train_splits.train, directory, device=device,
                                         precision=precision, normalize=normalize, compute=compute)
        teacher_info = {"teacher": "logit bank", "bank": {"key": teacher.key, **dataclasses.asdict(teacher.recipe),
                                                          "library_features": teacher.features is not None,
                                                          **coverage}}
    bank_seconds = time.perf_counter() - t0

    taxonomy = Taxonomy(pool.taxonomy.classes, {**pool.taxonomy.tasks, name: tuple(indices)})
    expert_spec = spec_from_dict(pool.spec.architecture.expert)
    student = pool.student_head() if cfg.init == "student" else None
    experts, result = train_experts(pool.library, teacher, dataclasses.replace(train_splits, taxonomy=taxonomy), [name],
                                    expert_spec, cfg, widths=pool.widths, checkpoint=work / "expert.checkpoint",
                                    progress=progress, student=student)
    say(f"expert of {name}: validation accuracy {result.best_val_acc[part_key(name, pool.default_width)]:.2%} "
        f"at width {pool.default_width:g} ({result.seconds:.0f} s of training)")
    training = {"task": name, "classes": list(classes), "from_pool": pool.pool_id,
                "oracle": pool.spec.oracle.weights, **teacher_info, "bank_seconds": round(bank_seconds, 1),
                "architecture": expert_spec.to_dict(), "widths": pool.widths, "config": cfg.to_dict(),
                "precision": precision, "epochs": result.epochs, "best_epoch": result.best_epoch,
                "val_acc": result.best_val_acc, "seconds": round(result.seconds, 1), "history": result.history,
                "machine": machine_summary(device)}
    heads = {ks: experts[part_key(name, ks)] for ks in pool.widths}
    return extend_pool(pool, out, task=name, classes=indices, experts=heads, splits=splits, training=training,
                       progress=say)
