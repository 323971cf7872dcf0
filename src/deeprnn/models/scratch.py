"""Deep RNNs from scratch: eq. (9.3.1) with explicit parameters for every layer.

    H_t^(l) = φ(H_t^(l-1) W_xh^(l) + H_{t-1}^(l) W_hh^(l) + b_h^(l)),   H_t^(0) = X_t

Every layer is recurrent (the ``H_{t-1}^(l) W_hh^(l)`` term is present for every l, unlike the seed
note's exercise-1 answer). Each layer ``layers.{l}`` holds, with the gates of a cell stacked along the
last axis in torch.nn order (LSTM i, f, g, o; GRU r, z, n) so weights copy to ``torch.nn`` by a transpose:

    W_xh  (in, G*H)    W_hh  (H, G*H)    b_h  (G*H,)    b_hn  (H,)  torch-variant GRU only

Speed: the input projection ``H^(l-1) W_xh + b_h`` of the whole window is one matrix product before
the time loop (for a one-hot first layer, a row lookup of ``W_xh``, which equals ``one_hot(X) @ W_xh``
and skips the multiply by zeros), and the loop holds one recurrent product per step for all gates of
the layer. The loops of the RNN, LSTM and torch-variant GRU layers are custom autograd functions
(``_RNNWindow``, ``_LSTMWindow``, ``_GRUWindow``) with a hand-written backward sweep, so autograd
records one node per layer and window instead of ~10 per step, and ``W_hh``'s gradient is one product
after the sweep. On CPU the time loops of those three functions run in a small C++ extension
(``native``: per step one product and one fused pointwise pass) when it builds, else in the Python
loops here, which stay the reference and the GPU path. Each layer keeps ``forward_reference``, the plain
autograd loop, and the tests hold all three equal (and equal to torch.nn). The book-variant GRU runs on
plain autograd.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from deeprnn.models import native, onednn
from deeprnn.models.base import LanguageModel, State, init_block_, stack_layer_states, torch_bias_
from deeprnn.models.config import ModelConfig
from deeprnn.regularize import drop_connect


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place. On a CPU (where these Python loops are the fallback for the C++ kernels) as
    2σ(2x) − 1: torch.tanh on CPU float tensors of a step's size measures 5-10x slower than sigmoid in this
    torch build (and it goes multi-threaded). That form cancels near 0 in float32 (an absolute error of about
    an ulp of 1; the C++ kernels switch to a series there); elsewhere torch's own tanh."""
    if x.device.type != "cpu":
        return x.tanh_()
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


