"""Training loops: the oracle, the library (KD) and the experts (conditional KD).

All three share one resumable loop (`_fit`): SGD with momentum, a per-step learning
rate schedule, a checkpoint after every epoch (written atomically) and model selection
on the validation split. Each epoch's batch order and augmentation come from a
generator seeded by (seed, epoch), so a resumed run sees the batches an uninterrupted
run would have seen.

Experts train jointly: per batch the oracle and the frozen library run once, and every
expert head takes its own CKD loss on the same features. The loss is the sum of the
experts' losses and their parameters are disjoint, so each head receives exactly the
gradient it would receive if trained alone; the joint pass is the paper's method, only
without re-running the oracle and the library once per expert.

Under torchrun the loop is data-parallel: each process trains on its slice of every
batch (see poe_core.distributed).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from poe_core import distributed
from poe_core.bank import LogitBank
from poe_core.checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from poe_core.data import ImageSet, Normalize, Splits, batches
from poe_core.device import autocast, pick_device, resolve_precision
from poe_core.evaluate import accuracy, predict, task_specific_accuracy
from poe_core.losses import ckd_loss, kd_loss, scale_loss
from poe_core.nets import ArchSpec, BranchedModel, ExpertHead, Library, Network, WRNSpec, expert_head, init_weights
from poe_core.prune import cutter
from poe_core.recipe import Progress, ProgressFn, TrainConfig
from poe_core.taxonomy import Taxonomy

log = logging.getLogger(__name__)

PRUNE_IMAGES = 2048  # training images whose library features score the channels of a cut head


@dataclass
class PhaseResult:
    """Best-on-validation accuracy per trained module, the epoch it was reached at, the
    per-epoch history and the wall time of the phase (summed across resumes)."""

    best_val_acc: dict[str, float]
    best_epoch: dict[str, int]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    epochs: int = 0


def _precision(cfg: TrainConfig) -> str:
    return resolve_precision(cfg.precision, pick_device(cfg.device).type)


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        # A warm-up of exactly one step makes OneCycleLR divide by zero (4 steps in all at
        # 25%); short runs warm up over two steps instead.
        pct_start = max(0.25, 2 / total) if total >= 3 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total, pct_start=pct_start, div_factor=10,
            final_div_factor=100, cycle_momentum=False,
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, [int(total * 0.5), int(total * 0.75)], gamma=0.1
        )
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use onecycle, cosine, step or constant")


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _fit(
    phase: str,
    trainables: Mapping[str, nn.Module],
    step_loss: StepLoss,
    validate: Callable[[], Mapping[str, float]] | None,
    splits: Splits,
    cfg: TrainConfig,
    checkpoint: Path | None,
    progress: ProgressFn | None,
    bank: LogitBank | None = None,
) -> PhaseResult:
    """Train `trainables` for cfg.epochs and load each one's best-on-validation weights,
    or with cfg.select = "last" (or `validate=None`, for a model that trains on the
    validation images too) the last epoch's. `step_loss(x, y, t)` gets the bank's oracle
    logits `t` for the batch when training from a logit bank, else None.

    Under torchrun (see poe_core.distributed) each rank trains on its slice of every
    batch; rank 0 alone validates and writes the checkpoint, and only its returned
    modules are the phase's result."""
    device = pick_device(cfg.device)
    precision = _precision(cfg)
    params = [p for m in trainables.values() for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=True)
    steps = math.ceil(len(splits.train) / cfg.batch_size)
    sched = _scheduler(opt, cfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    normalize = Normalize(splits.mean, splits.std, device)

    if cfg.select not in ("best", "last"):
        raise ValueError(f"unknown epoch selection {cfg.select!r}; use best or last")
    keep_last = validate is None or cfg.select == "last"
    result = PhaseResult({n: -1.0 for n in trainables}, {n: 0 for n in trainables})
    best_states = {} if keep_last else {n: _clone_state(m) for n, m in trainables.items()}
    start_epoch = 1
    with distributed.main_first():  # a checkpoint left half-renamed is recovered once
        resume = checkpoint is not None and checkpoint_exists(checkpoint)
    if resume:
        state = load_checkpoint(checkpoint, map_location=device)
        for n, m in trainables.items():
            m.load_state_dict(state["modules"][n])
            # Keeping the last epoch, the kept state is the current one and is not stored twice.
            if not keep_last:
                best_states[n] = _clone_state(m) if state["best_states"] is None else state["best_states"][n]
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        result = PhaseResult(state["best_val_acc"], state["best_epoch"], state["history"],
                             state["seconds"], state["epoch"])
        start_epoch = state["epoch"] + 1
        log.info("%s: resuming after epoch %d from %s", phase, state["epoch"], checkpoint)
    train_step = distributed.data_parallel(trainables, step_loss)

    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        for m in trainables.values():
            m.train()
        total, count = 0.0, 0
        seed = cfg.seed * 100_003 + epoch
        if bank is None:
            data = ((x, y, None) for x, y in batches(splits.train, cfg.batch_size, seed=seed, augmented=True,
                                                      normalize=normalize, device=device, channels_last=True))
        else:
            data = bank.batches(splits.train, cfg.batch_size, seed=seed, normalize=normalize, device=device)
        for step, batch in enumerate(data, 1):
            x, y, t, weight = distributed.shard(*batch)
            with autocast(device, precision):
                loss = train_step(x, y, t)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss * weight).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"{phase}: loss became {loss.item()} at epoch {epoch}")
            total += loss.item() * len(y)
            count += len(y)
            if progress is not None and (step % 10 == 0 or step == steps):
                progress(Progress(phase, epoch, cfg.epochs, step, steps, total / count))
        total, count = distributed.all_sum(total, count)
        val = validate() if validate is not None and distributed.is_main() else {}
        if keep_last:
            result.best_epoch = {n: epoch for n in trainables}
            result.best_val_acc.update(val)
        for n, acc in val.items():
            if not keep_last and acc > result.best_val_acc[n]:
                result.best_val_acc[n], result.best_epoch[n] = acc, epoch
                best_states[n] = _clone_state(trainables[n])
        seconds = time.perf_counter() - t0
        result.seconds += seconds
        result.epochs = epoch
        mean_val = sum(val.values()) / len(val) if val else None
        result.history.append({"epoch": epoch, "loss": total / max(count, 1), "val_acc": mean_val,
                               "seconds": round(seconds, 1), "precision": precision})
        if progress is not None:
            progress(Progress(phase, epoch, cfg.epochs, steps, steps, total / max(count, 1), mean_val))
        if checkpoint is not None and distributed.is_main():
            save_checkpoint({
                "epoch": epoch,
                "modules": {n: m.state_dict() for n, m in trainables.items()},
                "best_states": None if keep_last else best_states,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "best_val_acc": result.best_val_acc,
                "best_epoch": result.best_epoch,
                "history": result.history,
                "seconds": result.seconds,
            }, checkpoint)
        distributed.barrier()

    for n, m in trainables.items():
        if not keep_last:
            m.load_state_dict(best_states[n])
        m.eval()
    return result


