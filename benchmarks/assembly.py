"""Assembly time of composite models vs. torch.onnx.export of the same branched model.

    python benchmarks/assembly.py [--pool DIR] [--runs 2000]

Uses the given pool (default: the shipped CIFAR-100 pool if present, else an untrained
pool with the paper's CIFAR-100 widths: library WRN-16-(1,1), experts WRN-16-(1,0.25);
weights do not change timing). Prints p50/p99 per n(Q) and the speed-up, then for
n(Q) = 5 one line per weight format: bytes, assembly p50 and the time to convert the
assembled model to ORT format (poe_core.formats.to_ort) with the size of the .ort file.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from poe_core.assemble import Assembler
from poe_core.build import build_pool
from poe_core.data import CIFAR100_MEAN, CIFAR100_STD, ImageSet, Splits
from poe_core.formats import FORMATS, FormatUnavailable, to_ort
from poe_core.nets import ExpertHead, Library, WRNSpec
from poe_core.pool import load_pool
from poe_core.taxonomy import cifar100

SHIPPED = Path(__file__).resolve().parents[1] / "poe_core" / "pools" / "cifar100"


def untrained_cifar_pool(out: Path):
    torch.manual_seed(0)
    taxonomy = cifar100()
    library = Library(16, 1)
    experts = {t: ExpertHead(16, library.out_channels, 0.25, 5) for t in taxonomy.task_names}
    fake = ImageSet(torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8),
                    torch.arange(100).repeat(2))
    splits = Splits(fake, fake, None, taxonomy, CIFAR100_MEAN, CIFAR100_STD, "untrained")
    # Untrained experts on random labels: int8 accuracy is meaningless, keep it for timing.
    return build_pool(out, library=library, experts=experts, splits=splits,
                      library_spec=WRNSpec(16, 1, 1), expert_spec=WRNSpec(16, 1, 0.25),
                      int8_max_mean_drop=1.0)


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--export-runs", type=int, default=5)
    parser.add_argument("--ort-runs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.pool:
            pool = load_pool(args.pool)
        elif SHIPPED.is_dir():
            pool = load_pool(SHIPPED)
        else:
            pool = untrained_cifar_pool(Path(tmp) / "pool")
        t0 = time.perf_counter()
        assembler = Assembler(pool)
        print(f"pool {pool.pool_id} ({pool.manifest['dataset']['name']}), {len(pool.tasks)} experts; "
              f"preparing fragments took {(time.perf_counter() - t0) * 1000:.0f} ms once per pool")
        rng = random.Random(0)
        print(f"{'n(Q)':>4} {'bytes':>9} {'p50 ms':>8} {'p99 ms':>8} {'export p50 ms':>14} {'speed-up':>9}")
        for n in (1, 2, 5, 10, 20):
            if n > len(pool.tasks):
                break
            lists = [rng.sample(pool.tasks, n) for _ in range(args.runs)]
            times = []
            for tasks in lists:
                t = time.perf_counter()
                model = assembler.assemble(tasks)
                times.append(time.perf_counter() - t)
            branched = pool.branched_model(lists[0])
            export = []
            for _ in range(args.export_runs):
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(branched, (torch.zeros(1, *pool.image_shape),), io.BytesIO(),
                                      input_names=["input"], output_names=["logits"],
                                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
                export.append(time.perf_counter() - t)
            p50 = statistics.median(times)
            print(f"{n:>4} {len(model.data):>9,} {p50 * 1e3:>8.3f} {percentile(times, 0.99) * 1e3:>8.3f} "
                  f"{statistics.median(export) * 1e3:>14.1f} {statistics.median(export) / p50:>8.0f}x")
        formats(pool, assembler, [rng.sample(pool.tasks, min(5, len(pool.tasks))) for _ in range(args.runs)],
                args.ort_runs)


def formats(pool, assembler: Assembler, lists, ort_runs: int) -> None:
    """Bytes, assembly p50 and ORT conversion p50 per weight format for n(Q) = len(lists[0])."""
    print(f"\nweight formats, n(Q) = {len(lists[0])}")
    print(f"{'format':>6} {'bytes':>9} {'p50 ms':>8} {'drop mean':>10} {'drop max':>9} "
          f"{'to .ort p50 ms':>15} {'.ort bytes':>11}")
    for weights in FORMATS:
        info = pool.format_info(weights)
        try:
            assembler.assemble(lists[0], weights=weights)
        except FormatUnavailable as e:
            print(f"{weights:>6} refused: {e}")
            continue
        times = []
        for tasks in lists:
            t = time.perf_counter()
            model = assembler.assemble(tasks, weights=weights)
            times.append(time.perf_counter() - t)
        convert = []
        for tasks in lists[:ort_runs]:
            data = assembler.assemble(tasks, weights=weights).data
            t = time.perf_counter()
            ort_bytes = to_ort(data)
            convert.append(time.perf_counter() - t)
        drop = info.get("val_acc_drop") or {"mean": 0.0, "max": 0.0}  # fp32 is the reference: None
        print(f"{weights:>6} {len(model.data):>9,} {statistics.median(times) * 1e3:>8.3f} "
              f"{drop['mean']:>10.2%} {drop['max']:>9.2%} "
              f"{statistics.median(convert) * 1e3:>15.1f} {len(ort_bytes):>11,}")


if __name__ == "__main__":
    main()