def _gemm_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype the recurrent products run in under ``torch.autocast`` (e.g. bfloat16), else None.

    The window kernels then do every matrix product with low-precision operands (fp32 accumulation
    inside the GEMM, as autocast's own ``mm`` does) while the state, the gates and the pointwise
    work stay in the parameters' dtype (float32): the products are ~4x faster in bf16 on a CPU with
    AVX-512 BF16, and the recurrence does not accumulate bf16 rounding from step to step.
    """
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _no_autocast(x: torch.Tensor):
    """Autocast off inside a window kernel: it chooses every operand's dtype itself."""
    dev = x.device.type
    return torch.autocast(dev, enabled=False) if dev in ("cpu", "cuda") else contextlib.nullcontext()


def _product_operands(W_hh: torch.Tensor, hs: torch.Tensor, h0: torch.Tensor, lp, width: int):
    """``(W, hl, prod)`` for a window kernel's recurrent products: with ``lp`` None, ``W_hh`` and ``hs``
    themselves (``prod`` None); else low-precision copies of ``W_hh`` and of every ``h`` (``hl[0]`` is
    ``h0``) and a ``(B, width)`` buffer for one step's product."""
    if lp is None:
        return W_hh, hs, None
    hl = hs.new_empty(hs.shape, dtype=lp)
    hl[0] = h0
    return W_hh.to(lp), hl, hl.new_empty(hs.shape[1], width)


def _recurrent_weight_grad(hl: torch.Tensor, d_pre: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W_hh``'s gradient after a backward sweep, one product: ``h_{t-1}`` of every step (``hl[:-1]``,
    (T, B, H)) transposed times the pre-activations' gradient (T, B, G*H), in ``dtype``."""
    H, G = hl.shape[-1], d_pre.shape[-1]
    return onednn.mm(hl[:-1].reshape(-1, H).T, d_pre.reshape(-1, G)).to(dtype)


class _ScratchLayer(nn.Module):
    """One recurrent layer's parameters and its whole-window input projection."""

    num_gates = 1

    def __init__(self, input_size: int, num_hiddens: int):
        super().__init__()
        G, H = self.num_gates, num_hiddens
        self.num_hiddens = H
        self.W_xh = nn.Parameter(torch.empty(input_size, G * H))
        self.W_hh = nn.Parameter(torch.empty(H, G * H))
        self.b_h = nn.Parameter(torch.empty(G * H))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(T, B, in) -> (T, B, G*H): ``x W_xh + b_h`` for every step in one product."""
        T, B, _ = x.shape
        return onednn.addmm(self.b_h, x.reshape(T * B, -1), self.W_xh).view(T, B, -1)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, B) indices -> (T, B, G*H): ``one_hot(tokens) W_xh + b_h`` as a row lookup.

        The bias goes into the (vocab, G*H) table before the lookup, not into the (T, B, G*H) result: the
        same sums, and the bias's gradient sums vocab rows instead of T*B (~5% of a book-size LSTM step).
        """
        return F.embedding(tokens, self.W_xh + self.b_h)

    def reset_parameters(self, scheme: str, forget_bias: float = 0.0) -> None:
        H = self.num_hiddens
        for g in range(self.num_gates):
            block = slice(g * H, (g + 1) * H)
            init_block_(self.W_xh[:, block], scheme, recurrent=False, num_hiddens=H)
            init_block_(self.W_hh[:, block], scheme, recurrent=True, num_hiddens=H)
        with torch.no_grad():
            self.b_h.zero_()
            if scheme == "torch":
                # torch.nn draws b_ih and b_hh independently; b_h stands for their sum.
                torch_bias_(self.b_h, H)
                extra = torch.empty_like(self.b_h)
                torch_bias_(extra, H)
                self.b_h.add_(extra * self._summed_bias_mask())
        self._reset_extra(scheme, forget_bias)

    def _summed_bias_mask(self) -> torch.Tensor:
        return torch.ones_like(self.b_h)

    def _reset_extra(self, scheme: str, forget_bias: float) -> None:
        pass


def _rnn_forward(xproj, h0, W_hh, relu: bool, lp):
    """The Python loop of ``_RNNWindow.forward`` -> ``[W, hs, hl]`` (as ``native``'s ``rnn_forward``)."""
    T, B, H = xproj.shape
    hs = xproj.new_empty(T + 1, B, H, dtype=W_hh.dtype)
    hs[0] = h0
    W, hl, prod = _product_operands(W_hh, hs, h0, lp, H)
    for t in range(T):
        if lp is None:
            pre = torch.addmm(xproj[t], hs[t], W_hh, out=hs[t + 1])
        else:
            pre = torch.add(xproj[t], torch.mm(hl[t], W, out=prod), out=hs[t + 1])
        if relu:
            pre.relu_()
        else:
            _tanh_(pre)
        if lp is not None:
            hl[t + 1].copy_(pre)
    return [W, hs, hl]


def _rnn_backward(W, hs, hl, d_out, d_hT, relu: bool, x_in_lp: bool = False):
    """The Python sweep of ``_RNNWindow.backward`` -> ``[dpre, dpl, dh]``: the pre-activations' gradient,
    its copy in the products' dtype (``dpre`` itself without one), and ``h0``'s gradient. ``x_in_lp``: the
    input projection came in that dtype, so its gradient is returned in it (``dpl``), as autograd would
    round it anyway."""
    lp = hl.dtype if hl.dtype != hs.dtype else None
    T = d_out.shape[0]
    out = hs[1:]
    d_out = d_out.to(out.dtype)
    D = (out > 0).to(out.dtype) if relu else 1 - out * out  # φ' from φ's output
    dpre = torch.empty_like(out)
    dpl = dpre if lp is None else torch.empty_like(dpre, dtype=lp)  # dpre for the products
    W_T = W.T
    dh = d_hT.to(out.dtype) + d_out[T - 1]
    for t in range(T - 1, -1, -1):
        torch.mul(dh, D[t], out=dpre[t])
        if lp is not None:
            dpl[t].copy_(dpre[t])
        if lp is None:
            dh = torch.addmm(d_out[t - 1], dpre[t], W_T) if t > 0 else dpre[0] @ W_T
        else:
            dh = (dpl[t] @ W_T).to(out.dtype)
            if t > 0:
                dh += d_out[t - 1]
    return [dpl if x_in_lp and lp is not None else dpre, dpl, dh]


class _RNNWindow(torch.autograd.Function):
    """One tanh/ReLU RNN layer over a whole window, with a hand-written backward sweep.

    Going back, each step is one pointwise product and one recurrent product; ``W_hh``'s gradient is
    one (H, T*B) x (T*B, H) product after the sweep. ``lp`` (a dtype or None): run the products with
    operands in that dtype (see ``_gemm_dtype``); the outputs then come in ``lp`` too.
    """

    @staticmethod
    def forward(ctx, xproj, h0, W_hh, relu: bool, lp=None):
        ctx.native, ctx.relu = native.kernels_for(xproj, W_hh, lp), relu
        ctx.x_in_lp = lp is not None and xproj.dtype == lp
        with _no_autocast(xproj):
            kernel = _rnn_forward if ctx.native is None else ctx.native.rnn_forward
            W, hs, hl = kernel(xproj, h0, W_hh, relu, lp)
        ctx.save_for_backward(W, hs, hl)
        return hl[1:], hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT):
        W, hs, hl = ctx.saved_tensors
        with _no_autocast(hs):
            kernel = _rnn_backward if ctx.native is None else ctx.native.rnn_backward
            dpre, dpl, dh = kernel(W, hs, hl, d_out, d_hT, ctx.relu, ctx.x_in_lp)
            d_W_hh = None
            if ctx.needs_input_grad[2]:
                d_W_hh = _recurrent_weight_grad(hl, dpl, hs.dtype)  # (H, H)
        return dpre, dh, d_W_hh, None, None


