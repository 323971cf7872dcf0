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
after the sweep. Each layer keeps ``forward_reference``, the plain autograd loop, and the tests hold
the two equal (and both equal to torch.nn). The book-variant GRU runs on plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from deeprnn.models.base import LanguageModel, State, init_block_, torch_bias_
from deeprnn.models.config import ModelConfig


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place as 2σ(2x) − 1: the same function, but torch.tanh on CPU float tensors of a
    step's size measures 5-10x slower than sigmoid in this torch build (and it goes multi-threaded)."""
    return x.mul_(2).sigmoid_().mul_(2).sub_(1)


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
        return torch.addmm(self.b_h, x.reshape(T * B, -1), self.W_xh).view(T, B, -1)

    def project_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, B) indices -> (T, B, G*H): ``one_hot(tokens) W_xh + b_h`` as a row lookup."""
        return F.embedding(tokens, self.W_xh) + self.b_h

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


class _RNNWindow(torch.autograd.Function):
    """One tanh/ReLU RNN layer over a whole window, with a hand-written backward sweep.

    Going back, each step is one pointwise product and one recurrent product; ``W_hh``'s gradient is
    one (H, T*B) x (T*B, H) product after the sweep.
    """

    @staticmethod
    def forward(ctx, xproj, h0, W_hh, relu: bool):
        T, B, H = xproj.shape
        hs = xproj.new_empty(T + 1, B, H)
        hs[0] = h0
        for t in range(T):
            pre = torch.addmm(xproj[t], hs[t], W_hh, out=hs[t + 1])
            if relu:
                pre.relu_()
            else:
                _tanh_(pre)
        ctx.relu = relu
        ctx.save_for_backward(W_hh, hs)
        return hs[1:], hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT):
        W_hh, hs = ctx.saved_tensors
        T, B, H = d_out.shape
        out = hs[1:]
        D = (out > 0).to(out.dtype) if ctx.relu else 1 - out * out  # φ' from φ's output
        dpre = torch.empty_like(out)
        W_hh_T = W_hh.T
        dh = d_hT + d_out[T - 1]
        for t in range(T - 1, -1, -1):
            torch.mul(dh, D[t], out=dpre[t])
            dh = torch.addmm(d_out[t - 1], dpre[t], W_hh_T) if t > 0 else dpre[0] @ W_hh_T
        d_W_hh = hs[:-1].reshape(T * B, H).T @ dpre.view(T * B, H) if ctx.needs_input_grad[2] else None
        return dpre, dh, d_W_hh, None


class RNNLayer(_ScratchLayer):
    """Eq. (9.3.1) with φ = tanh or ReLU."""

    def __init__(self, input_size: int, num_hiddens: int, nonlinearity: str = "tanh"):
        super().__init__(input_size, num_hiddens)
        self.nonlinearity = nonlinearity

    def forward(self, xproj: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xproj (T, B, H), h (B, H) -> (outputs (T, B, H), final h (B, H))."""
        return _RNNWindow.apply(xproj, h, self.W_hh, self.nonlinearity == "relu")

    def forward_reference(self, xproj, h):
        """The same function with autograd through every step; slower, kept as the plain statement."""
        act = torch.tanh if self.nonlinearity == "tanh" else torch.relu
        outputs = []
        for x in xproj.unbind(0):
            h = act(torch.addmm(x, h, self.W_hh))
            outputs.append(h)
        return torch.stack(outputs), h


