"""How many oracle views the logit bank needs: library KD from banks of 1..V views
against the live oracle, each given the same training wall time, scored on validation.

    python benchmarks/views.py --work var/cifar-work [--views 1,2,4,8,16] [--minutes 10]
                               [--train-images 10000] [--val-images 5000]

A bank of few views is cheap per epoch but repeats its targets (Beyer et al. 2022: "a
good teacher is patient and consistent"; fixed views overfit in long runs); the live
oracle sees a fresh view every time but costs 15-20x more per batch, so it gets fewer
epochs in the same time. Each arm trains the WRN-16-(1,1) library student by KD for as
many one-cycle epochs as fit in --minutes (from a timed calibration epoch of each
kind), and reports its best validation top-1. The bank is filled once at the largest
view count; a smaller one is its first views (a recipe's view v does not depend on how
many views there are), so the fill is reported separately, as the one-off cost it is.

Needs a work directory with a finished oracle. Selection only: nothing here reads the
test split. Prints the machine first; times are wall times on it.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from poe_core.bank import ViewRecipe, build_bank
from poe_core.data import load_cifar100_npy
from poe_core.device import machine_line, pick_device, resolve_precision
from poe_core.extract import load_oracle, phase_done
from poe_core.nets import WRNSpec
from poe_core.train import TrainConfig, train_library

LIBRARY = WRNSpec(16, 1, 1)
CALIBRATION_IMAGES = 2560


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="extraction work dir with a finished oracle")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    parser.add_argument("--views", default="1,2,4,8,16", help="bank sizes to compare (comma-separated)")
    parser.add_argument("--minutes", type=float, default=10.0, help="training wall time of every arm")
    parser.add_argument("--train-images", type=int, default=10_000)
    parser.add_argument("--val-images", type=int, default=5_000)
    parser.add_argument("--kd", choices=["kd", "standardized"], default="kd")
    args = parser.parse_args()
    if not phase_done(args.work, "oracle"):
        parser.error(f"{args.work} has no finished oracle")
    sizes = sorted({int(v) for v in args.views.split(",")})
    if sizes[0] < 1:
        parser.error("view counts start at 1")

    device = pick_device()
    print(machine_line(device), flush=True)
    precision = resolve_precision("auto", device.type)
    splits = load_cifar100_npy(args.data)
    g = torch.Generator().manual_seed(0)
    splits.train = splits.train.subset(torch.randperm(len(splits.train), generator=g)[:args.train_images])
    splits.val = splits.val.subset(torch.randperm(len(splits.val), generator=g)[:args.val_images].sort().values)
    oracle = load_oracle(args.work, splits, device)

    t0 = time.perf_counter()
    full = build_bank(oracle, splits.train, ViewRecipe(sizes[-1]), args.work, device=device, precision=precision)
    print(f"bank of {sizes[-1]} views over {len(splits.train)} images: {time.perf_counter() - t0:.0f} s "
          "(0 if it was there)", flush=True)
    banks = {v: replace(full, logits=full.logits[:v], views=full.views[:v], recipe=ViewRecipe(v),
                        key=f"{full.key}[:{v}]") for v in sizes}

    cfg = TrainConfig(epochs=1, lr=0.05, kd=args.kd)
    n = min(CALIBRATION_IMAGES, len(splits.train))
    calibration = replace(splits, train=splits.train.subset(torch.arange(n)))
    # The bank's rows of those images (a bank answers for exactly the images it was filled on).
    small = replace(banks[sizes[0]], logits=banks[sizes[0]].logits[:, :n], views=banks[sizes[0]].views[:, :n])
    train_library(small, calibration, LIBRARY, cfg)  # one-off kernel set-up out of the timings
    per_image = {}
    for kind, teacher in (("live", oracle.module), ("bank", small)):
        _, result = train_library(teacher, calibration, LIBRARY, cfg)
        per_image[kind] = result.seconds / len(calibration.train)
    budget = 60 * args.minutes
    print(f"budget {args.minutes:g} min per arm; calibrated epoch on {len(splits.train)} images: "
          f"live {per_image['live'] * len(splits.train):.0f} s, bank {per_image['bank'] * len(splits.train):.0f} s",
          flush=True)

    rows = []
    arms = [("live oracle", oracle.module, "live")] + [(f"bank, {v} views", banks[v], "bank") for v in sizes]
    for name, teacher, kind in arms:
        epochs = max(1, int(budget / (per_image[kind] * len(splits.train))))
        _, result = train_library(teacher, splits, LIBRARY, replace(cfg, epochs=epochs))
        acc = result.best_val_acc["library"]
        rows.append((name, epochs, result.seconds, acc))
        print(f"{name}: {epochs} epochs in {result.seconds:.0f} s, best validation top-1 {acc:.2%} "
              f"(epoch {result.best_epoch['library']})", flush=True)

    print("\n| teacher | epochs | seconds | validation top-1 |\n| --- | --- | --- | --- |")
    for name, epochs, seconds, acc in rows:
        print(f"| {name} | {epochs} | {seconds:.0f} | {acc:.2%} |")
    best = max(rows[1:], key=lambda r: r[3])
    print(f"\nbest bank: {best[0]} ({best[3]:.2%}; live oracle {rows[0][3]:.2%})")


if __name__ == "__main__":
    main()