class RNNLayer(_ScratchLayer):
    """Eq. (9.3.1) with φ = tanh or ReLU."""

    def __init__(self, input_size: int, num_hiddens: int, nonlinearity: str = "tanh"):
        super().__init__(input_size, num_hiddens)
        self.nonlinearity = nonlinearity

    def forward(self, xproj: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xproj (T, B, H), h (B, H) -> (outputs (T, B, H), final h (B, H))."""
        return _RNNWindow.apply(xproj, h, self.W_hh, self.nonlinearity == "relu", _gemm_dtype(xproj))

    def forward_reference(self, xproj, h):
        """The same function with autograd through every step; slower, kept as the plain statement."""
        act = torch.tanh if self.nonlinearity == "tanh" else torch.relu
        outputs = []
        for x in xproj.unbind(0):
            h = act(torch.addmm(x, h, self.W_hh))
            outputs.append(h)
        return torch.stack(outputs), h


def _lstm_forward(xproj, h0, c0, W_hh, lp, zc=None, zh=None):
    """The Python loop of ``_LSTMWindow.forward`` -> ``[W, acts, hs, cs, tcs, hl]`` (as ``native``'s).
    ``zc``, ``zh``: zoneout masks (T, B, H), both or neither: ``c = zc c_prev + (1 - zc) c̃``,
    ``h = zh h_prev + (1 - zh) h̃`` with ``h̃ = o tanh(c̃)``; ``tcs`` then holds tanh(c̃)."""
    T, B, G = xproj.shape  # G = 4H, gate blocks i, f, g, o
    H = G // 4
    acts = xproj.new_empty(T, B, G, dtype=W_hh.dtype)  # σ(i), σ(f), tanh(g), σ(o) per step
    hs = acts.new_empty(T + 1, B, H)
    cs = acts.new_empty(T + 1, B, H)
    tcs = acts.new_empty(T, B, H)  # tanh(c_t)
    hs[0], cs[0] = h0, c0
    W, hl, prod = _product_operands(W_hh, hs, h0, lp, G)
    for t in range(T):
        a = acts[t]
        if lp is None:
            torch.addmm(xproj[t], hs[t], W_hh, out=a)  # pre-activations (B, 4H)
        else:
            torch.add(xproj[t], torch.mm(hl[t], W, out=prod), out=a)
        i, f, g, o = a.chunk(4, 1)
        g.mul_(2)  # with the sigmoid below and the affine map after it: tanh(g) = 2σ(2g) − 1
        a.sigmoid_()
        g.mul_(2).sub_(1)
        torch.mul(f, cs[t], out=cs[t + 1]).addcmul_(i, g)
        tc = torch.mul(cs[t + 1], 2, out=tcs[t]).sigmoid_().mul_(2).sub_(1)  # tanh(c_t)
        torch.mul(o, tc, out=hs[t + 1])
        if zc is not None:  # written so that a mask of 1 keeps the previous value exactly
            cs[t + 1].mul_(1 - zc[t]).addcmul_(zc[t], cs[t])
            hs[t + 1].mul_(1 - zh[t]).addcmul_(zh[t], hs[t])
        if lp is not None:
            hl[t + 1].copy_(hs[t + 1])
    return [W, acts, hs, cs, tcs, hl]


def _lstm_backward(W, acts, hs, cs, tcs, hl, d_out, d_hT, d_cT, x_in_lp: bool = False, zc=None, zh=None):
    """The Python sweep of ``_LSTMWindow.backward`` -> ``[dpre, dpl, dh, dc]``: the pre-activations'
    gradient, its copy in the products' dtype (``dpre`` itself without one), and ``h0``'s and ``c0``'s.
    ``x_in_lp`` as in ``_rnn_backward``; ``zc``, ``zh``: the forward's zoneout masks."""
    lp = hl.dtype if hl.dtype != hs.dtype else None
    T, B, G = acts.shape
    H = G // 4
    d_out = d_out.to(acts.dtype)
    i, f, g, o = acts.chunk(4, 2)  # (T, B, H) each
    # Everything that does not depend on the incoming gradient, for all steps at once:
    # dpre = [dc·g·σ'(i), dc·c_{t-1}·σ'(f), dc·i·tanh'(g), dh·tanh(c)·σ'(o)]  (σ' = s(1-s))
    M = torch.cat(
        [g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g), tcs * o * (1 - o)], dim=2
    ).view(T, B, 4, H)
    A = o * (1 - tcs * tcs)  # dc_t += dh_t · A_t
    dpre = torch.empty_like(acts)  # (T, B, 4H): gradient of the pre-activations
    dpl = dpre if lp is None else torch.empty_like(dpre, dtype=lp)  # dpre for the products
    W_T = W.T
    dh, dc = d_hT.to(acts.dtype) + d_out[T - 1], d_cT.to(acts.dtype)
    dz = carry = None  # with zoneout: the gradients of h and c that skip a step
    for t in range(T - 1, -1, -1):
        if zc is not None:
            if dz is not None:
                dh = dh + dz
            dz = dh * zh[t]
            dh = dh * (1 - zh[t])
            carry = dc * zc[t]
            dc = dc * (1 - zc[t])
        dc = torch.addcmul(dc, dh, A[t])
        dp = dpre[t].view(B, 4, H)
        torch.mul(dc.unsqueeze(1), M[t, :, :3], out=dp[:, :3])
        torch.mul(dh, M[t, :, 3], out=dp[:, 3])
        dc = dc * f[t] if carry is None else dc * f[t] + carry
        if lp is not None:
            dpl[t].copy_(dpre[t])
            dh = (dpl[t] @ W_T).to(acts.dtype)
            if t > 0:
                dh += d_out[t - 1]
        elif t > 0:
            dh = torch.addmm(d_out[t - 1], dpre[t], W_T)
        else:
            dh = dpre[0] @ W_T
    if dz is not None:
        dh = dh + dz
    return [dpl if x_in_lp and lp is not None else dpre, dpl, dh, dc]


class _LSTMWindow(torch.autograd.Function):
    """One LSTM layer over a whole window, with a hand-written backward sweep.

    Autograd through a Python time loop records ~10 small nodes per step; here the forward loop runs
    without a graph, and the backward loop does one product and four pointwise ops per step. The
    recurrent weight's gradient is one (H, T*B) x (T*B, 4H) product after the sweep, and the gradient
    of the input projection is the stacked gate gradients, so ``W_xh``/``b_h`` are handled by autograd
    outside. Saved for backward: the activations (T, B, 4H), c and h (T+1, B, H), tanh(c) (T, B, H).
    ``lp`` (a dtype or None): run the products with operands in that dtype (see ``_gemm_dtype``); the
    outputs then come in ``lp`` too, the final state in W_hh's dtype. ``zc``, ``zh``: zoneout masks (see
    ``_lstm_forward``), saved for the backward sweep too; they get no gradient.
    """

    @staticmethod
    def forward(ctx, xproj, h0, c0, W_hh, lp=None, zc=None, zh=None):
        ctx.native = native.kernels_for(xproj, W_hh, lp)
        ctx.x_in_lp = lp is not None and xproj.dtype == lp
        with _no_autocast(xproj):
            kernel = _lstm_forward if ctx.native is None else ctx.native.lstm_forward
            W, acts, hs, cs, tcs, hl = kernel(xproj, h0, c0, W_hh, lp, zc, zh)
        ctx.save_for_backward(W, acts, hs, cs, tcs, hl, zc, zh)
        return hl[1:], hs[-1].clone(), cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):
        W, acts, hs, cs, tcs, hl, zc, zh = ctx.saved_tensors
        with _no_autocast(acts):
            kernel = _lstm_backward if ctx.native is None else ctx.native.lstm_backward
            dpre, dpl, dh, dc = kernel(W, acts, hs, cs, tcs, hl, d_out, d_hT, d_cT, ctx.x_in_lp, zc, zh)
            d_W_hh = None
            if ctx.needs_input_grad[3]:
                d_W_hh = _recurrent_weight_grad(hl, dpl, acts.dtype)  # (H, 4H)
        return dpre, dh, dc, d_W_hh, None, None, None


