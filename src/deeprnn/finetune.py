"""Fine-tuning a trained model on new text (char-rnn's ``-init_from``), with vocabulary growth.

The weights come from the parent checkpoint, not its optimiser state. Tokens of the new corpus
that the parent's vocabulary lacks either map to ``<unk>`` (counted and reported) or, with
``extend_vocab``, get new rows appended to every vocabulary-sized weight (embedding, one-hot input
projection, output layer); the old rows stay bit-identical, the new ones keep the fresh model's init.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from deeprnn.errors import ConfigError
from deeprnn.models import LanguageModel, build_model
from deeprnn.vocab import Vocab


def missing_tokens(parent: Vocab, fresh: Vocab) -> list[str]:
    """Tokens of ``fresh`` (a vocabulary of the new corpus) that ``parent`` lacks, most frequent first."""
    return [tok for tok in fresh.idx_to_token if tok != "<unk>" and tok not in parent.token_to_idx]


def extended_vocab(parent: Vocab, new_tokens: list[str], fresh: Vocab) -> Vocab:
    """``parent`` with ``new_tokens`` appended: every old index is unchanged."""
    d = parent.to_dict()
    freqs = dict(fresh.token_freqs)
    d["idx_to_token"] = list(d["idx_to_token"]) + list(new_tokens)
    d["token_freqs"] = list(d["token_freqs"]) + [[t, freqs.get(t, 0)] for t in new_tokens]
    return Vocab.from_dict(d)


def grow_model(model: LanguageModel, vocab_size: int) -> LanguageModel:
    """A copy of ``model`` for a larger vocabulary; old rows copied bit for bit, new rows freshly
    initialised. Every parameter whose shape differs only in one vocabulary-sized dimension grows."""
    old_v = model.config.vocab_size
    if vocab_size < old_v:
        raise ConfigError(f"vocab_size must not shrink when growing a model ({old_v} -> {vocab_size})")
    config = dataclasses.replace(model.config, vocab_size=vocab_size)
    grown = build_model(config).to(dtype=next(model.parameters()).dtype)
    old_sd = model.state_dict()
    new_sd = grown.state_dict()
    for name, new in new_sd.items():
        old = old_sd[name]
        if old.shape == new.shape:
            new.copy_(old)
            continue
        diff = [d for d in range(new.dim()) if old.shape[d] != new.shape[d]]
        if len(diff) != 1 or old.shape[diff[0]] != old_v or new.shape[diff[0]] != vocab_size:
            raise ConfigError(f"cannot grow parameter {name}: {tuple(old.shape)} -> {tuple(new.shape)}")
        new.narrow(diff[0], 0, old_v).copy_(old)
    grown.load_state_dict(new_sd)
    return grown


_LAYER_RE = re.compile(r"(?:^layers\.(\d+)\.|_l(\d+)$)")


def freeze_layers(model: LanguageModel, k: int, *, include_embedding: bool = True,
                  tied_trains: bool = True) -> list[str]:
    """Stop gradients to the ``k`` lowest recurrent layers (and the input embedding, which lies
    below them, when ``include_embedding``); returns the frozen parameter names. A tied embedding is the
    output layer's weight too: it stays trainable, since freezing it would freeze the output layer
    (``tied_trains=False``: frozen, as runs fine-tuned before this rule froze it)."""
    if k < 0 or k > model.config.num_layers:
        raise ConfigError(f"freeze_layers must be in [0, num_layers={model.config.num_layers}], got {k}")
    include_embedding = include_embedding and not (model.config.tie_weights and tied_trains)
    frozen = []
    for name, p in model.named_parameters():
        m = _LAYER_RE.search(name.split(".", 1)[-1] if name.startswith("rnn.") else name)
        layer = None
        if m:
            layer = int(m.group(1) if m.group(1) is not None else m.group(2))
        if (layer is not None and layer < k) or (k > 0 and include_embedding and name.startswith("embedding.")):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def count_unknown(tokens: torch.Tensor, vocab: Vocab) -> int:
    return int((tokens == vocab.unk).sum())
