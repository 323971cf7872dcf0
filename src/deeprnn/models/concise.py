"""Deep RNNs on ``torch.nn.RNN/GRU/LSTM(num_layers=L, dropout=…)`` with the ``LanguageModel`` interface.

One torch.nn module holds all L layers; it uses the fused (oneDNN / cuDNN) kernels where torch has them.
Its per-layer parameters are ``rnn.weight_ih_l{l}`` (G*H, in), ``rnn.weight_hh_l{l}`` (G*H, H),
``rnn.bias_ih_l{l}`` and ``rnn.bias_hh_l{l}`` (G*H,); ``convert.py`` maps them to the scratch names.

Weight-drop keeps the fused call: the masked ``weight_hh_l{l}`` are passed to the same module through
``torch.func.functional_call``. Residual connections and locked dropout between layers need each
layer's output, so there the layers run one at a time, still fused per layer: a one-layer torch.nn
module (not registered, so it adds no parameters) is called with layer l's weights. The parameters are
those of ``rnn`` either way, so checkpoints and the conversion to scratch do not change.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call

from deeprnn.models.base import LanguageModel, State, init_block_, stack_layer_states
from deeprnn.models.config import ModelConfig
from deeprnn.regularize import drop_connect

_PARAM_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
# cuDNN copies weights passed in this way into one buffer per call (AWD-LSTM's weight-drop does the
# same); the warning would repeat every window.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")


class ConciseModel(LanguageModel):
    """The deep RNN of d2l section 9.3 (concise implementation)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        L = config.num_layers
        # Layer by layer when something must happen between the layers that torch.nn cannot do.
        self.layerwise = L > 1 and (config.residual or (config.locked_dropout and config.dropout > 0))
        kw = dict(
            input_size=config.input_size,
            hidden_size=config.num_hiddens,
            num_layers=L,
            dropout=config.dropout if L > 1 and not self.layerwise else 0.0,  # torch warns on L=1
        )
        self.rnn = _torch_rnn(config.cell, **kw)
        if self.layerwise:
            one = dict(kw, num_layers=1, dropout=0.0)
            runners = (_torch_rnn(config.cell, **one),
                       _torch_rnn(config.cell, **dict(one, input_size=config.num_hiddens)))
            object.__setattr__(self, "_runners", runners)  # not submodules: their own weights are unused
        self.reset_parameters()

    def _recur(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        x = self._embed(X)  # (T, B, in)
        dropped = self._dropped_weights()
        if not self.layerwise:
            if not dropped:
                return self.rnn(x, state)  # (T, B, in) -> (T, B, H)
            return functional_call(self.rnn, dropped, (x, state))
        cfg = self.config
        lstm = cfg.cell == "lstm"
        finals = []  # each layer's final state
        out = x
        for l in range(cfg.num_layers):
            inp = x if l == 0 else self._dropout(out, cfg.dropout)  # dropout between layers
            weights = {f"{k}_l0": dropped.get(f"{k}_l{l}", getattr(self.rnn, f"{k}_l{l}")) for k in _PARAM_KINDS}
            s = (state[0][l : l + 1], state[1][l : l + 1]) if lstm else state[l : l + 1]  # (1, B, H)
            y, s = functional_call(self._runners[min(l, 1)], weights, (inp, s))  # (T, B, H)
            out = y + out if cfg.residual and l > 0 else y
            finals.append(s)
        return out, stack_layer_states(finals)  # (L, B, H), or (h, c) of that shape

    def _dropped_weights(self) -> dict[str, torch.Tensor]:
        """Weight-drop in training: ``{"weight_hh_l{l}": masked weight}``; empty when it does not apply."""
        p = self.config.weight_drop
        if not self.training or p == 0:
            return {}
        return {f"weight_hh_l{l}": drop_connect(getattr(self.rnn, f"weight_hh_l{l}"), p, True)
                for l in range(self.config.num_layers)}

    def _init_recurrent(self) -> None:
        cfg = self.config
        H, G = cfg.num_hiddens, cfg.num_gates
        if cfg.init == "torch":
            self.rnn.reset_parameters()
        else:
            for l in range(cfg.num_layers):
                for g in range(G):
                    block = slice(g * H, (g + 1) * H)
                    w_ih, w_hh = getattr(self.rnn, f"weight_ih_l{l}"), getattr(self.rnn, f"weight_hh_l{l}")
                    init_block_(w_ih[block], cfg.init, recurrent=False, num_hiddens=H)
                    init_block_(w_hh[block], cfg.init, recurrent=True, num_hiddens=H)
                with torch.no_grad():
                    getattr(self.rnn, f"bias_ih_l{l}").zero_()
                    getattr(self.rnn, f"bias_hh_l{l}").zero_()
        if cfg.forget_bias:
            with torch.no_grad():
                for l in range(cfg.num_layers):
                    getattr(self.rnn, f"bias_ih_l{l}")[H : 2 * H] += float(cfg.forget_bias)


def _torch_rnn(cell: str, **kw) -> nn.Module:
    if cell == "lstm":
        return nn.LSTM(**kw)
    if cell == "gru":
        return nn.GRU(**kw)
    return nn.RNN(nonlinearity=cell.removeprefix("rnn_"), **kw)