def _prepare(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    # channels_last pays in every precision here: oneDNN's bf16 needs it, and an fp32
    # WRN-16-(4,4) step measured 8% faster with it on an AVX2-only EPYC.
    return model.to(pick_device(cfg.device), memory_format=torch.channels_last)


def train_oracle(
    splits: Splits, spec: ArchSpec, cfg: TrainConfig, *, with_val: bool = False,
    checkpoint: Path | None = None, progress: ProgressFn | None = None,
) -> tuple[Network, PhaseResult]:
    """The oracle from scratch with cross-entropy (optionally label-smoothed).

    `with_val` trains it on the validation images too, for a fixed number of epochs and
    no selection (its last epoch is kept). The students never train on those images and
    are selected on them against the true labels, so nothing the oracle saw leaks into
    a student's selection; the oracle just gets 10% more data for the same recipe."""
    torch.manual_seed(cfg.seed)
    model = _prepare(Network(spec, len(splits.taxonomy.classes), splits.image_shape[0]), cfg)

    def step_loss(x, y, _t):
        return F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)

    if with_val:
        everything = ImageSet(torch.cat([splits.train.x, splits.val.x]), torch.cat([splits.train.y, splits.val.y]))
        result = _fit("oracle", {"oracle": model}, step_loss, None,
                      dataclasses.replace(splits, train=everything), cfg, checkpoint, progress)
    else:
        result = _fit("oracle", {"oracle": model}, step_loss, _top1(model, "oracle", splits, cfg),
                      splits, cfg, checkpoint, progress)
    return model, result


Teacher = nn.Module | LogitBank


def _live(teacher: Teacher, cfg: TrainConfig) -> nn.Module | None:
    """The oracle module to run on every batch, or None when targets come from a bank."""
    return None if isinstance(teacher, LogitBank) else _freeze(_prepare(teacher, cfg))


