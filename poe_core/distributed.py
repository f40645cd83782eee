"""Data-parallel training under torchrun (torch.distributed, DistributedDataParallel).

`torchrun --nproc-per-node N -m poe_core.cli extract ...` starts N processes; each finds
its rank in the environment torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`) and
joins one process group (NCCL on CUDA, one GPU per process; gloo on the CPU). Every
rank draws the same global batch from the same seeded generator and trains on its own
disjoint slice of it; DDP averages the gradients. So the global batch, the step count,
the schedule and the seeds are what one process would use, and a checkpoint written
under torchrun resumes in one process and back.

Rank 0 alone validates, writes checkpoints and phase results and fills the logit bank;
the other ranks wait for it at a barrier. Without torchrun (or with one process) every
function here is a no-op and training is exactly the single-process loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from poe_core.device import pick_device

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """True in a process started by torchrun with more than one process in all."""
    return all(v in os.environ for v in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def init(device: str = "auto") -> None:
    """Join torchrun's process group (once); a no-op outside torchrun."""
    if not launched() or dist.is_initialized():
        return
    if pick_device(device).type == "cuda":
        # One GPU per process: "cuda" then means this rank's GPU everywhere in poe_core.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first, the others after it (e.g. rank 0 fills the logit
    bank, the others then find it complete and only read it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of a batch of n: disjoint, covering, sizes differ by at most one."""
    return rank * n // world, (rank + 1) * n // world


def shard(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None):
    """This rank's slice of a global batch (x, y, oracle logits t or None), and the
    weight of its loss: n_rank * world / n. DDP averages the ranks' gradients, so with
    that weight the result is the gradient of the global batch's mean loss even when
    the batch does not split evenly. One process: the batch itself, weight 1."""
    world = world_size()
    if world == 1:
        return x, y, t, 1.0
    start, stop = shard_bounds(len(y), rank(), world)
    weight = (stop - start) * world / len(y)
    return x[start:stop], y[start:stop], None if t is None else t[start:stop], weight


class _StepLoss(nn.Module):
    """The loss of one training step as a module, so that DDP sees the forward pass of
    every trainable module (several expert heads train in one step)."""

    def __init__(self, trainables: Sequence[nn.Module], step_loss: Callable) -> None:
        super().__init__()
        self.trainables = nn.ModuleList(trainables)
        self.step_loss = step_loss

    def forward(self, x, y, t):
        return self.step_loss(x, y, t)


def data_parallel(trainables: Mapping[str, nn.Module], step_loss: Callable) -> Callable:
    """`step_loss` with its gradients all-reduced across ranks by DDP; `step_loss`
    itself in one process.

    BatchNorm keeps per-rank statistics (each rank normalises its slice by the slice's
    own mean and variance; DDP broadcasts rank 0's running statistics each step), not
    SyncBatchNorm: SyncBatchNorm runs on GPUs only (the CPU/gloo path would need a
    second code path), and it adds a collective per BN layer per step. The price is
    that each BN layer sees batch / N images per step, so keep that above ~32 on
    GPU hosts (raise --batch-size with the number of GPUs)."""
    if world_size() == 1:
        return step_loss
    module = _StepLoss(list(trainables.values()), step_loss)
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def all_sum(*values: float) -> list[float]:
    """Sums of numbers across ranks (the numbers themselves in one process)."""
    if world_size() == 1:
        return list(values)
    # NCCL reduces CUDA tensors only
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return buf.tolist()


def torchrun_command(nproc: int, extract_args: Sequence[str]) -> list[str]:
    """The command line that runs `poe extract extract_args` in nproc processes on this
    host under torchrun, with this interpreter (what `poe worker` spawns when
    POE_TRAIN_NPROC > 1)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "poe_core.cli", "extract", *extract_args]
