"""The language-model interface shared by the scratch and concise implementations.

Internals are time-major like ``torch.nn`` RNNs and the book: the public input ``X`` is ``(B, T)``
token indices, everything after the input layer is ``(T, B, …)``, and the logits are ``(T, B, V)``
(so the loss compares them with ``Y.T``).

    X (B, T) ──input layer──▶ (T, B, in) ──L recurrent layers──▶ (T, B, H) ──dropout──▶ output ──▶ (T, B, V)

The output layer ``nn.Linear(num_hiddens, vocab_size)`` is ``W_hq, b_q`` of eq. (9.3.2); it reads the
top layer only.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from deeprnn.errors import ConfigError
from deeprnn.models import onednn
from deeprnn.models.config import ModelConfig
from deeprnn.regularize import dropout, one_hot_dropout_scale, token_keep_scale

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def detach_state(state: State) -> State:
    """Cut the autograd graph at a window boundary (truncated BPTT), keeping the values.

    Accepts ``h`` or an LSTM ``(h, c)`` tuple and returns the same structure.
    """
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def stack_layer_states(states: list[State]) -> State:
    """Per-layer final states, each ``(B, H)`` or ``(1, B, H)`` (or an LSTM pair of them), in the
    torch.nn layout: ``(L, B, H)``, or ``(h, c)`` of that shape."""
    def cat(ts):
        return torch.cat([t.reshape(1, *t.shape[-2:]) for t in ts])  # (L, B, H)

    if isinstance(states[0], tuple):
        return cat([s[0] for s in states]), cat([s[1] for s in states])
    return cat(states)


def init_block_(w: torch.Tensor, scheme: str, *, recurrent: bool, num_hiddens: int) -> None:
    """Initialise one gate block of an RNN weight in place.

    The distributions are symmetric under transposition, so the scratch ``(in, H)`` blocks and the
    concise ``(H, in)`` blocks get the same law: ``d2l`` N(0, 0.01²) (the book's ``randn * 0.01``),
    ``torch`` U(±1/sqrt(H)) (torch.nn's default), ``orthogonal`` orthogonal recurrent and Xavier
    input weights.
    """
    with torch.no_grad():
        if scheme == "d2l":
            w.normal_(0.0, 0.01)
        elif scheme == "torch":
            bound = 1.0 / math.sqrt(num_hiddens)
            w.uniform_(-bound, bound)
        elif recurrent:
            nn.init.orthogonal_(w)
        else:
            nn.init.xavier_uniform_(w)


def torch_bias_(b: torch.Tensor, num_hiddens: int) -> None:
    """U(±1/sqrt(H)) in place: torch.nn's default for each of its two RNN biases."""
    bound = 1.0 / math.sqrt(num_hiddens)
    with torch.no_grad():
        b.uniform_(-bound, bound)


class LanguageModel(nn.Module):
    """Input layer, ``num_layers`` recurrent layers, dropout, output layer on the top layer.

    Subclasses implement ``_recur(X, state) -> (Y (T, B, H), state)`` and ``_init_recurrent()``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        V, H = config.vocab_size, config.num_hiddens
        self.embedding = nn.Embedding(V, config.input_size) if config.input == "embedding" else None
        self.drop = nn.Dropout(config.dropout)  # kept for callers; the model uses _dropout()
        self.output = onednn.Linear(H, V)  # W_hq, b_q of eq. (9.3.2); an nn.Linear
        if config.tie_weights:
            self.output.weight = self.embedding.weight  # both (V, H)

    # -- the interface ---------------------------------------------------------------------------
    def forward(self, X: torch.Tensor, state: State | None = None, *, return_hidden: bool = False):
        """``X`` (B, T) integer token indices -> (logits (T, B, V), final state).

        ``state`` defaults to zeros (``begin_state``); it is ``(L, B, H)`` or, for LSTM, ``(h, c)``.
        ``return_hidden=True`` adds a third value, the top layer's outputs (T, B, H) before the output
        dropout (what AR/TAR penalise). Raises ConfigError, naming the shapes, for an ``X`` that is not
        (B, T) indices in the vocabulary or a ``state`` that ``begin_state(B)`` would not give.
        """
        X = self._check_tokens(X)
        if state is None:
            state = self.begin_state(X.shape[0], device=X.device)
        else:
            self._check_state(state, X.shape[0])
        Y, state = self._recur(X, state)  # (T, B, H)
        logits = self.output(self._dropout(Y, self.config.out_dropout))  # (T, B, V)
        return (logits, state, Y) if return_hidden else (logits, state)

    def _check_tokens(self, X) -> torch.Tensor:
        """``X`` as int64 (one_hot and the kernels take it), or ConfigError unless it is a non-empty (B, T) integer
        tensor of indices below vocab_size.

        The range is checked on the CPU only, where it costs microseconds; on a GPU it would wait for the device
        at every window, and under ``torch.compile`` it would break the graph.
        """
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.dtype.is_floating_point \
                or X.dtype.is_complex or X.dtype == torch.bool:
            got = (f"a tensor of shape {tuple(X.shape)} and dtype {X.dtype}" if isinstance(X, torch.Tensor)
                   else type(X).__name__)
            raise ConfigError(f"X must be a (batch, num_steps) tensor of integer token indices, got {got}")
        if not X.numel():
            raise ConfigError(f"X must hold at least one row and one step, got shape {tuple(X.shape)}")
        X = X if X.dtype == torch.long else X.long()
        if X.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = (int(v) for v in torch.aminmax(X))
            if low < 0 or high >= self.config.vocab_size:
                raise ConfigError(f"X holds token index {low if low < 0 else high}, outside this model's vocabulary "
                                  f"of {self.config.vocab_size} (indices 0..{self.config.vocab_size - 1})")
        return X

    def _check_state(self, state, batch_size: int) -> None:
        """Raise ConfigError unless ``state`` has the structure, shapes, device and dtype ``begin_state`` gives
        (under autocast, any floating dtype: a carried state may be in the autocast dtype, which casts it)."""
        shape = (self.config.num_layers, batch_size, self.config.num_hiddens)
        lstm = self.config.cell == "lstm"

        def describe(s):
            if isinstance(s, torch.Tensor):
                return f"a tensor of shape {tuple(s.shape)}"
            if isinstance(s, (tuple, list)):
                return f"a {type(s).__name__} of {len(s)}: " + ", ".join(
                    f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in s)
            return type(s).__name__

        parts = state if lstm and isinstance(state, (tuple, list)) and len(state) == 2 else (state,)
        if not (all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape for t in parts)
                and isinstance(state, (tuple, list)) == lstm):
            want = (f"(h, c), each of shape {shape}" if lstm else f"a tensor of shape {shape}")
            raise ConfigError(f"state must be {want} (num_layers, batch, num_hiddens) for X of batch "
                              f"{batch_size}, as begin_state({batch_size}) gives; got {describe(state)}")
        p = self.output.weight
        for t in parts:
            same_dtype = t.dtype == p.dtype or (t.is_floating_point() and torch.is_autocast_enabled(p.device.type))
            if t.device != p.device or not same_dtype:
                raise ConfigError(f"state must be {p.dtype} on {p.device}, like the model's parameters; got "
                                  f"{t.dtype} on {t.device}: use begin_state({batch_size}) or move it with .to()")

    def begin_state(self, batch_size: int, device=None, dtype=None) -> State:
        """Zero state with torch.nn shapes: ``(L, B, H)``, or ``(h, c)`` of that shape for LSTM.

        ``device``/``dtype`` default to those of the model's parameters.
        """
        try:
            size = operator.index(batch_size)  # an int, numpy's or a 0-d integer tensor's
        except TypeError:
            size = -1
        if isinstance(batch_size, bool) or size < 0:
            raise ConfigError(f"batch_size must be an integer >= 0, got {batch_size!r}")
        p = self.output.weight
        shape = (self.config.num_layers, size, self.config.num_hiddens)
        kw = dict(device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype)
        if self.config.cell == "lstm":
            return torch.zeros(shape, **kw), torch.zeros(shape, **kw)
        return torch.zeros(shape, **kw)

    def num_params(self) -> int:
        """Number of trainable scalars (a tied weight counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # -- shared pieces ---------------------------------------------------------------------------
    def _embed(self, X: torch.Tensor) -> torch.Tensor:
        """(B, T) indices -> (T, B, in) first-layer input: one-hot in the parameters' dtype, or embedded.

        In training, embedding dropout and input dropout apply here.
        """
        if self.embedding is not None:
            x = self.embedding(X.T)
            scale = self._token_scale(X.T, x.dtype)
            x = x if scale is None else x * scale
            return self._dropout(x, self.config.input_dropout)
        x = F.one_hot(X.T, self.config.vocab_size).to(self.output.weight.dtype)
        scale = self._token_scale(X.T, x.dtype)
        return x if scale is None else x * scale

    def _token_scale(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """(T, B) indices -> (T, B, 1) multiplier of each token's input row, or None (nothing dropped).

        Embedding dropout (whole tokens) for either input; for a one-hot input also the input dropout,
        which can only act on the one non-zero entry.
        """
        cfg = self.config
        scale = token_keep_scale(tokens, cfg.vocab_size, cfg.embed_dropout, self.training, dtype)
        if self.embedding is None:
            s = one_hot_dropout_scale(tokens, cfg.vocab_size, cfg.input_dropout, self.training,
                                      cfg.locked_dropout, dtype)
            if s is not None:
                scale = s if scale is None else scale * s
        return scale

    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout of (T, B, F) activations, locked across time when the config says so."""
        return dropout(x, p, self.training, self.config.locked_dropout)

    def reset_parameters(self) -> None:
        """Draw every parameter afresh from the config's init scheme (same law in both impls)."""
        scheme = self.config.init
        if self.embedding is not None and not self.config.tie_weights:
            self.embedding.reset_parameters()  # N(0, 1), torch's default, for every scheme
        if scheme == "torch":
            self.output.reset_parameters()
        else:
            with torch.no_grad():
                if scheme == "d2l":
                    self.output.weight.normal_(0.0, 0.01)
                else:
                    nn.init.xavier_uniform_(self.output.weight)
                self.output.bias.zero_()
        self._init_recurrent()

    def _recur(self, X: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def _init_recurrent(self) -> None:
        raise NotImplementedError
