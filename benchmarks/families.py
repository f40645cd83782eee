"""Assembly time and model size of a MobileNetV2 pool (the paper's ImageNet setting).

    python benchmarks/families.py [--size 224] [--split 5] [--kc 1] [--ks 0.25] [--runs 2000]

Builds an untrained pool (random weights: the figures are structural) of 20 primitive
tasks of 5 classes each: the library is MobileNetV2's stem and first `split`
inverted-residual stages at width kc, each expert the remaining stages, the last 1x1
convolution and a linear layer at width ks (poe_core.nets). Prints, per n(Q) = 1, 5,
20: the model's bytes in fp32 and int8, its parameters and multiply-accumulates, and
the assembly time (p50, p99 over random task lists).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from assembly import percentile

from poe_core.assemble import Assembler
from poe_core.build import build_pool
from poe_core.data import ImageSet, Splits
from poe_core.nets import MobileNetV2Spec, expert_head
from poe_core.taxonomy import Taxonomy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def untrained_mobilenet_pool(out: Path, size: int, split: int, kc: float, ks: float, tasks: int = 20,
                             classes_per_task: int = 5):
    torch.manual_seed(0)
    taxonomy = Taxonomy.from_hierarchy({f"task{t:02d}": [f"class{t:02d}_{c}" for c in range(classes_per_task)]
                                        for t in range(tasks)})
    library_spec, expert_spec = MobileNetV2Spec(split, kc, kc), MobileNetV2Spec(split, kc, ks)
    library = library_spec.library()
    experts = {t: expert_head(expert_spec, library.out_channels, classes_per_task, seed=i)
               for i, t in enumerate(taxonomy.task_names)}
    n = len(taxonomy.classes)
    fake = ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8), torch.arange(n))
    splits = Splits(fake, fake, None, taxonomy, IMAGENET_MEAN, IMAGENET_STD, "untrained")
    # Random weights on random labels: int8 accuracy is meaningless, keep it for sizes.
    return build_pool(out, library=library, experts=experts, splits=splits, library_spec=library_spec,
                      expert_spec=expert_spec, int8_max_mean_drop=1.0, calibration_images=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--split", type=int, default=5)
    parser.add_argument("--kc", type=float, default=1.0)
    parser.add_argument("--ks", type=float, default=0.25)
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pool = untrained_mobilenet_pool(Path(tmp) / "pool", args.size, args.split, args.kc, args.ks)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        assembler = Assembler(pool)
        prepared = time.perf_counter() - t0
        arch = pool.spec.architecture
        print(f"MobileNetV2 library {arch.library}, experts {arch.expert}, input {args.size}x{args.size}; "
              f"library {pool.spec.library.params:,} params, {pool.spec.library.flops / 1e6:.1f}M MACs; "
              f"one expert {pool.part('task00').params:,} params, {pool.part('task00').flops / 1e6:.1f}M MACs; "
              f"built in {built:.0f} s, fragments prepared in {prepared * 1000:.0f} ms")
        rng = random.Random(0)
        print(f"{'n(Q)':>4} {'fp32 bytes':>11} {'int8 bytes':>11} {'params':>10} {'MACs':>8} "
              f"{'p50 ms':>8} {'p99 ms':>8}")
        for n in (1, 5, 20):
            lists = [sorted(rng.sample(pool.tasks, n)) for _ in range(args.runs)]
            times = []
            for tasks in lists:
                t0 = time.perf_counter()
                assembler.assemble(tasks)
                times.append(time.perf_counter() - t0)
            q = pool.query(lists[0])
            fp32, int8 = (len(assembler.assemble(q, weights=w).data) for w in ("fp32", "int8"))
            print(f"{n:>4} {fp32:>11,} {int8:>11,} {pool.params(q):>10,} {pool.flops(q) / 1e6:>7.0f}M "
                  f"{percentile(times, 0.5) * 1000:>8.3f} {percentile(times, 0.99) * 1000:>8.3f}")


if __name__ == "__main__":
    main()