class LSTMLayer(_ScratchLayer):
    """LSTM (d2l 9.2 / torch.nn.LSTM), gates i, f, g, o."""

    num_gates = 4

    def forward(self, xproj, state, zoneout=None):
        """xproj (T, B, 4H), state (h, c) each (B, H) -> (outputs (T, B, H), (h, c)).
        ``zoneout``: None, or masks ``(zc, zh)`` each (T, B, H) in the state's dtype (``zoneout_masks``)."""
        h0, c0 = state
        zc, zh = (None, None) if zoneout is None else zoneout
        outputs, h, c = _LSTMWindow.apply(xproj, h0, c0, self.W_hh, _gemm_dtype(xproj), zc, zh)
        return outputs, (h, c)

    def forward_reference(self, xproj, state, zoneout=None):
        """The same function with autograd through every step; slower, kept as the plain statement."""
        h, c = state
        H = self.num_hiddens
        outputs = []
        for t, x in enumerate(xproj.unbind(0)):
            gates = torch.addmm(x, h, self.W_hh)  # (B, 4H)
            i, f, _, o = gates.sigmoid().chunk(4, 1)
            g = gates[:, 2 * H : 3 * H].tanh()
            c_new = torch.addcmul(f * c, i, g)
            h_new = o * c_new.tanh()
            if zoneout is not None:  # keep the previous value where the mask says so
                c_new = zoneout[0][t] * c + (1 - zoneout[0][t]) * c_new
                h_new = zoneout[1][t] * h + (1 - zoneout[1][t]) * h_new
            h, c = h_new, c_new
            outputs.append(h)
        return torch.stack(outputs), (h, c)

    def _reset_extra(self, scheme, forget_bias):
        if forget_bias:
            H = self.num_hiddens
            with torch.no_grad():
                self.b_h[H : 2 * H] += float(forget_bias)


