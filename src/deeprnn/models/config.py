"""The model configuration: one flat, typed, JSON-able dataclass (``dataclasses.asdict``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from deeprnn.choices import CELLS, GRU_VARIANTS, IMPLS, INITS, INPUTS
from deeprnn.errors import ConfigError
from deeprnn.fields import check_types

# Gate blocks stacked along the last axis of W_xh / W_hh, in torch.nn order.
NUM_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}
# Upper bounds that keep every weight's shape and element count in range (a width of 2**20 is already a
# 16-terabyte LSTM layer; beyond them torch fails with an overflow, not a message).
MAX_WIDTH = 2**20
MAX_LAYERS = 1024


@dataclass
class ModelConfig:
    """A deep recurrent language model (d2l section 9.3), either implementation."""

    vocab_size: int  # q: size of the one-hot input and of the output layer
    cell: str  # one of CELLS: the recurrence of every layer
    num_layers: int = 2  # L: stacked recurrent layers
    num_hiddens: int = 256  # h: hidden units per layer
    impl: str = "concise"  # "concise" (torch.nn.RNN/GRU/LSTM) or "scratch" (eq. 9.3.1 by hand)
    input: str = "one_hot"  # "one_hot" like the book, or a learned "embedding"
    embed_size: int | None = None  # embedding width; None means num_hiddens (input="embedding" only)
    dropout: float = 0.0  # between layers and before the output layer; in [0, 1)
    tie_weights: bool = False  # share the embedding and the output weight (needs embed_size == num_hiddens)
    init: str = "torch"  # "d2l" (randn*0.01, zero biases), "torch" (uniform ±1/sqrt(h)), "orthogonal"
    forget_bias: float = 0.0  # added to the LSTM forget-gate bias after init
    gru_variant: str = "torch"  # "torch": r ⊙ (h W_hn + b_hn); "d2l": (r ⊙ h) W_hn, the book's
    residual: bool = False  # add each layer's input to its output, layers 2..L (He et al. / GNMT)
    layer_norm: bool = False  # layer-normalised LSTM/GRU cells (Ba et al. 2016); impl="scratch" only
    # AWD-LSTM regularisers (Merity et al. 2018); all act in training only, eval stays deterministic
    embed_dropout: float = 0.0  # drop whole tokens: a token's input row is zeroed for the whole window
    input_dropout: float = 0.0  # dropout on the first layer's input (embedding or one-hot)
    output_dropout: float | None = None  # dropout before the output layer; None: the same as dropout
    locked_dropout: bool = False  # one dropout mask per sequence and window, shared across time steps
    weight_drop: float = 0.0  # DropConnect on the recurrent weights W_hh, one mask per window
    # zoneout (Krueger et al. 2017), LSTM, impl="scratch": in training each unit keeps its previous c (h)
    # with this probability at each step; in evaluation every unit moves by the expected amount
    zoneout_cell: float = 0.0
    zoneout_hidden: float = 0.0

    @property
    def input_size(self) -> int:
        """Width of the first layer's input: vocab_size (one-hot) or the embedding size."""
        if self.input == "one_hot":
            return self.vocab_size
        return self.num_hiddens if self.embed_size is None else self.embed_size

    @property
    def num_gates(self) -> int:
        """Gate blocks per layer: 1 (RNN), 3 (GRU r,z,n), 4 (LSTM i,f,g,o)."""
        return NUM_GATES[self.cell]

    def validate(self) -> ModelConfig:
        """Check every field; raise ``ConfigError`` whose message starts with the field name.

        Returns ``self`` so that ``ModelConfig(...).validate()`` chains.
        """
        # The switches first: the checks below test them for truth ("no" would count as on).
        check_types(ModelConfig, {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type == "bool"})
        _check_int("vocab_size", self.vocab_size, 1)
        _check_choice("cell", self.cell, CELLS)
        _check_int("num_layers", self.num_layers, 1, MAX_LAYERS)
        _check_int("num_hiddens", self.num_hiddens, 1, MAX_WIDTH)
        _check_choice("impl", self.impl, IMPLS)
        _check_choice("input", self.input, INPUTS)
        if self.embed_size is not None:
            if self.input != "embedding":
                raise ConfigError(
                    f"embed_size is only used with input='embedding' (input is {self.input!r}); "
                    "leave it None or set input='embedding'"
                )
            _check_int("embed_size", self.embed_size, 1, MAX_WIDTH)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_weights:
            if self.input != "embedding":
                raise ConfigError(
                    "tie_weights needs input='embedding' (a one-hot input has no weight to share)"
                )
            if self.input_size != self.num_hiddens:
                raise ConfigError(
                    f"tie_weights needs embed_size == num_hiddens, got embed_size={self.input_size} "
                    f"and num_hiddens={self.num_hiddens}; set embed_size={self.num_hiddens}"
                )
        _check_choice("init", self.init, INITS)
        if isinstance(self.forget_bias, bool) or not isinstance(self.forget_bias, (int, float)) or \
                not math.isfinite(self.forget_bias):
            raise ConfigError(f"forget_bias must be a finite number, got {self.forget_bias!r}")
        if self.forget_bias != 0 and self.cell != "lstm":
            raise ConfigError(
                f"forget_bias only applies to cell='lstm' (cell is {self.cell!r}); set it to 0"
            )
        _check_choice("gru_variant", self.gru_variant, GRU_VARIANTS)
        if self.gru_variant == "d2l":
            if self.cell != "gru":
                raise ConfigError(
                    f"gru_variant='d2l' only applies to cell='gru' (cell is {self.cell!r})"
                )
            if self.impl == "concise":
                raise ConfigError(
                    "gru_variant='d2l' has no torch.nn form; use impl='scratch' or gru_variant='torch'"
                )
        if self.layer_norm:
            if self.cell not in ("lstm", "gru"):
                raise ConfigError(f"layer_norm applies to cell='lstm' or 'gru' (cell is {self.cell!r})")
            if self.impl != "scratch":
                raise ConfigError("layer_norm has no torch.nn form; use impl='scratch' or layer_norm=False")
            if self.cell == "gru" and self.gru_variant != "torch":
                raise ConfigError("layer_norm needs gru_variant='torch' for cell='gru'")
        for name in ("embed_dropout", "input_dropout", "weight_drop", "zoneout_cell", "zoneout_hidden"):
            _check_rate(name, getattr(self, name))
        if self.zoneout:
            if self.cell != "lstm":
                raise ConfigError(f"zoneout_cell and zoneout_hidden apply to cell='lstm' (cell is {self.cell!r}); "
                                  "set both to 0")
            if self.impl != "scratch":
                raise ConfigError("zoneout_cell and zoneout_hidden have no torch.nn form; use impl='scratch' "
                                  "or set both to 0")
            if self.layer_norm:
                raise ConfigError("zoneout_cell and zoneout_hidden do not combine with layer_norm; set both to 0 "
                                  "or layer_norm=False")
        if self.output_dropout is not None:
            _check_rate("output_dropout", self.output_dropout)
        return self

    @property
    def zoneout(self) -> bool:
        """Whether zoneout is on (a rate for c or h above 0)."""
        return bool(self.zoneout_cell or self.zoneout_hidden)

    @property
    def out_dropout(self) -> float:
        """The dropout rate before the output layer (``output_dropout``, else ``dropout``)."""
        return self.dropout if self.output_dropout is None else self.output_dropout


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum:,}, got {value:,}")


def _check_rate(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
