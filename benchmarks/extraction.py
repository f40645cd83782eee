"""Extraction speed on CIFAR-100: the logit bank vs. the live oracle, joint vs. one-at-a-time experts.

    python benchmarks/extraction.py bank  [--work var/cifar-work] [--train-images 5120] [--views 8] [--precision fp32]
    python benchmarks/extraction.py joint  --work var/cifar-work  [--train-images 5120] [--epochs 1]

`bank`: one epoch of the library phase (KD of a WRN-16-(1,1) student) and one of the
experts phase (CKD, 20 experts) with the oracle run on every batch, then the same
epochs reading the oracle's targets from a logit bank (the experts both running the
frozen library per batch and reading its stored features, as `poe extract` does);
prints each epoch time, the speed-ups, and the one-off costs of filling the bank and
the features. Timing does not depend on the
weights, so without a finished work directory it uses freshly initialised networks of
the shipped architectures (oracle WRN-16-(4,4)).

`joint`: experts for every primitive task by CKD twice for the same epochs on the same
images: all in one pass (oracle and library run once per batch) and each alone (the
paper's loop); prints both wall times, the speed-up and both validation accuracies.

Every run prints the machine it ran on first (CPU model, cores, native bf16, the
precision `auto` chose).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from poe_core.bank import ViewRecipe, build_bank, build_features
from poe_core.data import Normalize, Splits, load_cifar100_npy
from poe_core.device import machine_line, pick_device, resolve_precision
from poe_core.extract import load_oracle, load_wrn, phase_done
from poe_core.nets import Network, WRNSpec
from poe_core.oracle import from_module
from poe_core.train import TrainConfig, train_experts, train_library

LIBRARY = WRNSpec(16, 1, 1)
EXPERT = WRNSpec(16, 1, 0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["bank", "joint"])
    parser.add_argument("--work", type=Path, help="extraction work dir with oracle (+ library)")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=5120,
                        help="train on this many images (a short run measures the ratio)")
    parser.add_argument("--val-images", type=int, default=1000,
                        help="validate on this many validation images")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--views", type=int, default=8, help="bank: augmented views per image")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="of every timed epoch, the bank and the features (auto: as poe extract picks it)")
    args = parser.parse_args()

    device = pick_device()
    print(machine_line(device), flush=True)
    args.precision = resolve_precision(args.precision, device.type)
    print(f"timed in {args.precision}", flush=True)
    splits = _subset(load_cifar100_npy(args.data), args.train_images, args.val_images)
    cfg = TrainConfig(epochs=args.epochs, lr=0.05, precision=args.precision)
    if args.mode == "bank":
        bank_vs_live(args, splits, cfg, device)
    else:
        joint_vs_alone(args, splits, cfg)


def _subset(splits: Splits, train: int, val: int) -> Splits:
    keep = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0))[:train]
    splits.train = splits.train.subset(keep)
    keep_val = torch.randperm(len(splits.val), generator=torch.Generator().manual_seed(1))[:val]
    splits.val = splits.val.subset(keep_val.sort().values)
    return splits


def _networks(args, splits: Splits, device: torch.device):
    if args.work is not None and phase_done(args.work, "oracle"):
        oracle = load_oracle(args.work, splits, device)
        source = f"oracle of {args.work}"
    else:
        torch.manual_seed(0)
        module = Network(WRNSpec(16, 4, 4), 100).to(device, memory_format=torch.channels_last)
        oracle = from_module(module, splits.taxonomy.classes, splits.mean, splits.std, "untrained")
        source = "untrained WRN-16-(4,4) (timing only)"
    if args.work is not None and phase_done(args.work, "library"):
        library = load_wrn(args.work, "library", 100).library
    else:
        torch.manual_seed(1)
        library = Network(LIBRARY, 100).library
    return oracle, library, source


def _epoch_seconds(result) -> float:
    return sum(h["seconds"] for h in result.history) / len(result.history)


def bank_vs_live(args, splits: Splits, cfg: TrainConfig, device: torch.device) -> None:
    oracle, library, source = _networks(args, splits, device)
    tasks = splits.taxonomy.task_names[:args.tasks]
    print(f"oracle: {source}; {len(splits.train)} training images, {args.tasks} experts", flush=True)
    warm = Splits(splits.train.subset(torch.arange(256)), splits.val.subset(torch.arange(100)), None,
                  splits.taxonomy, splits.mean, splits.std, splits.name)
    train_library(oracle.module, warm, LIBRARY, cfg)  # one-off kernel set-up out of the timings

    _, live_library = train_library(oracle.module, splits, LIBRARY, cfg)
    _, live_experts = train_experts(library, oracle.module, splits, tasks, EXPERT, cfg)
    print(f"live oracle: library epoch {_epoch_seconds(live_library):.1f} s, "
          f"experts epoch {_epoch_seconds(live_experts):.1f} s", flush=True)

    work = Path(args.work or "var/bench-bank")
    t0 = time.perf_counter()
    bank = build_bank(oracle, splits.train, ViewRecipe(args.views), work, device=device, precision=args.precision)
    fill = time.perf_counter() - t0
    _, bank_library = train_library(bank, splits, LIBRARY, cfg)
    _, bank_experts = train_experts(library, bank, splits, tasks, EXPERT, cfg)
    t0 = time.perf_counter()
    featured = build_features(library.to(device), bank, splits.train, work, device=device, precision=args.precision,
                              normalize=Normalize(splits.mean, splits.std, device))
    features = time.perf_counter() - t0
    _, feature_experts = train_experts(library, featured, splits, tasks, EXPERT, cfg)
    print(f"logit bank ({args.views} views, filled once in {fill:.1f} s = "
          f"{fill / args.views:.1f} s per view): library epoch {_epoch_seconds(bank_library):.1f} s, "
          f"experts epoch {_epoch_seconds(bank_experts):.1f} s running the library, "
          f"{_epoch_seconds(feature_experts):.1f} s on its stored features "
          f"(computed once in {features:.1f} s = {features / args.views:.1f} s per view)")
    live_e = _epoch_seconds(live_experts)
    print(f"speed-up per epoch: library {_epoch_seconds(live_library) / _epoch_seconds(bank_library):.1f}x, "
          f"experts {live_e / _epoch_seconds(feature_experts):.1f}x "
          f"({live_e / _epoch_seconds(bank_experts):.1f}x running the library) (target >= 3x)")


def joint_vs_alone(args, splits: Splits, cfg: TrainConfig) -> None:
    if args.work is None:
        raise SystemExit("joint needs --work with a finished oracle and library (accuracy is compared)")
    oracle = load_wrn(args.work, "oracle", 100)
    library = load_wrn(args.work, "library", 100).library
    tasks = splits.taxonomy.task_names[:args.tasks]
    warm = Splits(splits.train.subset(torch.arange(256)), splits.val.subset(torch.arange(100)), None,
                  splits.taxonomy, splits.mean, splits.std, splits.name)
    train_experts(library, oracle, warm, tasks[:2], EXPERT, cfg)

    t0 = time.perf_counter()
    _, joint = train_experts(library, oracle, splits, tasks, EXPERT, cfg)
    joint_s = time.perf_counter() - t0
    print(f"joint: {len(tasks)} experts, {args.epochs} epoch(s) on {len(splits.train)} images: "
          f"{joint_s:.1f} s, mean validation accuracy {_mean(joint.best_val_acc):.2%}", flush=True)

    t0 = time.perf_counter()
    alone_acc = {}
    for i, task in enumerate(tasks, 1):
        _, result = train_experts(library, oracle, splits, [task], EXPERT, cfg)
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