def _gru_forward(xproj, h0, W_hh, b_hn, lp):
    """The Python loop of ``_GRUWindow.forward`` -> ``[W, acts, ghn, hs, hl]`` (as ``native``'s)."""
    T, B, G = xproj.shape  # G = 3H, gate blocks r, z, n
    H = G // 3
    acts = xproj.new_empty(T, B, G, dtype=W_hh.dtype)  # r, z, n per step
    ghn = acts.new_empty(T, B, H)  # h W_hn + b_hn, which r multiplies
    hs = acts.new_empty(T + 1, B, H)
    hs[0] = h0
    W, hl, prod = _product_operands(W_hh, hs, h0, lp, G)
    if lp is None:
        W_rz, W_n = W_hh[:, : 2 * H], W_hh[:, 2 * H :]
    for t in range(T):
        a, x, h = acts[t], xproj[t], hs[t]
        rz, n = a[:, : 2 * H], a[:, 2 * H :]
        if lp is None:
            torch.addmm(x[:, : 2 * H], h, W_rz, out=rz).sigmoid_()
            torch.addmm(b_hn, h, W_n, out=ghn[t])
        else:  # one product for all three gates
            torch.mm(hl[t], W, out=prod)
            torch.add(x[:, : 2 * H], prod[:, : 2 * H], out=rz).sigmoid_()
            torch.add(b_hn, prod[:, 2 * H :], out=ghn[t])
        _tanh_(torch.addcmul(x[:, 2 * H :], a[:, :H], ghn[t], out=n))
        torch.addcmul(n, a[:, H : 2 * H], h - n, out=hs[t + 1])  # (1 - z) n + z h
        if lp is not None:
            hl[t + 1].copy_(hs[t + 1])
    return [W, acts, ghn, hs, hl]


def _gru_backward(W, acts, ghn, hs, hl, d_out, d_hT, x_in_lp: bool = False):
    """The Python sweep of ``_GRUWindow.backward`` -> ``[d_x, d_g, d_b_hn, dh]``: the gradient of the
    input projection (T, B, 3H; ``x_in_lp`` as in ``_rnn_backward``), of the recurrent product
    ``[h W_hr, h W_hz, h W_hn + b_hn]`` in the products' dtype, of ``b_hn``, and of ``h0``."""
    lp = hl.dtype if hl.dtype != hs.dtype else None
    T, B, G = acts.shape
    H = G // 3
    d_out = d_out.to(acts.dtype)
    r, z, n = acts.chunk(3, 2)  # (T, B, H) each
    # Factors that do not depend on the incoming gradient, for all steps at once:
    P = (1 - z) * (1 - n * n)  # dpre_n = dh · P
    Q = (hs[:-1] - n) * z * (1 - z)  # dpre_z = dh · Q
    R = ghn * r * (1 - r)  # dpre_r = dpre_n · R
    d_n = torch.empty_like(ghn)  # gradient of n's pre-activation (= of x_n)
    d_gh = torch.empty_like(acts)  # gradient of [h W_hr, h W_hz, h W_hn + b_hn]
    d_gl = d_gh if lp is None else torch.empty_like(d_gh, dtype=lp)  # d_gh for the products
    W_T = W.T
    dh = d_hT.to(acts.dtype) + d_out[T - 1]
    for t in range(T - 1, -1, -1):
        dg = d_gh[t]
        torch.mul(dh, P[t], out=d_n[t])
        torch.mul(dh, Q[t], out=dg[:, H : 2 * H])
        torch.mul(d_n[t], R[t], out=dg[:, :H])
        torch.mul(d_n[t], r[t], out=dg[:, 2 * H :])
        direct = torch.addcmul(d_out[t - 1], dh, z[t]) if t > 0 else dh * z[t]
        if lp is None:
            dh = torch.addmm(direct, dg, W_T)
        else:
            d_gl[t].copy_(dg)
            dh = direct.add_(d_gl[t] @ W_T)
    d_x = torch.cat([d_gh[..., : 2 * H], d_n], dim=2)  # (T, B, 3H)
    if x_in_lp and lp is not None:
        d_x = d_x.to(lp)
    return [d_x, d_gl, d_gh[..., 2 * H :].sum((0, 1)), dh]


