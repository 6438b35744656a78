"""The only place that knows about torch.distributed: the trainer calls these and stays free of DDP code.

Under ``torchrun --nproc-per-node N`` (env vars RANK, WORLD_SIZE, LOCAL_RANK) a process group is initialised with
NCCL on CUDA and gloo on CPU; without them everything degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device: str) -> Dist:
    """Initialise the process group if launched by torchrun; return this process's place in it."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def wrap(module: torch.nn.Module, d: Dist, device: str) -> torch.nn.Module:
    """DDP-wrap a module when running distributed."""
    if not d.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [d.local_rank] if device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids)


def mean(value: float, d: Dist) -> float:
    """Mean of a scalar over ranks (for logging the global loss)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item() / d.world_size)


def any_flag(flag: bool, d: Dist) -> bool:
    """True on every rank if any rank raised the flag (e.g. a non-finite loss)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
