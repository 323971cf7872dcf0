"""The values each string option takes, written once: the configurations check against these lists and the
command line offers them (``deeprnn train --help``). Free of torch, so the CLI can import it cheaply."""

from __future__ import annotations

# model (ModelConfig)
CELLS = ("rnn_tanh", "rnn_relu", "gru", "lstm")
IMPLS = ("concise", "scratch")
INPUTS = ("one_hot", "embedding")
INITS = ("d2l", "torch", "orthogonal")
GRU_VARIANTS = ("torch", "d2l")
# data and training (TrainConfig)
TOKENS = ("char", "word")
NORMALIZATIONS = ("d2l", "raw", "lower")
SAMPLINGS = ("sequential", "random")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "wsd", "step", "plateau")
PRECISIONS = ("auto", "fp32", "bf16")  # auto: bf16 where the device multiplies it natively, else fp32
ON_NAN = ("stop", "rollback")