class _GRUWindow(torch.autograd.Function):
    """One torch-variant GRU layer over a whole window, with a hand-written backward sweep.

    Same idea as ``_LSTMWindow``: no graph in the forward loop, one product and a few pointwise ops
    per step going back, ``W_hh``'s gradient as one product after the sweep. ``lp`` (a dtype or
    None): run the products with operands in that dtype (see ``_gemm_dtype``); the outputs then come
    in ``lp`` too.
    """

    @staticmethod
    def forward(ctx, xproj, h0, W_hh, b_hn, lp=None):
        ctx.native = native.kernels_for(xproj, W_hh, lp)
        ctx.x_in_lp = lp is not None and xproj.dtype == lp
        with _no_autocast(xproj):
            kernel = _gru_forward if ctx.native is None else ctx.native.gru_forward
            W, acts, ghn, hs, hl = kernel(xproj, h0, W_hh, b_hn, lp)
        ctx.save_for_backward(W, acts, ghn, hs, hl)
        return hl[1:], hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT):
        W, acts, ghn, hs, hl = ctx.saved_tensors
        with _no_autocast(acts):
            kernel = _gru_backward if ctx.native is None else ctx.native.gru_backward
            d_x, d_g, d_b_hn, dh = kernel(W, acts, ghn, hs, hl, d_out, d_hT, ctx.x_in_lp)
            d_W_hh = None
            if ctx.needs_input_grad[2]:
                d_W_hh = _recurrent_weight_grad(hl, d_g, acts.dtype)  # (H, 3H)
        return d_x, dh, d_W_hh, d_b_hn if ctx.needs_input_grad[3] else None, None


class GRULayer(_ScratchLayer):
    """GRU as torch.nn.GRU computes it: n = tanh(x W_in + b_in + r ⊙ (h W_hn + b_hn)).

    ``b_h`` holds ``b_ir + b_hr, b_iz + b_hz, b_in``; ``b_hn`` stays separate because r multiplies it.
    """

    num_gates = 3

    def __init__(self, input_size: int, num_hiddens: int):
        super().__init__(input_size, num_hiddens)
        self.b_hn = nn.Parameter(torch.empty(num_hiddens))

    def forward(self, xproj, h):
        """xproj (T, B, 3H), h (B, H) -> (outputs (T, B, H), final h)."""
        return _GRUWindow.apply(xproj, h, self.W_hh, self.b_hn, _gemm_dtype(xproj))

    def forward_reference(self, xproj, h):
        """The same function with autograd through every step; slower, kept as the plain statement."""
        H = self.num_hiddens
        b_hh = torch.cat([self.b_hn.new_zeros(2 * H), self.b_hn])  # (3H,): only n has one
        outputs = []
        for x_rz, x_n in zip(xproj[..., : 2 * H].unbind(0), xproj[..., 2 * H :].unbind(0)):
            gh = torch.addmm(b_hh, h, self.W_hh)  # (B, 3H)
            r, z = (x_rz + gh[:, : 2 * H]).sigmoid().chunk(2, 1)
            n = torch.addcmul(x_n, r, gh[:, 2 * H :]).tanh()
            h = n + z * (h - n)  # = (1 - z) ⊙ n + z ⊙ h
            outputs.append(h)
        return torch.stack(outputs), h

    def _summed_bias_mask(self):
        mask = torch.ones_like(self.b_h)
        mask[2 * self.num_hiddens :] = 0  # b_in alone: b_hn is its own parameter
        return mask

    def _reset_extra(self, scheme, forget_bias):
        with torch.no_grad():
            self.b_hn.zero_()
            if scheme == "torch":
                torch_bias_(self.b_hn, self.num_hiddens)


