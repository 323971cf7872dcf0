"""AWD-LSTM regularisers (Merity, Keskar & Socher 2018, "Regularizing and Optimizing LSTM Language Models").

Every function here acts in training only; with ``training=False`` it is the identity (or zero), so
evaluation stays deterministic. Shapes are time-major like the models: ``(T, B, F)``.

- :func:`locked_dropout`: variational dropout, one mask per sequence ``(1, B, F)`` shared by all T steps.
- :func:`token_keep_scale`: embedding dropout, whole tokens dropped (AWD's ``embedded_dropout``): one
  keep/drop draw per vocabulary entry and window, so a dropped token is zero wherever it occurs.
- :func:`drop_connect`: weight-drop, element-wise dropout on a recurrent matrix, one mask per window.
- :func:`activation_penalty`: AR ``α·mean(h²)`` + TAR ``β·mean((h_t − h_{t−1})²)`` on the top layer
  (both before output dropout; AWD-LSTM takes AR after it).
- :class:`VariableLengthLoader`: BPTT windows of random length (``N(T, 5)`` with probability 0.95,
  else ``N(T/2, 5)``), drawn from a generator seeded by ``(seed, epoch)`` like :class:`BatchLoader`,
  so a resumed run cuts the same windows; the caller scales the learning rate by ``len / T``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from deeprnn.batching import BatchLoader, _epoch_seed
from deeprnn.errors import ConfigError


def keep_mask(shape, p: float, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A dropout mask of ``shape``: each entry ``1/(1-p)`` with probability ``1 - p``, else 0.

    One uniform draw per entry, compared with ``p``: on the CPU ``bernoulli_`` is several times slower,
    which mattered for weight-drop (three 2048x512 masks per step in the Time Machine recipes);
    ``benchmarks/bench_masks.py`` times such a step both ways.
    """
    return torch.rand(shape, device=device).ge_(p).to(dtype).div_(1 - p)  # 0/1 in place: no bool temporary


def locked_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``x`` (T, B, F) with one dropout mask per sequence (1, B, F), the same at every step."""
    if not training or p == 0:
        return x
    return x * keep_mask(x[:1].shape, p, device=x.device, dtype=x.dtype)  # mask (1, B, F)


def dropout(x: torch.Tensor, p: float, training: bool, locked: bool) -> torch.Tensor:
    """Locked (one mask per sequence) or ordinary (a mask per element) dropout of ``x`` (T, B, F)."""
    if not training or p == 0:
        return x
    if locked:
        return locked_dropout(x, p, training)
    return F.dropout(x, p, training)


def token_keep_scale(tokens: torch.Tensor, vocab_size: int, p: float, training: bool,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Embedding dropout as a multiplier ``(T, B, 1)`` for the rows of ``tokens`` (T, B).

    Each vocabulary entry is kept with probability ``1 - p`` (scaled by ``1/(1-p)``) or dropped for
    the whole window and batch, which equals AWD's masking of the embedding matrix's rows. ``None``
    when there is nothing to do (eval or ``p == 0``).
    """
    if not training or p == 0:
        return None
    keep = keep_mask(vocab_size, p, device=tokens.device, dtype=dtype)
    return keep[tokens].unsqueeze(-1)  # (T, B, 1)


