"""Data parallelism through the standard engine: ``torchrun`` + ``torch.distributed`` + DDP.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; when those are
present :func:`current` initialises the process group once (NCCL on CUDA, gloo on CPU). Without them
everything here is a no-op, so the training loop reads the same either way.

Batch-sharded tensors (the carried hidden state, ``(L, B/W, H)`` or an ``(h, c)`` pair of them) are
gathered to the global ``(L, B, H)`` for checkpoints and sliced back to rank ``r``'s rows
``[r*B/W, (r+1)*B/W)`` on resume, the rows :class:`deeprnn.batching.BatchLoader` gives rank ``r``;
a checkpoint therefore resumes under any world size that divides ``B``.

Failures: a rank that fails exits, which closes its connections; a peer waiting in a gloo collective
then gets "Connection closed by peer" at once (NCCL peers are stopped by torchrun, or by the
``DEEPRNN_DIST_TIMEOUT`` seconds, default 120). :func:`peer_failure` recognises such errors so the
command line can report them in one line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Union

import torch
import torch.distributed as tdist

# A recurrent state: h of shape (L, B, H), an LSTM's (h, c), or None before the first batch.
BatchState = Union[torch.Tensor, tuple, None]


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

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank; waits for rank 0 to get there."""
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Overwrite ``module``'s parameters and buffers with rank 0's (same architecture on every rank)."""
        if not self.active:
            return
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                tdist.broadcast(t.data, src=0)

    def gather_batch(self, state: BatchState) -> BatchState:
        """Rank shards ``(L, B/W, H)`` (or an ``(h, c)`` pair) -> the global ``(L, B, H)`` on every rank."""
        if state is None or not self.active:
            return state
        if isinstance(state, tuple):
            return tuple(self.gather_batch(s) for s in state)
        parts = [torch.empty_like(state) for _ in range(self.world_size)]
        tdist.all_gather(parts, state.contiguous())
        return torch.cat(parts, dim=1)  # (L, B, H), rank r's rows at [r*B/W, (r+1)*B/W)

    def shard_batch(self, state: BatchState) -> BatchState:
        """The global ``(L, B, H)`` (or an ``(h, c)`` pair) -> this rank's rows ``[r*B/W, (r+1)*B/W)``."""
        if state is None or self.world_size == 1:
            return state
        if isinstance(state, tuple):
            return tuple(self.shard_batch(s) for s in state)
        n = state.shape[1] // self.world_size
        return state[:, self.rank * n : (self.rank + 1) * n].contiguous()  # (L, B/W, H)

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
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=dist_timeout()))
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)
    return _CONTEXT


def dist_timeout() -> int:
    """``$DEEPRNN_DIST_TIMEOUT``: seconds a rank waits for the others (default 120). A value that is not a whole
    number of seconds was a ValueError traceback on every rank."""
    raw = os.environ.get("DEEPRNN_DIST_TIMEOUT", "120")
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds < 1:
        from deeprnn.errors import ConfigError

        raise ConfigError(f"DEEPRNN_DIST_TIMEOUT must be a whole number of seconds >= 1, got {raw!r}; e.g. "
                          "DEEPRNN_DIST_TIMEOUT=300, or unset it for 120")
    return seconds


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group. ``wait`` (after success): first wait for every rank to get here.

    Without that barrier a rank that finishes early tears down its gloo connections while rank 0 is
    still writing the summary, and the early rank can die with SIGABRT ("terminate called without an
    active exception") at exit. After a failure there is no barrier: the peers may be gone.
    """
    global _CONTEXT
    if tdist.is_available() and tdist.is_initialized():
        if wait and tdist.get_world_size() > 1:
            tdist.barrier()
        tdist.destroy_process_group()
    _CONTEXT = None


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out",
              "Timed out", "Socket Timeout")


def peer_failure(exc: BaseException) -> str | None:
    """A one-line description when ``exc`` means another rank died or stopped answering, else None."""
    if not (tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1):
        return None
    text = str(exc)
    if not (isinstance(exc, tdist.DistError) or (isinstance(exc, RuntimeError) and any(
            s in text for s in _PEER_LOST))):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0]  # drop gloo's [file:line]
    return (f"rank {tdist.get_rank()} lost contact with another rank ({first}); "
            "that rank's own message says what went wrong")
