"""Float32 matrix products through oneDNN on CPU, for the big products of a training step.

torch sends a float32 ``mm``/``addmm`` on CPU to MKL's sgemm. On CPUs that MKL does not tune for (AMD's,
where it takes a 256-bit code path) that runs at about half of what the cores can do: on the 2-core AMD
EPYC this project is measured on, a (1120, 256) x (256, 1024) product, the size of a window's input
projection at the book's configuration, runs at ~210 GFLOP/s through ``torch.mm`` and ~470 GFLOP/s
through oneDNN's matmul (``mkldnn::_linear_pointwise``, the op torch's own CPU inductor passes use), with
float32 arithmetic in both. ``python -m benchmarks`` prints both libraries' rate at 2048^3 (there
~210 against ~450 GFLOP/s). ``torch.nn.LSTM`` on CPU already runs on
oneDNN; this module gives deeprnn's own window-sized products the same library: the scratch layers'
input projection (forward and both gradients) and ``W_hh``'s gradient after the backward sweep, and
every model's output layer (for a word-level vocabulary the largest product of the step).

Used only for float32 CPU tensors outside autocast (under bf16 autocast torch already calls oneDNN)
and outside ``torch.compile``. ``DEEPRNN_ONEDNN=0`` turns it off; so does ``torch.backends.mkldnn``'s
``enabled`` flag, and any failure of the op (after one warning), so the result is always torch's.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

_state = {"on": os.environ.get("DEEPRNN_ONEDNN", "1") != "0"}


def _op():
    """``torch.ops.mkldnn._linear_pointwise`` where this torch build has it, else None."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _op()


def enabled() -> bool:
    """Whether float32 CPU products may go to oneDNN in this process."""
    return (_state["on"] and _LINEAR is not None and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def set_enabled(on: bool) -> bool:
    """Turn the oneDNN products on or off (tests compare both); returns the previous setting."""
    previous, _state["on"] = _state["on"], bool(on)
    return previous


# Below this many multiply-adds (M*K*N) a product stays with torch: oneDNN's fixed cost per call (~12 µs
# in the op, ~10 µs more through the autograd function) outweighs its speed, e.g. for an output layer
# over 28 characters for one stream. (4, 256) x (256, 1024), ~1e6, is already 1.6x faster through oneDNN.
MIN_MACS = 1 << 20


def usable(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors may go through oneDNN here and now, sizes aside: float32 CPU
    tensors, outside torch.compile and autocast, with the path on."""
    return (not torch.compiler.is_compiling() and enabled() and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() > 0 for t in tensors))


def _takes(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``a @ b (+ bias)`` goes through oneDNN: 2-D ``a`` (M, K) and ``b`` (K, N) with at least
    MIN_MACS multiply-adds, a bias oneDNN reads as it is meant (None or a dense (N,) vector; a strided,
    0-d or 2-D bias, which torch.addmm broadcasts, stays with torch), and ``usable`` operands."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] * a.shape[1] * b.shape[1] < MIN_MACS:
        return False
    if bias is not None and not (bias.dim() == 1 and bias.shape[0] == b.shape[1] and bias.is_contiguous()):
        return False
    return usable(a, b) if bias is None else usable(a, b, bias)


def _linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``a @ b (+ bias)`` through oneDNN, or None after a failure (which turns the path off)."""
    try:
        return _LINEAR(a, b.t(), bias, "none", [], "")
    except RuntimeError as err:
        _state["on"] = False
        warnings.warn(f"deeprnn: oneDNN float32 products failed ({err}); using torch.mm from now on",
                      RuntimeWarning, stacklevel=3)
        return None


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (M, K) and ``b`` (K, N), either may be a transposed view; no autograd."""
    if _takes(a, b):
        out = _linear(a, b, None)
        if out is not None:
            return out
    return a @ b


class _Product(torch.autograd.Function):
    """``bias + x @ W`` (``W`` (K, N)), or with ``nk`` ``bias + x @ W.T`` (``W`` (N, K), ``F.linear``'s
    layout), with the forward product and both gradient products through oneDNN."""

    @staticmethod
    def forward(ctx, bias, x, W, nk: bool):
        ctx.save_for_backward(x, W)
        ctx.nk = nk
        right = W.t() if nk else W
        out = _linear(x, right, bias)
        if out is None:
            out = torch.addmm(bias, x, right) if bias is not None else x @ right
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, W = ctx.saved_tensors
        need_bias, need_x, need_W, _ = ctx.needs_input_grad
        d_bias = dy.sum(0) if need_bias else None
        d_x = d_W = None
        if need_x:
            d_x = mm(dy, W) if ctx.nk else mm(dy, W.t())
        if need_W:
            d_W = mm(dy.t(), x) if ctx.nk else mm(x.t(), dy)
        return d_bias, d_x, d_W, None


def addmm(bias: torch.Tensor, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``torch.addmm(bias, x, W)`` (bias (N,), x (M, K), W (K, N)), through oneDNN where it applies."""
    if _takes(x, W, bias):
        return _Product.apply(bias, x, W, False)
    return torch.addmm(bias, x, W)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x (..., K), weight (N, K)), through oneDNN where it applies."""
    if x.dim() >= 1:
        rows = x.reshape(-1, x.shape[-1])
        if _takes(rows, weight.t(), bias):
            return _Product.apply(bias, rows, weight, True).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    """``nn.Linear`` (same parameters, hooks and state dict) whose product goes through ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