def one_hot_dropout_scale(tokens: torch.Tensor, vocab_size: int, p: float, training: bool, locked: bool,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Input dropout of a one-hot input as a multiplier ``(T, B, 1)`` on its single non-zero entry.

    Dropping the zeros of a one-hot vector changes nothing, so ordinary dropout is one draw per
    (step, sequence); locked dropout draws a (B, V) mask per window and looks up each token's entry.
    """
    if not training or p == 0:
        return None
    T, B = tokens.shape
    if not locked:
        return keep_mask((T, B, 1), p, device=tokens.device, dtype=dtype)
    mask = keep_mask((B, vocab_size), p, device=tokens.device, dtype=dtype)
    return mask.gather(1, tokens.T).T.unsqueeze(-1)  # (B, T) -> (T, B, 1)


def drop_connect(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Weight-drop: element-wise dropout of a weight matrix (one mask per call, i.e. per window)."""
    if not training or p == 0:
        return weight
    return weight * keep_mask(weight.shape, p, device=weight.device, dtype=weight.dtype)


def activation_penalty(h: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """AR + TAR of the top layer's outputs ``h`` (T, B, H), taken in float32 or wider.

    ``alpha * mean(h²) + beta * mean((h[1:] - h[:-1])²)``: the means run over every element; TAR
    compares steps inside the window (a window of one step has no TAR term). Training passes the outputs
    *before* output dropout to both terms. AWD-LSTM (Merity et al. 2018) takes AR on the dropped outputs,
    ``mean((m ⊙ h)²)`` with the mask ``m`` scaled by ``1 / (1 - p)`` (``p`` the output dropout), which in
    expectation is this one's divided by ``1 - p``: ``alpha`` here is AWD's ``alpha / (1 - p)``. TAR is the
    same in both.
    """
    h = h.float() if h.dtype in (torch.bfloat16, torch.float16) else h
    out = h.new_zeros(())
    if alpha:
        out = out + alpha * h.pow(2).mean()
    if beta and h.shape[0] > 1:
        out = out + beta * (h[1:] - h[:-1]).pow(2).mean()
    return out


# Variable-length BPTT (AWD-LSTM section 4.1).
FULL_WINDOW_PROB = 0.95  # else the mean length is halved
WINDOW_STD = 5.0  # standard deviation of the window length, in tokens
MIN_WINDOW = 5  # never shorter (or num_steps, if that is smaller)
MAX_EXTRA = 40  # never longer than num_steps + MAX_EXTRA (AWD's max_seq_len_delta)


class VariableLengthLoader(BatchLoader):
    """Sequential batches whose window length varies: ``(B, len_k)`` with ``len_k`` drawn per batch.

    Epoch ``e`` draws its start offset and then its lengths from one ``torch.Generator`` seeded from
    ``(seed, e)``, so the windows of an epoch are fixed before it starts and a resumed run
    (``load_state_dict({"epoch", "batch"})``) cuts the same ones. ``len(self)`` is the nominal count of
    ``num_steps`` windows (what schedules use); an epoch ends when its streams run out. Only
    ``mode="sequential"``: random windows have no state to carry and gain nothing from this.
    """

    def __init__(self, tokens, batch_size: int, num_steps: int, mode: str = "sequential",
                 seed: int = 0, rank: int = 0, world_size: int = 1, **options):
        if mode != "sequential":
            raise ConfigError(f"variable_bptt needs sampling='sequential', got {mode!r}")
        super().__init__(tokens, batch_size, num_steps, mode, seed, rank, world_size, **options)

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch < 0:
            raise ConfigError(f"batch must be >= 0, got {batch}")
        self.epoch, self.batch = epoch, batch

    def window_lengths(self, epoch: int) -> tuple[int, list[int]]:
        """The offset and the window lengths of ``epoch`` (they cover its streams; the last may be cut)."""
        offset, lengths, _ = self._draw(epoch)
        return offset, lengths

    def _draw(self, epoch: int) -> tuple[int, list[int], torch.Generator]:
        """``window_lengths`` and the generator after its draws (partial_shuffle's shifts come next)."""
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
        offset = int(torch.randint(0, self.num_steps, (1,), generator=g))
        stream = (len(self.tokens) - offset - 1) // self.batch_size
        T, lo = self.num_steps, min(MIN_WINDOW, self.num_steps)
        lengths, pos = [], 0
        while pos < stream:
            mean = T if float(torch.rand((), generator=g)) < FULL_WINDOW_PROB else T / 2
            n = int(mean + WINDOW_STD * float(torch.randn((), generator=g)))
            n = min(max(n, lo), T + MAX_EXTRA, stream - pos)
            lengths.append(n)
            pos += n
        return offset, lengths, g

    def _epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        offset, lengths, g = self._draw(epoch)
        Xs, Ys = self._streams(offset, g)  # (B/W, L); partial_shuffle's shifts come after the lengths
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        for k in range(self.batch, len(lengths)):
            a, b = starts[k], starts[k + 1]
            yield Xs[:, a:b].long(), Ys[:, a:b].long()  # the stream may be compact; batches are int64
