"""Does `precision auto` pick the faster precision on this machine?

    python benchmarks/precision.py [--batch 128] [--steps 6]

Times, on the CPU, in fp32 and in bfloat16 autocast (each NCHW and channels_last), the
two costs that decide an extraction's wall time: the oracle's forward pass (WRN-16-(4,4),
what fills the logit bank) and a training step of the library student (WRN-16-(1,1)).
Prints the median time per batch of each, bf16's speed-up over fp32 (channels_last, as
poe trains), and whether `auto`'s choice (bf16 where the CPU has AMX or AVX512-BF16,
else fp32) is the faster one here. The CPU model is printed first: the answer differs
between machines (AMX Xeon, AVX512-BF16 EPYC, AVX2-only EPYC).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from poe_core.device import autocast, machine_line, resolve_precision
from poe_core.nets import wrn

CPU = torch.device("cpu")


def per_batch(model: torch.nn.Module, train: bool, precision: str, channels_last: bool,
              batch: int, steps: int) -> float:
    """Median seconds per batch (the first step, which sets oneDNN up, is left out)."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train(train)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        if train:
            with autocast(CPU, precision):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad(), autocast(CPU, precision):
                model(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    print(machine_line(CPU))
    auto = resolve_precision("auto", "cpu")
    speedups = []
    for name, depth_widths, train in (("oracle forward", (16, 4, 4), False), ("student train step", (16, 1, 1), True)):
        ms = {}
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                ms[precision, channels_last] = took = 1000 * per_batch(
                    wrn(*depth_widths, 100), train, precision, channels_last, args.batch, args.steps)
                layout = "channels_last" if channels_last else "NCHW"
                print(f"{name:20s} {precision}  {layout:13s} {took:8.1f} ms per batch of {args.batch}")
        speedups.append(ms["fp32", True] / ms["bf16", True])
        print(f"{name:20s} bf16 speed-up over fp32 (channels_last): {speedups[-1]:.2f}x")
    faster = "bf16" if min(speedups) > 1 else "fp32" if max(speedups) < 1 else "mixed"
    verdict = "right" if faster == auto else "wrong" if faster != "mixed" else "unclear"
    print(f"auto chose {auto}; faster here: {faster} -> auto is {verdict}")


if __name__ == "__main__":
    main()