def train_library(
    teacher: Teacher, splits: Splits, spec: ArchSpec, cfg: TrainConfig, *,
    checkpoint: Path | None = None, progress: ProgressFn | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> tuple[Network, PhaseResult]:
    """A small WRN student by standard KD from the oracle (eq. 1); its conv1..conv3 are
    the library. The oracle's targets come from a logit bank or, given the oracle
    itself, from running it on every batch. Selection by the student's validation top-1.
    With `init` (a student's state dict) training starts from those weights instead of
    random ones: a warm restart, another schedule of cfg.epochs on a trained library."""
    if cfg.kd not in ("kd", "standardized"):
        raise ValueError(f"unknown KD objective {cfg.kd!r}; use kd or standardized")
    torch.manual_seed(cfg.seed)
    network = Network(spec, len(splits.taxonomy.classes), splits.image_shape[0])
    if init is not None:
        network.load_state_dict(init)
    student = _prepare(network, cfg)
    oracle = _live(teacher, cfg)

    def step_loss(x, y, t):
        if t is None:
            with torch.no_grad():
                t = oracle(x)
        return kd_loss(student(x), t, cfg.temperature, standardized=cfg.kd == "standardized")

    bank = teacher if oracle is None else None
    result = _fit("library", {"library": student}, step_loss, _top1(student, "library", splits, cfg),
                  splits, cfg, checkpoint, progress, bank)
    return student, result


@dataclass(frozen=True)
class HeadTarget:
    """What one expert head learns: the oracle's sub-logits over `classes` with loss
    `ckd` (L_soft + alpha L_scale), `soft` (L_soft only) or `scale` (L_scale only)."""

    classes: tuple[int, ...]
    loss: str = "ckd"
    seed: int = 0
    ks: float | None = None  # head width; None: the spec's


def expert_name(task: str, ks: float) -> str:
    """The name of a task's expert at head width ks, e.g. `people@0.25`."""
    return f"{task}@{ks:g}"


def train_experts(
    library: Library, teacher: Teacher, splits: Splits, tasks: Sequence[str], spec: ArchSpec,
    cfg: TrainConfig, *, widths: Sequence[float] | None = None, checkpoint: Path | None = None,
    progress: ProgressFn | None = None, student: nn.Module | None = None,
) -> tuple[dict[str, ExpertHead], PhaseResult]:
    """One expert per primitive task by conditional KD, all in one pass (see module doc);
    with `widths`, one per task and width, named `task@ks`, else one at spec.ks named
    `task`. An expert's initial weights depend only on the seed, its task's position in
    the taxonomy and its width (or, with cfg.init = "student", on the `student` head it is
    cut from), so training it alone or with others gives the same expert."""
    names = splits.taxonomy.task_names
    if widths is None:
        heads = {t: HeadTarget(splits.taxonomy.tasks[t], "ckd", cfg.seed * 1000 + names.index(t)) for t in tasks}
    else:
        heads = {expert_name(t, ks): HeadTarget(splits.taxonomy.tasks[t], "ckd",
                                                cfg.seed * 1000 + names.index(t) + 1_000_003 * w, ks)
                 for w, ks in enumerate(widths) for t in tasks}
    return train_heads(library, teacher, splits, heads, spec, cfg, checkpoint=checkpoint, progress=progress,
                       student=student)


def train_heads(
    library: Library, teacher: Teacher, splits: Splits, heads: Mapping[str, HeadTarget],
    spec: ArchSpec, cfg: TrainConfig, *, checkpoint: Path | None = None,
    progress: ProgressFn | None = None, student: nn.Module | None = None,
) -> tuple[dict[str, ExpertHead], PhaseResult]:
    """Heads on the frozen library (weights and BN statistics), distilled from the
    oracle on all training images; each is selected on its own task-specific validation
    accuracy. Heads may target any class set (a composite task too) and any loss of the
    ablation; they share the oracle and library forward passes. With cfg.init =
    "student" each head starts as the library's `student` head cut to its width and
    classes (poe_core.prune), else from random weights."""
    device = pick_device(cfg.device)
    library = _freeze(_prepare(library, cfg))
    oracle = _live(teacher, cfg)
    experts = {name: _prepare(head, cfg) for name, head in _initial_heads(library, splits, heads, spec, cfg,
                                                                           student).items()}
    columns = {name: torch.tensor(h.classes, device=device) for name, h in heads.items()}
    bad = {h.loss for h in heads.values()} - {"ckd", "soft", "scale"}
    if bad:
        raise ValueError(f"unknown loss(es) {bad}; use ckd, soft or scale")

    # A bank with the library's features (poe_core.bank.build_features) hands them over as x.
    precomputed = oracle is None and teacher.features is not None

    def step_loss(x, y, t):
        with torch.no_grad():
            features = x if precomputed else library(x)
            if t is None:
                t = oracle(x)
        total = 0
        for name, head in experts.items():
            target, out, kind = t[:, columns[name]], head(features), heads[name].loss
            if kind == "scale":
                total = total + scale_loss(out, target)
            else:
                total = total + ckd_loss(out, target, cfg.temperature, cfg.alpha if kind == "ckd" else 0.0)
        return total

    val_features = []

    def validate():
        if not val_features:  # the library is frozen, so are its features of the validation images
            val_features.append(_features(library, splits, cfg).to(device))
        feats = val_features[0]
        accs = {}
        for name, head in experts.items():
            head.eval()
            with torch.no_grad(), autocast(device, _precision(cfg)):
                logits = head(feats).float().cpu()
            accs[name] = task_specific_accuracy(logits, splits.val.y, heads[name].classes)
        return accs

    bank = teacher if oracle is None else None
    result = _fit("experts", experts, step_loss, validate, splits, cfg, checkpoint, progress, bank)
    return experts, result


def _initial_heads(library: Library, splits: Splits, heads: Mapping[str, HeadTarget], spec: ArchSpec,
                   cfg: TrainConfig, student: nn.Module | None) -> dict[str, nn.Module]:
    def spec_of(h: HeadTarget) -> ArchSpec:
        return spec if h.ks is None else spec.with_ks(h.ks)

    if cfg.init == "random":
        return {name: expert_head(spec_of(h), library.out_channels, len(h.classes), seed=h.seed)
                for name, h in heads.items()}
    if cfg.init != "student":
        raise ValueError(f"unknown expert init {cfg.init!r}; use random or student")
    if not isinstance(student, ExpertHead) or not isinstance(spec, WRNSpec):
        raise ValueError("init 'student' needs WRN experts and the library's WRN student head")
    n = min(len(splits.train), PRUNE_IMAGES)
    device = next(library.parameters()).device
    with torch.no_grad():
        features = library(Normalize(splits.mean, splits.std, device)(splits.train.x[:n].to(device))).float().cpu()
    cut = cutter(copy.deepcopy(student).cpu().float(), features, spec.depth)  # the student runs once
    return {name: cut(h.classes, spec_of(h).ks) for name, h in heads.items()}


def task_splits(splits: Splits, classes: Sequence[int]) -> Splits:
    """Only the images of `classes`, labelled 0..len(classes)-1 in that order (for the
    Transfer and Scratch baselines, which see nothing but their task's images)."""
    lookup = torch.full((len(splits.taxonomy.classes),), -1, dtype=torch.int64)
    lookup[torch.tensor(list(classes))] = torch.arange(len(classes))

    def keep(images):
        if images is None:
            return None
        sub = images.of_classes(list(classes))
        return ImageSet(sub.x, lookup[sub.y])

    names = [splits.taxonomy.classes[c] for c in classes]
    return Splits(keep(splits.train), keep(splits.val), keep(splits.test),
                  Taxonomy.from_hierarchy({"task": names}), splits.mean, splits.std, splits.name)


def train_transfer(
    library: Library, splits: Splits, classes: Sequence[int], spec: ArchSpec, cfg: TrainConfig,
) -> tuple[ExpertHead, PhaseResult]:
    """The Transfer baseline: the same head on the frozen library, cross-entropy on the
    task's own images only."""
    sub = task_splits(splits, classes)
    library = _freeze(_prepare(library, cfg))
    head = _prepare(expert_head(spec, library.out_channels, len(classes), seed=cfg.seed), cfg)

    def step_loss(x, y, _t):
        with torch.no_grad():
            features = library(x)
        return F.cross_entropy(head(features), y, label_smoothing=cfg.label_smoothing)

    model = BranchedModel(library, [head])
    result = _fit("transfer", {"transfer": head}, step_loss, _top1(model, "transfer", sub, cfg),
                  sub, cfg, None, None)
    return head, result


def train_scratch(
    splits: Splits, classes: Sequence[int], library_spec: ArchSpec, expert_spec: ArchSpec, cfg: TrainConfig,
) -> tuple[BranchedModel, PhaseResult]:
    """The Scratch baseline: library + head architecture trained from scratch with
    cross-entropy on the task's own images only."""
    sub = task_splits(splits, classes)
    torch.manual_seed(cfg.seed)
    library = library_spec.library(sub.image_shape[0])
    model = BranchedModel(library, [expert_head(expert_spec, library.out_channels, len(classes), cfg.seed)])
    init_weights(model)
    model = _prepare(model, cfg)

    def step_loss(x, y, _t):
        return F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)

    result = _fit("scratch", {"scratch": model}, step_loss, _top1(model, "scratch", sub, cfg),
                  sub, cfg, None, None)
    return model, result


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _top1(model: nn.Module, name: str, splits: Splits, cfg: TrainConfig):
    """Validation top-1 of a whole WRN, keyed by its phase name."""
    device = pick_device(cfg.device)

    def validate() -> dict[str, float]:
        logits = predict(model, splits.val, splits.mean, splits.std, device,
                         precision=_precision(cfg), channels_last=True)
        return {name: accuracy(logits, splits.val.y)}

    return validate


def _features(library: Library, splits: Splits, cfg: TrainConfig) -> torch.Tensor:
    """Library features of the validation images."""
    device = pick_device(cfg.device)
    return predict(library, splits.val, splits.mean, splits.std, device,
                   precision=_precision(cfg), channels_last=True)
