"""Joint vs. one-at-a-time expert extraction on CIFAR-100: wall time and accuracy.

    python benchmarks/extraction.py --work var/cifar-work [--epochs 1] [--train-images 10000] [--val-images 1000]

Takes the oracle and library of a finished extraction work directory (`poe extract`),
then trains experts for every primitive task by CKD twice for the same number of epochs
on the same images: all experts in one pass (the oracle and library run once per batch)
and each expert alone (the paper's loop: oracle and library re-run for every expert).
Prints both wall times, the speed-up and the mean validation accuracy of both.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from poe_core.data import load_cifar100_npy
from poe_core.extract import load_wrn
from poe_core.nets import WRNSpec
from poe_core.train import TrainConfig, train_experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="extraction work dir with oracle + library")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=10000,
                        help="train on this many images (a short run measures the ratio)")
    parser.add_argument("--val-images", type=int, default=1000,
                        help="validate on this many validation images (validation runs once per run)")
    parser.add_argument("--tasks", type=int, default=20)
    args = parser.parse_args()

    splits = load_cifar100_npy(args.data)
    keep = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:args.train_images]
    splits.train = splits.train.subset(keep)
    keep_val = torch.randperm(len(splits.val), generator=torch.Generator().manual_seed(1))[:args.val_images]
    splits.val = splits.val.subset(keep_val.sort().values)
    oracle = load_wrn(args.work, "oracle", 100)
    library = load_wrn(args.work, "library", 100).library
    tasks = splits.taxonomy.task_names[:args.tasks]
    spec = WRNSpec(16, 1, 0.25)
    cfg = TrainConfig(epochs=args.epochs, lr=0.05)

    # Warm-up: the first pass pays one-off kernel compilation (oneDNN bf16); keep it out of both timings.
    warm = type(splits)(splits.train.subset(torch.arange(256)), splits.val.subset(torch.arange(100)), None,
                        splits.taxonomy, splits.mean, splits.std, splits.name)
    train_experts(library, oracle, warm, tasks[:2], spec, cfg)

    t0 = time.perf_counter()
    _, joint = train_experts(library, oracle, splits, tasks, spec, cfg)
    joint_s = time.perf_counter() - t0
    print(f"joint: {len(tasks)} experts, {args.epochs} epoch(s) on {len(splits.train)} images: "
          f"{joint_s:.1f} s, mean validation accuracy {_mean(joint.best_val_acc):.2%}", flush=True)

    t0 = time.perf_counter()
    alone_acc = {}
    for i, task in enumerate(tasks, 1):
        _, result = train_experts(library, oracle, splits, [task], spec, cfg)
        alone_acc |= result.best_val_acc
        print(f"  alone {i}/{len(tasks)} ({task}): {time.perf_counter() - t0:.1f} s so far", flush=True)
    alone_s = time.perf_counter() - t0
    print(f"alone: {len(tasks)} experts one at a time: {alone_s:.1f} s, "
          f"mean validation accuracy {_mean(alone_acc):.2%}")
    diff = max(abs(joint.best_val_acc[t] - alone_acc[t]) for t in tasks)
    gap = 100 * (_mean(joint.best_val_acc) - _mean(alone_acc))
    print(f"speed-up {alone_s / joint_s:.1f}x; accuracy difference {gap:+.2f} points "
          f"(largest per expert {100 * diff:.2f})")


def _mean(d: dict) -> float:
    return sum(d.values()) / len(d)


if __name__ == "__main__":
    main()
