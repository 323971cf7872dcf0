"""Cutting a token stream into ``(B, T)`` minibatches (book section 8.3), and sharding them.

Sequential partitioning (``T`` = num_steps, ``B`` = batch_size) drops ``offset`` tokens, cuts the
rest into ``B`` equal streams, one per batch row, and walks them ``T`` tokens at a time, so row ``i``
of batch ``k + 1`` continues row ``i`` of batch ``k`` (the hidden state can be carried over)::

    stream:  o o [a0 a1 a2 a3 a4 a5][b0 b1 b2 b3 b4 b5] .       (offset 2, B = 2, T = 3)
    batch 0: X = [[a0 a1 a2], [b0 b1 b2]]    batch 1: X = [[a3 a4 a5], [b3 b4 b5]]

Random sampling drops ``offset`` tokens, cuts the rest into disjoint windows of ``T`` and deals them
out in a random order, ``B`` per batch. ``Y`` is always ``X`` shifted one token along the stream.

A stream may be stored in any integer dtype (a corpus keeps the smallest that holds its vocabulary);
every batch comes out int64, converted one batch at a time, so the stream is never widened whole.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch

from deeprnn.errors import ConfigError, CorpusError

MODES = ("sequential", "random")
Batch = tuple[torch.Tensor, torch.Tensor]


_STREAM_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_tokens(tokens) -> torch.Tensor:
    """A 1-D tensor of ``tokens`` (tensor, array or list) in its own integer dtype (others: int64)."""
    tokens = torch.as_tensor(tokens)
    if tokens.dtype not in _STREAM_DTYPES:
        tokens = tokens.long()
    return tokens.reshape(-1)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, num_steps: int) -> Batch:
    """``X[i] = tokens[starts[i] : starts[i] + T]`` and ``Y`` one further, both ``(len(starts), T)`` int64."""
    idx = starts[:, None] + torch.arange(num_steps)  # (B, T)
    return tokens[idx].long(), tokens[idx + 1].long()


def seq_data_iter_sequential(tokens, batch_size: int, num_steps: int, *, offset: int) -> Iterator[Batch]:
    """Sequential partitioning after dropping ``offset`` tokens; yields ``(X, Y)``, each ``(B, T)``."""
    tokens = _as_tokens(tokens)
    num_tokens = max(len(tokens) - offset - 1, 0) // batch_size * batch_size
    Xs = tokens[offset : offset + num_tokens].reshape(batch_size, -1)  # (B, L)
    Ys = tokens[offset + 1 : offset + 1 + num_tokens].reshape(batch_size, -1)  # (B, L)
    for i in range(0, Xs.shape[1] // num_steps * num_steps, num_steps):
        yield Xs[:, i : i + num_steps].long(), Ys[:, i : i + num_steps].long()


def seq_data_iter_random(
    tokens, batch_size: int, num_steps: int, *, offset: int, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Random sampling of disjoint windows after dropping ``offset`` tokens, shuffled by ``generator``."""
    tokens = _as_tokens(tokens)[offset:]
    num_subseqs = max(len(tokens) - 1, 0) // num_steps
    starts = torch.randperm(num_subseqs, generator=generator) * num_steps
    for i in range(0, num_subseqs // batch_size * batch_size, batch_size):
        yield _windows(tokens, starts[i : i + batch_size], num_steps)


# --- the book's iterators, call for call -----------------------------------------------------------
def book_seq_data_iter_random(corpus, batch_size: int, num_steps: int) -> Iterator[Batch]:
    """``d2l.seq_data_iter_random`` (section 8.3.2.1): one ``random.randint(0, T - 1)`` for the
    offset, then ``random.shuffle`` of the window starts, both at the first ``next()`` — so with the
    same ``random.seed`` it yields the book's batches."""
    corpus = _as_tokens(corpus)
    corpus = corpus[random.randint(0, num_steps - 1) :]
    num_subseqs = (len(corpus) - 1) // num_steps
    starts = list(range(0, num_subseqs * num_steps, num_steps))
    random.shuffle(starts)
    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        yield _windows(corpus, torch.tensor(starts[i : i + batch_size], dtype=torch.long), num_steps)


def book_seq_data_iter_sequential(corpus, batch_size: int, num_steps: int) -> Iterator[Batch]:
    """``d2l.seq_data_iter_sequential`` (section 8.3.2.2): one ``random.randint(0, T)`` for the
    offset at the first ``next()``, then sequential partitioning."""
    corpus = _as_tokens(corpus)
    offset = random.randint(0, num_steps)
    yield from seq_data_iter_sequential(corpus, batch_size, num_steps, offset=offset)


# --- the training loader ---------------------------------------------------------------------------
def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on ``(seed, epoch)`` only (no collisions like ``seed + epoch``)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class BatchLoader:
    """Epochs of ``(X, Y)`` batches, each ``(batch_size // world_size, num_steps)`` int64.

    Epoch ``e`` draws its offset in ``[0, num_steps)`` (and, for ``random``, its window order) from a
    ``torch.Generator`` seeded from ``(seed, e)`` alone. Every epoch has ``len(self)`` batches (the
    count the least favourable offset allows). ``batch_size`` is global: rank ``r`` of ``world_size``
    gets rows ``[r*B/W, (r+1)*B/W)`` of each global batch. The loader remembers its position: a full
    pass moves on to the next epoch, ``state_dict()`` / ``load_state_dict()`` resume mid-epoch, and
    ``set_epoch(e)`` jumps to the start of epoch ``e``. ``partial_shuffle`` (sequential only) also rotates
    each stream by a shift drawn from the same generator, after everything else it draws (``_streams``).

    Raises :class:`ConfigError` for bad sizes and :class:`CorpusError` when the tokens cannot fill one
    batch at every offset (at least ``batch_size * num_steps + num_steps`` tokens are needed).
    """

    def __init__(self, tokens, batch_size: int, num_steps: int, mode: str = "sequential",
                 seed: int = 0, rank: int = 0, world_size: int = 1, *, partial_shuffle: bool = False,
                 what: str = "corpus", sizes: str = ""):
        # what, sizes: how a too-short stream is named in the error ("the training split", " (the corpus has N)")
        for field, value in (("batch_size", batch_size), ("num_steps", num_steps), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{field} must be an integer >= 1, got {value!r}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if partial_shuffle and mode != "sequential":
            raise ConfigError(f"partial_shuffle needs mode='sequential' (random sampling already shuffles its "
                              f"windows), got {mode!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if batch_size % world_size:
            raise ConfigError(f"batch_size must be divisible by world_size={world_size}, got {batch_size}")
        self.tokens = _as_tokens(tokens)
        self.batch_size, self.num_steps, self.mode = batch_size, num_steps, mode
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.partial_shuffle = partial_shuffle
        minimum = batch_size * num_steps + num_steps
        if len(self.tokens) < minimum:
            raise CorpusError(
                f"{what} has {len(self.tokens)} tokens{sizes} but batch_size={batch_size} and num_steps={num_steps} "
                f"need at least {minimum} (batch_size*num_steps + num_steps); use more text or smaller sizes"
            )
        # Batches at the worst offset, num_steps - 1; both modes reduce to the same count.
        usable = len(self.tokens) - num_steps
        self._num_batches = usable // batch_size // num_steps
        local = batch_size // world_size
        self._rows = slice(rank * local, (rank + 1) * local)
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = int(epoch), 0

    def state_dict(self) -> dict:
        """``{"epoch", "batch"}``: the epoch and how many of its batches were already handed out."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= len(self):
            raise ConfigError(f"batch must be in [0, {len(self)}] for this loader, got {batch}")
        self.epoch, self.batch = epoch, batch

    def _epoch_batches(self, epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        offset = int(torch.randint(0, self.num_steps, (1,), generator=g))
        B, T = self.batch_size, self.num_steps
        if self.mode == "sequential":
            Xs, Ys = self._streams(offset, g)
            for k in range(self.batch, len(self)):
                yield Xs[:, k * T : (k + 1) * T].long(), Ys[:, k * T : (k + 1) * T].long()
        else:
            num_subseqs = (len(self.tokens) - offset - 1) // T
            starts = torch.randperm(num_subseqs, generator=g) * T + offset
            for k in range(self.batch, len(self)):
                yield _windows(self.tokens, starts[k * B : (k + 1) * B][self._rows], T)

    def _streams(self, offset: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the epoch's ``B`` streams after dropping ``offset`` tokens: ``(X, Y)``, each
        ``(B/W, L)``. With ``partial_shuffle`` (Press 2019) stream ``i`` is rotated left by a shift drawn
        from ``g`` in ``[0, L)``: it reads the same stretch of text, starting at a different place each epoch
        and wrapping round once, so the streams that share a batch change from epoch to epoch. ``X`` and
        ``Y`` rotate together, so every target is still the token after its input."""
        B = self.batch_size
        num_tokens = (len(self.tokens) - offset - 1) // B * B
        Xs = self.tokens[offset : offset + num_tokens].reshape(B, -1)  # (B, L)
        Ys = self.tokens[offset + 1 : offset + 1 + num_tokens].reshape(B, -1)
        if self.partial_shuffle:
            L = Xs.shape[1]
            shifts = torch.randint(0, L, (B, 1), generator=g)  # drawn for all B rows: the same on every rank
            cols = (torch.arange(L) + shifts) % L
            Xs, Ys = Xs.gather(1, cols), Ys.gather(1, cols)
        return Xs[self._rows], Ys[self._rows]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        for X, Y in self._epoch_batches(epoch):
            self.batch += 1  # counted before the caller trains on it: a checkpoint then resumes after it
            yield X, Y
        if self.epoch == epoch:
            self.epoch, self.batch = epoch + 1, 0
