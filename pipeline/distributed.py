"""torch.distributed set-up from torchrun's environment; returns plain values."""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    ``device``: "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu", "cuda", or
    "cuda:N" (that GPU for a single process; under torchrun each rank takes cuda:LOCAL_RANK).
    NCCL on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1 and device.startswith("cuda:"):
        local = int(device.split(":", 1)[1])
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = f"cuda:{local}" if use_cuda else "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj: Any, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (every rank gets the list); ``[obj]`` in one process."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo, device: str | torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def any_rank_nonfinite(value: torch.Tensor, info: DistInfo) -> bool:
    """True on every rank when ``value`` is NaN/inf on any rank (one host sync)."""
    bad = (~torch.isfinite(value.detach())).float().reshape(1)
    if info.enabled:
        dist.all_reduce(bad)
    return bool(bad.item() > 0)