class _LSTMWindow(torch.autograd.Function):
    """One LSTM layer over a whole window, with a hand-written backward sweep.

    Autograd through a Python time loop records ~10 small nodes per step; here the forward loop runs
    without a graph, and the backward loop does one product and four pointwise ops per step. The
    recurrent weight's gradient is one (H, T*B) x (T*B, 4H) product after the sweep, and the gradient
    of the input projection is the stacked gate gradients, so ``W_xh``/``b_h`` are handled by autograd
    outside. Saved for backward: the activations (T, B, 4H), c and h (T+1, B, H), tanh(c) (T, B, H).
    """

    @staticmethod
    def forward(ctx, xproj, h0, c0, W_hh):
        T, B, G = xproj.shape  # G = 4H, gate blocks i, f, g, o
        H = G // 4
        acts = torch.empty_like(xproj)  # σ(i), σ(f), tanh(g), σ(o) per step
        hs = xproj.new_empty(T + 1, B, H)
        cs = xproj.new_empty(T + 1, B, H)
        tcs = xproj.new_empty(T, B, H)  # tanh(c_t)
        hs[0], cs[0] = h0, c0
        for t in range(T):
            a = acts[t]
            torch.addmm(xproj[t], hs[t], W_hh, out=a)  # pre-activations (B, 4H)
            i, f, g, o = a.chunk(4, 1)
            g.mul_(2)  # with the sigmoid below and the affine map after it: tanh(g) = 2σ(2g) − 1
            a.sigmoid_()
            g.mul_(2).sub_(1)
            torch.mul(f, cs[t], out=cs[t + 1]).addcmul_(i, g)
            tc = torch.mul(cs[t + 1], 2, out=tcs[t]).sigmoid_().mul_(2).sub_(1)  # tanh(c_t)
            torch.mul(o, tc, out=hs[t + 1])
        ctx.save_for_backward(W_hh, acts, hs, cs, tcs)
        return hs[1:], hs[T].clone(), cs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT, d_cT):
        W_hh, acts, hs, cs, tcs = ctx.saved_tensors
        T, B, G = acts.shape
        H = G // 4
        i, f, g, o = acts.chunk(4, 2)  # (T, B, H) each
        # Everything that does not depend on the incoming gradient, for all steps at once:
        # dpre = [dc·g·σ'(i), dc·c_{t-1}·σ'(f), dc·i·tanh'(g), dh·tanh(c)·σ'(o)]  (σ' = s(1-s))
        M = torch.cat(
            [g * i * (1 - i), cs[:-1] * f * (1 - f), i * (1 - g * g), tcs * o * (1 - o)], dim=2
        ).view(T, B, 4, H)
        A = o * (1 - tcs * tcs)  # dc_t += dh_t · A_t
        dpre = torch.empty_like(acts)  # (T, B, 4H): gradient of the pre-activations
        W_hh_T = W_hh.T
        dh, dc = d_hT + d_out[T - 1], d_cT
        for t in range(T - 1, -1, -1):
            dc = torch.addcmul(dc, dh, A[t])
            dp = dpre[t].view(B, 4, H)
            torch.mul(dc.unsqueeze(1), M[t, :, :3], out=dp[:, :3])
            torch.mul(dh, M[t, :, 3], out=dp[:, 3])
            dc = dc * f[t]
            if t > 0:
                dh = torch.addmm(d_out[t - 1], dpre[t], W_hh_T)
            else:
                dh = dpre[0] @ W_hh_T
        d_W_hh = None
        if ctx.needs_input_grad[3]:
            d_W_hh = hs[:-1].reshape(T * B, H).T @ dpre.view(T * B, G)  # (H, 4H), one product
        return dpre, dh, dc, d_W_hh


class LSTMLayer(_ScratchLayer):
    """LSTM (d2l 9.2 / torch.nn.LSTM), gates i, f, g, o."""

    num_gates = 4

    def forward(self, xproj, state):
        """xproj (T, B, 4H), state (h, c) each (B, H) -> (outputs (T, B, H), (h, c))."""
        h0, c0 = state
        outputs, h, c = _LSTMWindow.apply(xproj, h0, c0, self.W_hh)
        return outputs, (h, c)

    def forward_reference(self, xproj, state):
        """The same function with autograd through every step; slower, kept as the plain statement."""
        h, c = state
        H = self.num_hiddens
        outputs = []
        for x in xproj.unbind(0):
            gates = torch.addmm(x, h, self.W_hh)  # (B, 4H)
            i, f, _, o = gates.sigmoid().chunk(4, 1)
            g = gates[:, 2 * H : 3 * H].tanh()
            c = torch.addcmul(f * c, i, g)
            h = o * c.tanh()
            outputs.append(h)
        return torch.stack(outputs), (h, c)

    def _reset_extra(self, scheme, forget_bias):
        if forget_bias:
            H = self.num_hiddens
            with torch.no_grad():
                self.b_h[H : 2 * H] += forget_bias


