"""Data parallelism through the standard engine: ``torchrun`` + ``torch.distributed`` + DDP.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; when those are
present :func:`current` initialises the process group once (NCCL on CUDA, gloo on CPU). Without them
everything here is a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # set under DDP: the device this rank must use

    @property
    def active(self) -> bool:
        return self.world_size > 1 and tdist.is_available() and tdist.is_initialized()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP-wrap ``model`` when running distributed; the bare model otherwise."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DDP(model, device_ids=ids)

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce_sum(self, value: float, count: int) -> tuple[float, int]:
        """Sum a (loss sum, token count) pair over ranks."""
        if not self.active:
            return value, count
        t = torch.tensor([value, float(count)], dtype=torch.float64, device=self._comm_device())
        tdist.all_reduce(t)
        return float(t[0]), int(round(float(t[1])))

    def any_flag(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (stop together, never hang)."""
        if not self.active:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _comm_device(self) -> torch.device:
        if tdist.get_backend() == "nccl":
            return self.device or torch.device("cuda", self.local_rank)
        return torch.device("cpu")


_CONTEXT: DistContext | None = None


def current() -> DistContext:
    """The process's distributed context, initialising the process group under torchrun."""
    global _CONTEXT
    if _CONTEXT is not None:
        return _CONTEXT
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CONTEXT = DistContext()
        return _CONTEXT
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=int(os.environ.get(
            "DEEPRNN_DIST_TIMEOUT", "120"))))
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)
    return _CONTEXT


def shutdown() -> None:
    global _CONTEXT
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _CONTEXT = None
