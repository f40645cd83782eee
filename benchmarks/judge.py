"""Does a candidate pool beat the shipped one? The rule the shipped CIFAR-100 pool is
replaced by, on the validation split only (the test split never chooses).

    python benchmarks/judge.py CANDIDATE [--against poe_core/pools/cifar100] [--random 200]

Both pools must cover the same tasks and classes. Prints, for each pool, from the
validation logits stored in it (the format they were stored in, fp16 with
`--fp16-logits`), at the default expert width:

  single      mean task-specific accuracy of the experts, over all tasks;
  six n=k     mean accuracy of every composite of k of the paper's six CIFAR-100 tasks
              (k = 2..5), where the pool has them;
  random n=k  mean accuracy over --random composites of k of all tasks
              (k = 2, 3, 4, 5, 10; random.Random(0), the same lists for both pools);
  mask n=k    the library student's own head restricted to the same random composites.

and the candidate's lead on each row. The candidate wins only if it leads on every
composite row (six, random) and is not behind on single; the last line says so and the
exit status is 0 for a win, 1 otherwise. A tie on single is allowed because composites
are what the service hands out, while single is one mean over 20 experts of 250
validation images each, where equal counts of correct images are a real outcome (pool
c85618fe against a8673274: 4,234 of 5,000 both).
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import sys
from pathlib import Path

from reproduction import TASKS as PAPER_TASKS

from poe_core.pool import Pool, load_pool

SHIPPED = Path(__file__).resolve().parents[1] / "poe_core" / "pools" / "cifar100"
RANDOM_SIZES = (2, 3, 4, 5, 10)


def rows(pool: Pool, lists: dict[int, list[list[str]]]) -> dict[str, float]:
    out = {"single": statistics.mean(pool.composite_accuracy([t]) for t in pool.tasks)}
    if set(PAPER_TASKS) <= set(pool.tasks):
        for k in range(2, 6):
            out[f"six n={k}"] = statistics.mean(pool.composite_accuracy(list(c))
                                                for c in itertools.combinations(PAPER_TASKS, k))
    for k, queries in lists.items():
        out[f"random n={k}"] = statistics.mean(pool.composite_accuracy(q) for q in queries)
    if pool.unavailable("mask") is None:
        for k, queries in lists.items():
            out[f"mask n={k}"] = statistics.mean(pool.mask_accuracy(pool.query(q)) for q in queries)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--against", type=Path, default=SHIPPED)
    parser.add_argument("--random", type=int, default=200, help="random composites per size")
    args = parser.parse_args()
    candidate, shipped = load_pool(args.candidate), load_pool(args.against)
    if (candidate.tasks, candidate.taxonomy.classes) != (shipped.tasks, shipped.taxonomy.classes):
        parser.error("the two pools do not cover the same tasks and classes")
    rng = random.Random(0)
    lists = {k: [sorted(rng.sample(shipped.tasks, k)) for _ in range(args.random)]
             for k in RANDOM_SIZES if k <= len(shipped.tasks)}
    new, old = rows(candidate, lists), rows(shipped, lists)
    print(f"validation accuracy (%), candidate {candidate.pool_id} against {shipped.pool_id}")
    print(f"{'':<14}{'candidate':>10}{'against':>10}{'lead':>8}")
    wins = True
    for name in old:
        if name not in new:
            continue
        lead = 100 * (new[name] - old[name])
        if name == "single":
            wins &= lead > -1e-9  # the same count of correct images, up to float rounding
        elif not name.startswith("mask"):
            wins &= lead > 0
        print(f"{name:<14}{100 * new[name]:>10.2f}{100 * old[name]:>10.2f}{lead:>+8.2f}")
    print("the candidate leads on every composite row, not behind on single" if wins
          else "the candidate does not lead on every composite row, or is behind on single")
    return 0 if wins else 1


if __name__ == "__main__":
    sys.exit(main())
