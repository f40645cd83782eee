"""Issue 8's accuracy targets for a pool, on the test split, in about a minute: the part
of benchmarks/reproduction.py that needs no training (no baselines, no ablation, no
figure), for a pool that is not (yet) the shipped one.

    python benchmarks/targets.py --work var/w-quick --pool var/pool-quick

Needs the extraction work directory the pool was built from (its oracle and library
student). Prints the oracle's and the library student's test top-1, the mean
single-expert task-specific gap over the paper's six tasks, and the PoE gap to the
oracle's task-specific accuracy at n(Q) = 2..5 over all combinations of those tasks,
each beside its target. The experts' logits are those of the pool's ONNX parts at its
default width, as the service assembles them. Reporting only: nothing chooses by it.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch
from reproduction import TASKS

from poe_core.data import load_cifar100_npy
from poe_core.device import machine_line
from poe_core.evaluate import predict, task_specific_accuracy
from poe_core.extract import load_wrn
from poe_core.pool import load_pool, onnx_logits

CPU = torch.device("cpu")
# Kim & Choi (SIGMOD 2021) on CIFAR-100: PoE's gap to the oracle's task-specific accuracy.
GAP_TARGETS = {1: 3.4, 2: 5.2, 3: 6.5, 4: 7.6, 5: 8.6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="the extraction work directory of the pool")
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/cifar100"))
    args = ap.parse_args()
    print(machine_line(CPU), flush=True)
    splits = load_cifar100_npy(args.data)
    tax, test = splits.taxonomy, splits.test
    pool = load_pool(args.pool)
    oracle_logits = predict(load_wrn(args.work, "oracle", len(tax.classes)), test, splits.mean, splits.std, CPU)
    student_logits = predict(load_wrn(args.work, "library", len(tax.classes)), test, splits.mean, splits.std, CPU)
    oracle_acc = (oracle_logits.argmax(1) == test.y).float().mean().item()
    library_acc = (student_logits.argmax(1) == test.y).float().mean().item()
    lib = pool.path(pool.spec.library.onnx).read_bytes()
    parts = {t: pool.path(pool.part(t).onnx).read_bytes() for t in TASKS}
    experts = {t: torch.from_numpy(v) for t, v in onnx_logits(lib, parts, test, pool.mean, pool.std).items()}

    print(f"pool {pool.pool_id}: oracle {100 * oracle_acc:.2f}% (target >= 72), library student "
          f"{100 * library_acc:.2f}% = {library_acc / oracle_acc:.2f}x the oracle (target >= 0.85x)")
    for n in range(1, 6):
        poe, oracle = [], []
        for combo in itertools.combinations(TASKS, n):
            classes = tax.composite_classes(combo)
            poe.append(task_specific_accuracy(torch.cat([experts[t] for t in combo], 1), test.y, classes))
            oracle.append(task_specific_accuracy(oracle_logits, test.y, classes))
        gap = 100 * (statistics.mean(oracle) - statistics.mean(poe))
        label = "single expert" if n == 1 else f"PoE n(Q) = {n}"
        print(f"{label:16s} {100 * statistics.mean(poe):6.2f}%  oracle task-specific "
              f"{100 * statistics.mean(oracle):6.2f}%  gap {gap:4.2f} (target <= {GAP_TARGETS[n]:g}: "
              f"{'met' if round(gap, 1) <= GAP_TARGETS[n] else 'MISSED'})")


if __name__ == "__main__":
    main()
