"""Which KD objective the library student learns best from: the paper's KD against KD on
z-scored logits (Sun et al., CVPR 2024, "Logit standardization in knowledge
distillation"), at a few temperatures, each arm the same short one-cycle run from the
same logit bank, scored on validation.

    python benchmarks/library_kd.py --work var/cifar-work [--views 4] [--epochs 2]
                                    [--arms kd:4,standardized:4,standardized:2]
                                    [--out var/reproduction/library_kd.json]

Z-scoring divides each logit vector by its own standard deviation, so the temperature
means something else than in plain KD: at T = 4 a z-scored oracle's softmax is nearly
flat over 100 classes, which is why the paper standardises at a base temperature of 2.
The arms are equal in epochs, so equal in wall time (the objective costs nothing).

Needs a work directory with a finished oracle; fills (or finds) its bank of --views
views, the one `poe extract --bank-views` uses. Selection only: nothing here reads the
test split. Prints the machine first; times are wall times on it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from poe_core.bank import ViewRecipe, build_bank
from poe_core.data import load_cifar100_npy
from poe_core.device import cpu_model, machine_line, pick_device, resolve_precision
from poe_core.extract import load_oracle, phase_done
from poe_core.nets import WRNSpec
from poe_core.recipe import ExtractionPlan

LIBRARY = WRNSpec(16, 1, 1)


def main() -> None:
    from poe_core.train import train_library

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="extraction work dir with a finished oracle")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    parser.add_argument("--views", type=int, default=4, help="views of the logit bank the arms read")
    parser.add_argument("--epochs", type=int, default=2, help="one-cycle epochs of every arm")
    parser.add_argument("--out", type=Path, default=Path("var/reproduction/library_kd.json"),
                        help="where to keep the table for benchmarks/reproduction.py")
    parser.add_argument("--arms", default="kd:4,standardized:4,standardized:2",
                        help="OBJECTIVE:TEMPERATURE pairs, comma-separated (objective kd or standardized)")
    args = parser.parse_args()
    if not phase_done(args.work, "oracle"):
        parser.error(f"{args.work} has no finished oracle")
    try:
        arms = [(kind, float(t)) for kind, t in (a.split(":") for a in args.arms.split(","))]
    except ValueError:
        parser.error(f"--arms {args.arms!r} is not OBJECTIVE:TEMPERATURE,...")
    if any(kind not in ("kd", "standardized") or t <= 0 for kind, t in arms):
        parser.error("objectives are kd or standardized, temperatures above 0")

    device = pick_device()
    print(machine_line(device), flush=True)
    precision = resolve_precision("auto", device.type)
    splits = load_cifar100_npy(args.data)
    oracle = load_oracle(args.work, splits, device)
    bank = build_bank(oracle, splits.train, ViewRecipe(args.views), args.work, device=device, precision=precision)
    base = ExtractionPlan().library_cfg

    rows = []
    for kind, temperature in arms:
        cfg = replace(base, epochs=args.epochs, kd=kind, temperature=temperature)
        _, result = train_library(bank, splits, LIBRARY, cfg)
        acc = result.best_val_acc["library"]
        rows.append((kind, temperature, result.seconds, acc))
        print(f"{kind} T={temperature:g}: {args.epochs} epochs in {result.seconds:.0f} s, "
              f"best validation top-1 {acc:.2%}", flush=True)

    print(f"\n| objective | T | seconds | validation top-1 ({args.epochs} epochs, bank of {args.views} views) |"
          "\n| --- | --- | --- | --- |")
    for kind, temperature, seconds, acc in rows:
        print(f"| {kind} | {temperature:g} | {seconds:.0f} | {acc:.2%} |")
    best = max(rows, key=lambda r: r[3])
    print(f"\nbest: {best[0]} at T={best[1]:g} ({best[3]:.2%})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": cpu_model(), "precision": precision, "epochs": args.epochs, "views": args.views,
        "arms": [{"kd": k, "temperature": t, "seconds": sec, "val_acc": a} for k, t, sec, a in rows]}, indent=1))


if __name__ == "__main__":
    main()