class D2LGRULayer(_ScratchLayer):
    """GRU as the book writes it (d2l 9.1): H̃ = tanh(X W_xh + (R ⊙ H) W_hh + b_h)."""

    num_gates = 3

    def forward(self, xproj, h):
        """xproj (T, B, 3H), h (B, H) -> (outputs (T, B, H), final h)."""
        H = self.num_hiddens
        W_rz, W_n = self.W_hh[:, : 2 * H], self.W_hh[:, 2 * H :]  # views, no copy
        outputs = []
        for x_rz, x_n in zip(xproj[..., : 2 * H].unbind(0), xproj[..., 2 * H :].unbind(0)):
            r, z = torch.addmm(x_rz, h, W_rz).sigmoid().chunk(2, 1)
            n = torch.addmm(x_n, r * h, W_n).tanh()
            h = n + z * (h - n)
            outputs.append(h)
        return torch.stack(outputs), h

    def _summed_bias_mask(self):
        mask = torch.ones_like(self.b_h)
        mask[2 * self.num_hiddens :] = 0
        return mask


class LayerNormLSTMLayer(LSTMLayer):
    """LSTM with layer normalisation (Ba, Kiros & Hinton 2016, section 3.1), on plain autograd.

        a_t = LN(x_t W_xh; γ_x) + LN(h_{t-1} W_hh; γ_h) + b_h         LN over all 4H pre-activations
        c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g),   h_t = σ(o) ⊙ tanh(LN(c_t; γ_c, β_c))

    Extra parameters: ``gain_x``, ``gain_h`` (4H,), ``gain_c``, ``bias_c`` (H,); gains start at 1, the
    bias at 0. The input term is normalised per step, so it is still computed for the whole window at once.
    """

    def __init__(self, input_size: int, num_hiddens: int):
        super().__init__(input_size, num_hiddens)
        G, H = self.num_gates * num_hiddens, num_hiddens
        self.gain_x = nn.Parameter(torch.ones(G))
        self.gain_h = nn.Parameter(torch.ones(G))
        self.gain_c = nn.Parameter(torch.ones(H))
        self.bias_c = nn.Parameter(torch.zeros(H))

    def project(self, x):
        """(T, B, in) -> (T, B, 4H): ``LN(x W_xh) + b_h``."""
        return F.layer_norm(x @ self.W_xh, self.gain_x.shape, self.gain_x) + self.b_h

    def project_tokens(self, tokens):
        """(T, B) indices -> (T, B, 4H): ``LN(one_hot(tokens) W_xh) + b_h`` as a row lookup."""
        return F.layer_norm(F.embedding(tokens, self.W_xh), self.gain_x.shape, self.gain_x) + self.b_h

    def forward(self, xproj, state):
        """xproj (T, B, 4H), state (h, c) each (B, H) -> (outputs (T, B, H), (h, c))."""
        h, c = state
        H = self.num_hiddens
        outputs = []
        for x in xproj.unbind(0):
            gates = x + F.layer_norm(h @ self.W_hh, self.gain_h.shape, self.gain_h)  # (B, 4H)
            i, f, _, o = gates.sigmoid().chunk(4, 1)
            g = gates[:, 2 * H : 3 * H].tanh()
            c = torch.addcmul(f * c, i, g)
            h = o * F.layer_norm(c, (H,), self.gain_c, self.bias_c).tanh()
            outputs.append(h)
        return torch.stack(outputs), (h, c)

    forward_reference = forward

    def _reset_extra(self, scheme, forget_bias):
        super()._reset_extra(scheme, forget_bias)
        _reset_gains_(self)


class LayerNormGRULayer(GRULayer):
    """torch-variant GRU with layer normalisation of both projections, on plain autograd.

        x̂ = LN(x_t W_xh; γ_x) + b_h,   ĥ = LN(h_{t-1} W_hh; γ_h) + [0, 0, b_hn]      LN over all 3H
        r, z = σ(x̂_rz + ĥ_rz),   n = tanh(x̂_n + r ⊙ ĥ_n),   h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}

    Extra parameters: ``gain_x``, ``gain_h`` (3H,), starting at 1.
    """

    def __init__(self, input_size: int, num_hiddens: int):
        super().__init__(input_size, num_hiddens)
        G = self.num_gates * num_hiddens
        self.gain_x = nn.Parameter(torch.ones(G))
        self.gain_h = nn.Parameter(torch.ones(G))

    project = LayerNormLSTMLayer.project
    project_tokens = LayerNormLSTMLayer.project_tokens

    def forward(self, xproj, h):
        """xproj (T, B, 3H), h (B, H) -> (outputs (T, B, H), final h)."""
        H = self.num_hiddens
        b_hh = torch.cat([self.b_hn.new_zeros(2 * H), self.b_hn])  # (3H,): only n has one
        outputs = []
        for x in xproj.unbind(0):
            gh = F.layer_norm(h @ self.W_hh, self.gain_h.shape, self.gain_h) + b_hh  # (B, 3H)
            r, z = (x[:, : 2 * H] + gh[:, : 2 * H]).sigmoid().chunk(2, 1)
            n = torch.addcmul(x[:, 2 * H :], r, gh[:, 2 * H :]).tanh()
            h = n + z * (h - n)
            outputs.append(h)
        return torch.stack(outputs), h

    forward_reference = forward

    def _reset_extra(self, scheme, forget_bias):
        super()._reset_extra(scheme, forget_bias)
        _reset_gains_(self)


