"""Deep RNNs on ``torch.nn.RNN/GRU/LSTM(num_layers=L, dropout=…)`` with the ``LanguageModel`` interface.

One torch.nn module holds all L layers; it uses the fused (oneDNN / cuDNN) kernels where torch has them.
Its per-layer parameters are ``rnn.weight_ih_l{l}`` (G*H, in), ``rnn.weight_hh_l{l}`` (G*H, H),
``rnn.bias_ih_l{l}`` and ``rnn.bias_hh_l{l}`` (G*H,); ``convert.py`` maps them to the scratch names.
"""

from __future__ import annotations

import torch
from torch import nn

from deeprnn.models.base import LanguageModel, State, init_block_
from deeprnn.models.config import ModelConfig


class ConciseModel(LanguageModel):
    """The deep RNN of d2l section 9.3 (concise implementation)."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        kw = dict(
            input_size=config.input_size,
            hidden_size=config.num_hiddens,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,  # torch warns on L=1
        )
        if config.cell == "lstm":
            self.rnn = nn.LSTM(**kw)
        elif config.cell == "gru":
            self.rnn = nn.GRU(**kw)
        else:
            self.rnn = nn.RNN(nonlinearity=config.cell.removeprefix("rnn_"), **kw)
        self.reset_parameters()

    def _recur(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return self.rnn(self._embed(X), state)  # (T, B, in) -> (T, B, H)

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
                    getattr(self.rnn, f"bias_ih_l{l}")[H : 2 * H] += cfg.forget_bias
