"""Query-time capabilities: plan and budget latency over expert widths, reject rules.

    python benchmarks/plan.py [--pool DIR] [--queries 200] [--val-per-class 50]

Plan latency needs a pool with several expert widths: the given one, else an untrained
pool of five CIFAR-100 superclasses at the paper's widths (library WRN-16-(1,1), experts
WRN-16-(1,ks) at ks = 0.25, 0.5, 1.0) with --val-per-class random validation images per
class, as many as the real split has: the plan's cost grows with the validation images
of the query's classes and with the number of widths, not with the weights or with the
tasks outside the query. Prints, per n(Q) = 1..5, the p50/p99 of `poe_core.budget.plan`
(the accuracy-vs-size front), of `fit_budget`, and of what POST /models/plan computes per
request (`app.api.models.plan_of`: the request's query resolved, the front, every point's
model id; without HTTP and its answer cache), and the numbers of candidates and of front
points.

Then, on the shipped CIFAR-100 pool (trained), the "none of these" rule per n(Q): the
time to fit it, the score chosen, and its validation figures (AUROC in-task vs.
out-of-task, accept rate in task, reject rate out of task), averaged over random queries.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from app.api.models import plan_of
from app.schemas import ModelRequest
from app.serving.registry import ServedPool
from poe_core.assemble import Assembler
from poe_core.budget import Budget, candidates, fit_budget, plan
from poe_core.build import build_pool
from poe_core.data import CIFAR100_MEAN, CIFAR100_STD, ImageSet, Splits
from poe_core.nets import ExpertHead, Library, WRNSpec
from poe_core.pool import load_pool
from poe_core.taxonomy import cifar100

SHIPPED = Path(__file__).resolve().parents[1] / "poe_core" / "pools" / "cifar100"
WIDTHS = (0.25, 0.5, 1.0)


def untrained_wide_pool(out: Path, val_per_class: int):
    torch.manual_seed(0)
    taxonomy = cifar100().subset(cifar100().task_names[:5])
    classes = torch.tensor(taxonomy.composite_classes(taxonomy.task_names))
    library = Library(16, 1)
    experts = {ks: {t: ExpertHead(16, library.out_channels, ks, 5) for t in taxonomy.task_names} for ks in WIDTHS}
    train = ImageSet(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), classes.repeat(3)[:64])
    val = ImageSet(torch.randint(0, 256, (len(classes) * val_per_class, 3, 32, 32), dtype=torch.uint8),
                   classes.repeat(val_per_class))
    splits = Splits(train, val, None, taxonomy, CIFAR100_MEAN, CIFAR100_STD, "untrained")
    return build_pool(out, library=library, experts=experts, splits=splits, library_spec=WRNSpec(16, 1, 1),
                      expert_spec=WRNSpec(16, 1, 0.25), int8_max_mean_drop=1.0, calibration_images=64)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t) * 1e3


def plans(pool, queries: int) -> None:
    asm = Assembler(pool)
    served = ServedPool(1, None, pool, asm, tuple(pool.tasks))
    rng = random.Random(0)
    print(f"pool {pool.pool_id}: {len(pool.tasks)} experts at widths {pool.widths}, "
          f"{len(pool.val_labels)} validation images")
    print(f"{'n(Q)':>4} {'candidates':>10} {'front':>6} {'plan p50 ms':>12} {'p99':>8} "
          f"{'budget p50 ms':>14} {'p99':>8} {'POST /models/plan p50 ms':>25} {'p99':>8}")
    for n in range(1, 6):
        plan_ms, fit_ms, fronts, endpoint_ms = [], [], [], []
        for _ in range(queries):
            q = pool.query(rng.sample(pool.tasks, n))
            front, ms = timed(plan, asm, q)
            plan_ms.append(ms)
            fronts.append(len(front))
            budget = Budget(max_params=(front[0].params + front[-1].params) // 2)
            _, ms = timed(fit_budget, asm, q, budget)
            fit_ms.append(ms)
            _, ms = timed(plan_of, served, ModelRequest(tasks=list(q.tasks)), "params", "")
            endpoint_ms.append(ms)
        print(f"{n:>4} {len(candidates(asm, q)):>10} {statistics.mean(fronts):>6.1f} "
              f"{statistics.median(plan_ms):>12.2f} {percentile(plan_ms, 0.99):>8.2f} "
              f"{statistics.median(fit_ms):>14.2f} {percentile(fit_ms, 0.99):>8.2f} "
              f"{statistics.median(endpoint_ms):>25.2f} {percentile(endpoint_ms, 0.99):>8.2f}")


def rejects(pool, queries: int) -> None:
    rng = random.Random(1)
    print(f"\nreject rule on pool {pool.pool_id} (validation split, {queries} random composite tasks per n(Q))")
    print(f"{'n(Q)':>4} {'fit p50 ms':>11} {'score chosen':>22} {'AUROC':>7} {'accept in':>10} {'reject out':>11}"
          f" {'mask AUROC':>11}")
    for n in (1, 2, 3, 4, 5, 10):
        ms, rules, mask_auroc = [], [], []
        for _ in range(queries):
            q = pool.query(rng.sample(pool.tasks, n))
            rule, t = timed(pool.reject_rule, q)
            ms.append(t)
            rules.append(rule)
            if pool.unavailable("mask") is None:
                mask_auroc.append(pool.reject_rule(pool.query(q.tasks, method="mask")).auroc)
        chosen = ", ".join(f"{s} {c}" for s, c in Counter(r.score for r in rules).most_common())
        print(f"{n:>4} {statistics.median(ms):>11.2f} {chosen:>22} {statistics.mean(r.auroc for r in rules):>7.3f} "
              f"{statistics.mean(r.accept_rate_in_task for r in rules):>10.3f} "
              f"{statistics.mean(r.reject_rate_out_of_task for r in rules):>11.3f} "
              f"{f'{statistics.mean(mask_auroc):.3f}' if mask_auroc else 'n/a':>11}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, help="a pool with several expert widths")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.pool:
            pool = load_pool(args.pool)
        else:
            t0 = time.perf_counter()
            pool = untrained_wide_pool(Path(tmp) / "pool", args.val_per_class)
            print(f"built an untrained pool of 5 tasks at widths {list(WIDTHS)} in "
                  f"{time.perf_counter() - t0:.0f} s")
        plans(pool, args.queries)
    if SHIPPED.is_dir():
        rejects(load_pool(SHIPPED), args.queries)


if __name__ == "__main__":
    main()
