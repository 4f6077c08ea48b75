"""torch.distributed set-up from torchrun's environment; returns plain values."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from pipeline.common import ConfigError
from pipeline.options import check_device

# A gloo process group beside NCCL for flags that live on the host (see any_rank); None otherwise.
_HOST_GROUP = None


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


def resolve_device(device: str = "auto", local_rank: int = 0, world_size: int = 1) -> str:
    """The device this process computes on: ``"cpu"`` or ``"cuda:I"`` with I a visible GPU.

    ``device``: "auto" (CUDA when available, else cpu), "cpu", "cuda", or "cuda:N". A single process
    takes GPU N ("cuda" means 0); under torchrun (``world_size`` > 1) each rank takes its LOCAL_RANK
    GPU, or GPU 0 when the launcher makes one GPU visible per rank (SLURM ``--gpus-per-task=1`` and the
    like, where LOCAL_RANK can exceed the visible count). A GPU that does not exist, or CUDA where
    there is none, is a ConfigError naming the option and what is visible, never a raw traceback.
    """
    if device == "cpu":
        return "cpu"
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        device = "cuda"
    check_device("device", device)
    if not torch.cuda.is_available():
        raise ConfigError(f"device: {device} requested but CUDA is not available (torch {torch.__version__}, "
                          f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu")
    n = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"{n} CUDA device(s) visible (CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'})"
    if world_size > 1:
        if local_rank < n:
            index = local_rank
        elif n == 1:
            index = 0  # one GPU per rank, chosen by the launcher
        else:
            raise ConfigError(f"device: rank with LOCAL_RANK={local_rank} has no GPU of its own: {seen}; "
                              "start at most one process per visible GPU")
    else:
        index = int(device[5:]) if device.startswith("cuda:") else 0
        if index >= n:
            raise ConfigError(f"device: {device} does not exist: {seen}"
                              + (f"; use cuda:0 to cuda:{n - 1}" if n else ""))
    return f"cuda:{index}"


def resolve_precision(precision: str, device: str, *, cuda_auto: str = "bf16", field: str = "precision",
                      cpu_fp16: str = "error") -> str:
    """The numeric precision a stage computes in on ``device``: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``"auto"`` is fp32 on CPU and ``cuda_auto`` on CUDA (bf16 for training: no loss scaling needed;
    embed-text passes fp16, which every CUDA GPU runs fast and which its frozen forward pass tolerates).
    fp16 on CPU is slow and inexact: ``cpu_fp16="error"`` refuses it (training, where GradScaler needs
    CUDA) with a ConfigError naming ``field``; ``"warn"`` logs a warning and keeps it.
    """
    if precision == "auto":
        return cuda_auto if str(device).startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"{field}: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and not str(device).startswith("cuda"):
        if cpu_fp16 == "error":
            raise ConfigError(f"{field}: fp16 needs CUDA (use bf16 or fp32 on CPU)")
        logging.getLogger(__name__).warning("%s fp16 on CPU is slow and inexact; consider fp32 or bf16", field)
    return precision


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    ``device`` as :func:`resolve_device`; a CUDA device also becomes the process's current device, so
    work that names no index (``device="cuda"``, streams, pinned-memory copies, NCCL) lands on it.
    NCCL on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local, world)
    use_cuda = dev.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(torch.device(dev))
    global _HOST_GROUP
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if world > 1 and use_cuda and _HOST_GROUP is None:
        # Host-side agreement (any_rank, every step) over gloo: an NCCL all-reduce read back with
        # .item() would wait for all GPU work queued before it, a stall of the pipeline each step.
        _HOST_GROUP = dist.new_group(backend="gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    global _HOST_GROUP
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()  # every group, the host group too
    _HOST_GROUP = None


def all_gather_object(obj: Any, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (every rank gets the list); ``[obj]`` in one process."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, info: DistInfo, device: str | torch.device | None = None) -> bool:
    """True on every rank when the host value ``flag`` is true on any rank. Reduced on the CPU (the
    gloo default group, or the gloo host group beside NCCL), so it never waits for the GPU.
    ``device`` is kept for callers of the older signature and not used."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, group=_HOST_GROUP)
    return bool(t.item() > 0)


def agree(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each host flag true on every rank when it is true on any rank: one CPU all-reduce for all of them
    (a stop request or a checkpoint timer seen by one rank must be acted on by all at the same step)."""
    if not info.enabled:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return [bool(x > 0) for x in t.tolist()]


def any_rank_flag(flag: torch.Tensor, info: DistInfo) -> bool:
    """True on every rank when the one-element tensor ``flag`` is nonzero on any rank. One host sync:
    call it where the loop synchronises anyway (log and checkpoint steps), not every step."""
    f = flag.detach().float().reshape(1).clone()
    if info.enabled:
        dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return bool(f.item() > 0)