def _reset_gains_(layer: nn.Module) -> None:
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("gain_"):
                p.fill_(1.0)
            elif name == "bias_c":
                p.zero_()


def _make_layer(config: ModelConfig, input_size: int) -> _ScratchLayer:
    H = config.num_hiddens
    if config.layer_norm:
        return (LayerNormLSTMLayer if config.cell == "lstm" else LayerNormGRULayer)(input_size, H)
    if config.cell == "lstm":
        return LSTMLayer(input_size, H)
    if config.cell == "gru":
        return (GRULayer if config.gru_variant == "torch" else D2LGRULayer)(input_size, H)
    return RNNLayer(input_size, H, nonlinearity=config.cell.removeprefix("rnn_"))


def zoneout_masks(shape, like: torch.Tensor, cell: float, hidden: float, training: bool):
    """Zoneout masks ``(zc, zh)`` for one layer's window, each of ``shape`` (T, B, H) in ``like``'s dtype
    and on its device.

    Training: 1 where a unit keeps its previous value this step, drawn independently per unit and step
    with probability ``cell`` (for c) and ``hidden`` (for h), as ``regularize.keep_mask`` draws. Evaluation:
    the rates themselves, every unit moving by the expected amount, so evaluation stays deterministic.
    """
    if not training:
        return like.new_full(shape, cell), like.new_full(shape, hidden)
    return tuple(torch.rand(shape, device=like.device, dtype=like.dtype).lt_(p) if p > 0 else like.new_zeros(shape)
                 for p in (cell, hidden))


class ScratchModel(LanguageModel):
    """The deep RNN of d2l section 9.3 from scratch, with the ``LanguageModel`` interface."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        H = config.num_hiddens
        self.layers = nn.ModuleList(
            _make_layer(config, config.input_size if l == 0 else H) for l in range(config.num_layers)
        )
        self.reset_parameters()

    def _recur(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        cfg = self.config
        lstm = cfg.cell == "lstm"
        finals = []  # each layer's final state
        out = None  # the previous layer's output (set by layer 0)
        one_hot_plain = self.embedding is None and (
            not self.training or (cfg.embed_dropout == 0 and cfg.input_dropout == 0))
        zone_shape = (X.shape[1], X.shape[0], cfg.num_hiddens)  # (T, B, H), every layer's (LSTM only)
        # in evaluation every layer's masks are the same rates: made once
        eval_zoneout = None if self.training or not cfg.zoneout else zoneout_masks(
            zone_shape, self.layers[0].W_hh, cfg.zoneout_cell, cfg.zoneout_hidden, False)
        for l, layer in enumerate(self.layers):
            if l > 0:
                xproj = layer.project(self._dropout(out, cfg.dropout))  # dropout between layers, (T, B, G*H)
            elif one_hot_plain:
                xproj = layer.project_tokens(X.T)  # (T, B, G*H)
            else:
                xproj = layer.project(self._embed(X))  # embedded, or one-hot with tokens dropped
            s = (state[0][l], state[1][l]) if lstm else state[l]
            extra = {}
            if cfg.zoneout:  # ModelConfig allows it for LSTM layers only
                extra["zoneout"] = eval_zoneout or zoneout_masks(zone_shape, layer.W_hh, cfg.zoneout_cell,
                                                                 cfg.zoneout_hidden, True)
            if self.training and cfg.weight_drop > 0:  # DropConnect on W_hh, one mask per window
                y, s = functional_call(layer, {"W_hh": drop_connect(layer.W_hh, cfg.weight_drop, True)},
                                       (xproj, s), extra)
            else:
                y, s = layer(xproj, s, **extra)  # (T, B, H)
            out = y + out if cfg.residual and l > 0 else y
            finals.append(s)
        return out, stack_layer_states(finals)  # (L, B, H), or (h, c) of that shape

    def _init_recurrent(self) -> None:
        for layer in self.layers:
            layer.reset_parameters(self.config.init, self.config.forget_bias)
