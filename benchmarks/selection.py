"""Which epoch of an expert to keep: the best on validation (poe's rule today) or the
last of its one-cycle schedule, judged out of sample on validation alone.

    python benchmarks/selection.py --work var/w-base [--epochs 20] [--views 4] [--tasks paper]

Trains the experts of the tasks (ks 0.25, the shipped recipe: student start, lr 0.1,
alpha 0.3, T 4) from the work directory's logit bank and library features, keeping every
epoch's validation logits (cached in --cache, so a second run only analyses). Then it
splits each class's validation images in two halves and, for each half in turn, chooses
each expert's epoch on that half by a rule and scores the choice on the other half:
mean task-specific accuracy (single) and PoE accuracy over every composite of the tasks
at n(Q) = 2..5. A rule that picks noise scores worse out of sample than it did where it
chose. Rules: `best` (the epoch with the best accuracy on the choosing half: poe's rule,
on half the images), `last`, `best of last 5`. Then the best epochs chosen and scored on
all of validation ("in sample": what benchmarks/judge.py sees of a pool that kept its
experts' best epochs, so how much it flatters one) beside the last epoch on all of it, and
every epoch's accuracy on all of validation. Selection only: nothing here reads the test
split.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from reproduction import TASKS as PAPER_TASKS

import poe_core.train as train
from poe_core.bank import ViewRecipe, build_bank, build_features
from poe_core.data import Normalize, load_cifar100_npy
from poe_core.device import machine_line, pick_device, resolve_precision
from poe_core.evaluate import composite_accuracy
from poe_core.extract import load_oracle, load_wrn, phase_done
from poe_core.nets import WRNSpec
from poe_core.recipe import ExtractionPlan

RULES = ("best", "last", "best of last 5")


def epoch_logits(args, splits, tasks) -> dict[str, np.ndarray]:
    """(epochs, validation images, task classes) logits of every task's expert, every epoch."""
    device = pick_device()
    precision = resolve_precision("auto", device.type)
    student = load_wrn(args.work, "library", len(splits.taxonomy.classes))
    oracle = load_oracle(args.work, splits, device)
    bank = build_bank(oracle, splits.train, ViewRecipe(args.views), args.work, device=device, precision=precision)
    bank = build_features(student.library.to(device), bank, splits.train, args.work, device=device,
                          precision=precision, normalize=Normalize(splits.mean, splits.std, device))
    seen: list[torch.Tensor] = []
    score = train.task_specific_accuracy

    def keeping(logits, y, classes):  # train_heads validates every expert, in order, once an epoch
        seen.append(logits.clone())
        return score(logits, y, classes)

    cfg = replace(ExtractionPlan().expert_cfg, epochs=args.epochs, init="student", lr=0.1, alpha=0.3)
    train.task_specific_accuracy = keeping
    try:
        train.train_experts(student.library, bank, splits, tasks, WRNSpec(16, 1, 0.25), cfg, widths=[0.25],
                            student=student.head)
    finally:
        train.task_specific_accuracy = score
    return {t: torch.stack(seen[i::len(tasks)]).numpy() for i, t in enumerate(tasks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="extraction work dir with oracle and library")
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--views", type=int, default=4, help="views of the logit bank")
    ap.add_argument("--tasks", default="paper", help="paper (the paper's six), all, or names comma-separated")
    ap.add_argument("--cache", type=Path, default=Path("var/selection"))
    args = ap.parse_args()
    for phase in ("oracle", "library"):
        if not phase_done(args.work, phase):
            ap.error(f"{args.work} has no finished {phase}")
    print(machine_line(pick_device()), flush=True)
    splits = load_cifar100_npy(args.data)
    tax = splits.taxonomy
    tasks = {"paper": PAPER_TASKS, "all": tax.task_names}.get(args.tasks, args.tasks.split(","))
    tax.validate(tasks)
    cached = args.cache / f"logits-{args.epochs}-{args.views}-{'+'.join(tasks)[:120]}.npz"
    if not cached.is_file():
        args.cache.mkdir(parents=True, exist_ok=True)
        np.savez(cached, **epoch_logits(args, splits, tasks))
    logits = {t: torch.from_numpy(v) for t, v in np.load(cached).items()}
    labels = splits.val.y

    def accuracy(combo, epochs, where: torch.Tensor) -> float:
        """PoE accuracy (task-specific for one task) of `combo` with each expert at its epoch."""
        return composite_accuracy({t: logits[t][epochs[t]][where] for t in combo}, labels[where], tax, combo)

    half = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(len(tax.classes)):
        half[(labels == c).nonzero().flatten()[::2]] = True
    scores = {r: {n: [] for n in range(1, 6)} for r in RULES}
    for choose, judge in ((half, ~half), (~half, half)):
        per_epoch = {t: [accuracy([t], {t: e}, choose) for e in range(args.epochs)] for t in tasks}
        for rule in RULES:
            first = {"best": 0, "last": args.epochs - 1, "best of last 5": max(0, args.epochs - 5)}[rule]
            epochs = {t: first + int(np.argmax(acc[first:])) for t, acc in per_epoch.items()}
            for n in range(1, min(5, len(tasks)) + 1):
                scores[rule][n].append(np.mean([accuracy(c, epochs, judge) for c in itertools.combinations(tasks, n)]))
    print(f"{len(tasks)} tasks, {args.epochs} epochs, ks 0.25; each rule chooses on one half of validation and is "
          f"scored on the other (mean of both ways): single, then PoE at n(Q) = 2..5")
    for rule in RULES:
        values = [100 * float(np.mean(v)) for v in scores[rule].values() if v]
        print(f"{rule:15s} {values[0]:6.2f}  " + " / ".join(f"{v:.2f}" for v in values[1:]))
    everything = torch.ones(len(labels), dtype=torch.bool)
    # What benchmarks/judge.py sees of a pool that kept each expert's best epoch: chosen and
    # scored on the same (all of) validation, against the last epoch scored there.
    full = {t: [accuracy([t], {t: e}, everything) for e in range(args.epochs)] for t in tasks}
    for rule, epochs in (("best, in sample", {t: int(np.argmax(acc)) for t, acc in full.items()}),
                         ("last, all", {t: args.epochs - 1 for t in tasks})):
        values = [100 * float(np.mean([accuracy(c, epochs, everything) for c in itertools.combinations(tasks, n)]))
                  for n in range(1, min(5, len(tasks)) + 1)]
        print(f"{rule:15s} {values[0]:6.2f}  " + " / ".join(f"{v:.2f}" for v in values[1:]))
    print("epoch | " + " | ".join(tasks) + " | mean")
    for e in range(args.epochs):
        accs = [100 * accuracy([t], {t: e}, everything) for t in tasks]
        print(f"{e + 1:5d} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {np.mean(accs):.2f}")


if __name__ == "__main__":
    main()
