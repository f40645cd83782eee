"""Where and in what precision to compute: the device, and the autocast dtype it is fast in.

Mixed precision is not free everywhere. On CUDA, fp16 AMP is. On a CPU it depends on
the silicon: with Intel AMX bfloat16 autocast trains about 3x faster than fp32, with
AVX512-BF16 alone (a Zen 4 AMD EPYC) 1.6-2.2x (benchmarks/precision.py), but on a CPU
with AVX2 only oneDNN emulates bf16 and the same step runs 7-13x *slower* than fp32.
So `auto` asks the hardware, and the choice is logged and recorded with every phase.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AMX tiles or AVX512-BF16)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


@functools.cache
def resolve_precision(requested: str, device_type: str) -> str:
    """`auto` -> fp16 on CUDA, bf16 on a CPU with native bf16, else fp32. An explicit
    choice is kept (bf16 on an AVX2 CPU is allowed, only slow)."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        chosen, why = "fp16", "CUDA"
    elif cpu_has_fast_bf16():
        chosen, why = "bf16", f"{cpu_model()} computes bf16 natively (AMX or AVX512-BF16)"
    else:
        chosen, why = "fp32", f"{cpu_model()} has no native bf16 (bf16 autocast would be emulated)"
    log.info("precision auto -> %s: %s", chosen, why)
    return chosen


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (as `lscpu` prints it), for logs and benchmark reports, with
    its family and model numbers where the name alone says little ("AMD EPYC" is a Zen 2
    with AVX2 only or a Zen 4 with AVX512-BF16)."""
    with contextlib.suppress(OSError):
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's fields only
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = (f" (family {fields['cpu family']} model {fields['model']})"
                       if "cpu family" in fields and "model" in fields else "")
            return fields["model name"] + numbers
    return platform.processor() or platform.machine()


def machine_summary(device: torch.device | None = None) -> dict:
    """What a timing was measured on: CPU model, cores, bf16 capability, device."""
    import os

    device = device or pick_device()
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "native_bf16": cpu_has_fast_bf16(),
            "device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(device: torch.device) -> str:
    """One line for a benchmark's output: the machine its timings were measured on."""
    m = machine_summary(device)
    return (f"machine: {m['cpu']}, {m['cores']} cores, native bf16: {m['native_bf16']}, device {m['device']}, "
            f"precision auto -> {resolve_precision('auto', device.type)}")