class _GRUWindow(torch.autograd.Function):
    """One torch-variant GRU layer over a whole window, with a hand-written backward sweep.

    Same idea as ``_LSTMWindow``: no graph in the forward loop, one product and a few pointwise ops
    per step going back, ``W_hh``'s gradient as one product after the sweep.
    """

    @staticmethod
    def forward(ctx, xproj, h0, W_hh, b_hn):
        T, B, G = xproj.shape  # G = 3H, gate blocks r, z, n
        H = G // 3
        acts = torch.empty_like(xproj)  # r, z, n per step
        ghn = xproj.new_empty(T, B, H)  # h W_hn + b_hn, which r multiplies
        hs = xproj.new_empty(T + 1, B, H)
        hs[0] = h0
        W_rz, W_n = W_hh[:, : 2 * H], W_hh[:, 2 * H :]
        for t in range(T):
            a, x, h = acts[t], xproj[t], hs[t]
            rz, n = a[:, : 2 * H], a[:, 2 * H :]
            torch.addmm(x[:, : 2 * H], h, W_rz, out=rz).sigmoid_()
            torch.addmm(b_hn, h, W_n, out=ghn[t])
            _tanh_(torch.addcmul(x[:, 2 * H :], a[:, :H], ghn[t], out=n))
            torch.addcmul(n, a[:, H : 2 * H], h - n, out=hs[t + 1])  # (1 - z) n + z h
        ctx.save_for_backward(W_hh, acts, ghn, hs)
        return hs[1:], hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_hT):
        W_hh, acts, ghn, hs = ctx.saved_tensors
        T, B, G = acts.shape
        H = G // 3
        r, z, n = acts.chunk(3, 2)  # (T, B, H) each
        # Factors that do not depend on the incoming gradient, for all steps at once:
        P = (1 - z) * (1 - n * n)  # dpre_n = dh · P
        Q = (hs[:-1] - n) * z * (1 - z)  # dpre_z = dh · Q
        R = ghn * r * (1 - r)  # dpre_r = dpre_n · R
        d_n = torch.empty_like(ghn)  # gradient of n's pre-activation (= of x_n)
        d_gh = torch.empty_like(acts)  # gradient of [h W_hr, h W_hz, h W_hn + b_hn]
        W_hh_T = W_hh.T
        dh = d_hT + d_out[T - 1]
        for t in range(T - 1, -1, -1):
            dg = d_gh[t]
            torch.mul(dh, P[t], out=d_n[t])
            torch.mul(dh, Q[t], out=dg[:, H : 2 * H])
            torch.mul(d_n[t], R[t], out=dg[:, :H])
            torch.mul(d_n[t], r[t], out=dg[:, 2 * H :])
            direct = torch.addcmul(d_out[t - 1], dh, z[t]) if t > 0 else dh * z[t]
            dh = torch.addmm(direct, dg, W_hh_T)
        d_x = torch.cat([d_gh[..., : 2 * H], d_n], dim=2)  # (T, B, 3H)
        d_W_hh = hs[:-1].reshape(T * B, H).T @ d_gh.view(T * B, G) if ctx.needs_input_grad[2] else None
        d_b_hn = d_gh[..., 2 * H :].sum((0, 1)) if ctx.needs_input_grad[3] else None
        return d_x, dh, d_W_hh, d_b_hn


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
        return _GRUWindow.apply(xproj, h, self.W_hh, self.b_hn)

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


def _make_layer(config: ModelConfig, input_size: int) -> _ScratchLayer:
    H = config.num_hiddens
    if config.cell == "lstm":
        return LSTMLayer(input_size, H)
    if config.cell == "gru":
        return (GRULayer if config.gru_variant == "torch" else D2LGRULayer)(input_size, H)
    return RNNLayer(input_size, H, nonlinearity=config.cell.removeprefix("rnn_"))


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
        lstm = self.config.cell == "lstm"
        hs, cs = [], []
        for l, layer in enumerate(self.layers):
            if l > 0:
                xproj = layer.project(self.drop(out))  # dropout between layers, (T, B, G*H)
            elif self.embedding is None:
                xproj = layer.project_tokens(X.T)  # (T, B, G*H)
            else:
                xproj = layer.project(self.embedding(X.T))
            out, s = layer(xproj, (state[0][l], state[1][l]) if lstm else state[l])
            if lstm:
                hs.append(s[0])
                cs.append(s[1])
            else:
                hs.append(s)
        if lstm:
            return out, (torch.stack(hs), torch.stack(cs))  # (L, B, H) each
        return out, torch.stack(hs)

    def _init_recurrent(self) -> None:
        for layer in self.layers:
            layer.reset_parameters(self.config.init, self.config.forget_bias)
