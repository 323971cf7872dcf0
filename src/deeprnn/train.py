"""The training loop: truncated BPTT, clipping, held-out evaluation, checkpoints, metrics, plots.

Library first: :func:`train` takes a :class:`TrainConfig`, returns a summary dict and reports
through a ``log`` callback; the command line only builds the config and calls it.

How the corpus is used (char level, ``d2l`` normalisation by default)::

    tokens:  |<------------- train (90%) ------------->|<- valid 5% ->|<- test 5% ->|
    train:   cut into B streams (sequential partitioning, random start offset per epoch)
             or random windows; each step sees a (B, T) window per stream
    valid:   cut into ``eval_batch_size`` contiguous streams, state carried across windows,
             cross-entropy summed over every predicted token (the < B tokens left over when
             the split does not divide evenly are not scored)
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deeprnn.choices import NORMALIZATIONS, ON_NAN, OPTIMIZERS, PRECISIONS, SAMPLINGS, SCHEDULES, TOKENS
from deeprnn.corpus import MAX_SOURCE_WEIGHT, known_encoding, unknown_encoding_message, valid_source_weight
from deeprnn.errors import CheckpointError, ConfigError, CorpusError, DeepRNNError, VocabError
from deeprnn.fields import check_types
from deeprnn.files import write_text_atomic
from deeprnn.precision import autocast_context, check_precision, precision_note, resolve_precision
from deeprnn.regularize import activation_penalty
from deeprnn.rundir import (CHECKPOINT_DIRS, METRIC_FIELDS, PLOT_EVERY_S, holds_run, prepare_run_dir, run_lock,
                            trim_metrics, write_plot)

LN2 = math.log(2.0)


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean cross-entropy in nats; ``inf`` where that overflows a float (loss > ~709.8)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (a NaN, an overflowed perplexity) replaced by ``None``: JSON has
    no NaN or Infinity, and files that hold them are rejected by strict parsers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _loss_or_inf(value: float | None) -> float:
    """A best loss read back from a checkpoint: ``None`` (JSON's stand-in for inf) is inf again."""
    return math.inf if value is None else float(value)


def _eval_counters(meta: dict, plateau: dict) -> tuple[float, int, int, dict]:
    """``best_val, bad_evals, evals_done, plateau`` as a checkpoint's meta saved them (``plateau``: the
    counters to keep where an older checkpoint has none)."""
    plateau = dict(meta.get("plateau", plateau))
    plateau["best"] = _loss_or_inf(plateau.get("best"))
    return _loss_or_inf(meta["best_val"]), meta["bad_evals"], meta["evals_done"], plateau


MAX_SAMPLE_TOKENS = 10_000  # num_preds: a sample printed at each evaluation and at the end, not a text to keep


@dataclass
class TrainConfig:
    """Every training option. The command line's flags map one to one onto these fields."""

    # data
    corpus: list[str] = field(default_factory=lambda: ["timemachine"])  # named corpora, files or dirs
    data_dir: str | None = None  # cache for named corpora (default: $DEEPRNN_DATA_DIR, else ~/.cache/deeprnn)
    encoding: str | None = None  # text encoding of user files (default: UTF-8, cp1252 detected)
    normalization: str = "d2l"  # d2l (book: letters only, lower case) | raw | lower
    token: str = "char"  # char | word
    min_freq: int = 0  # tokens rarer than this map to <unk>
    max_tokens: int | None = None  # keep only the first N tokens of the training split (default: all; book: 10000)
    val_fraction: float = 0.05  # contiguous validation split, after the training part
    test_fraction: float = 0.05  # contiguous test split at the end
    heldout_from: list[str] | None = None  # sources that give validation/test text (default: all)
    source_weights: list[float] | None = None  # per source, in order: repeat its training text W times (default 1)
    # model (see ModelConfig)
    cell: str = "lstm"  # rnn_tanh | rnn_relu | gru | lstm
    num_layers: int = 2  # L stacked recurrent layers
    num_hiddens: int = 256  # hidden units per layer
    impl: str = "concise"  # concise (torch.nn) | scratch (eq. 9.3.1)
    input: str = "embedding"  # one_hot (book) | embedding
    embed_size: int | None = None  # embedding size (default: num_hiddens)
    dropout: float = 0.3  # dropout between layers and before the output layer
    tie_weights: bool = False  # share embedding and output weights
    init: str = "torch"  # d2l | torch | orthogonal
    forget_bias: float = 0.0  # added to the LSTM forget-gate bias
    gru_variant: str = "torch"  # torch | d2l (reset gate before the recurrent product)
    residual: bool = False  # residual connections between stacked layers (layers 2..L)
    layer_norm: bool = False  # layer-normalised LSTM/GRU cells (impl scratch only)
    embed_dropout: float = 0.0  # embedding dropout: drop whole tokens of the input (AWD-LSTM)
    input_dropout: float = 0.0  # dropout on the first layer's input
    output_dropout: float | None = None  # dropout before the output layer (default: dropout)
    locked_dropout: bool = False  # variational dropout: one mask per sequence, shared across time
    weight_drop: float = 0.0  # DropConnect on the recurrent weights W_hh (AWD-LSTM weight-drop)
    zoneout_cell: float = 0.0  # zoneout: probability that an LSTM unit keeps its previous c (impl scratch)
    zoneout_hidden: float = 0.0  # zoneout: probability that an LSTM unit keeps its previous h (impl scratch)
    # batching
    batch_size: int = 32  # streams per step (global batch under DDP)
    num_steps: int = 64  # BPTT window length
    sampling: str = "sequential"  # sequential (state carried) | random (state re-initialised)
    # optimisation
    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 4e-3  # learning rate
    weight_decay: float = 0.0  # L2 (sgd/adam) or decoupled (adamw) weight decay
    momentum: float = 0.0  # SGD momentum
    beta1: float = 0.9  # Adam/AdamW first-moment decay
    beta2: float = 0.999  # Adam/AdamW second-moment decay
    clip: float = 1.0  # gradient clipping by global norm (theta); 0 disables
    schedule: str = "cosine"  # constant | cosine | wsd | step | plateau (decay after patience//2 bad evals; 2 if patience<2)
    warmup_steps: int = 0  # linear warm-up steps (cosine, wsd and constant schedules)
    min_lr_ratio: float = 0.05  # cosine and wsd floor as a fraction of lr
    decay_fraction: float = 0.2  # wsd (warm-up, stable, decay): the last fraction of the run decays linearly
    lr_step_size: int = 10  # step schedule: epochs between decays
    lr_gamma: float = 0.5  # step/plateau decay factor
    ar_alpha: float = 0.0  # activation regularisation: alpha * mean(h_top^2) added to the loss
    tar_beta: float = 0.0  # temporal activation regularisation: beta * mean((h_t - h_t-1)^2)
    variable_bptt: bool = False  # window length ~ N(num_steps, 5) (p=0.95, else half), lr scaled by len/num_steps
    partial_shuffle: bool = False  # rotate each stream by a random shift every epoch (Press 2019; sequential)
    ema_decay: float = 0.0  # evaluate and keep as best an EMA of the weights with this decay (0: off)
    ema_start: int = 0  # optimiser steps before the weight average starts
    # budget
    num_epochs: int = 24  # passes over the training split
    max_steps: int | None = None  # stop after this many steps (default: no limit)
    time_budget: float | None = None  # stop after this many minutes of training (default: no limit)
    patience: int = 0  # early stopping: evaluations without improvement (0: off)
    # evaluation and reporting
    eval_every: int = 0  # steps between evaluations (0: once per epoch)
    eval_batch_size: int = 64  # parallel streams when scoring a split
    eval_num_steps: int = 128  # window length when scoring a split
    sample_every: int = 10  # evaluations between samples while training (0: none; --num-preds 0: none at the end either)
    prefix: str = "time traveller"  # prefix of the printed samples
    num_preds: int = 50  # characters (tokens) per printed sample
    # execution
    seed: int = 0  # fixes data order, init, dropout and sampling
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; loss in fp32); auto: bf16 on an AVX-512 CPU or Ampere+ GPU
    run_dir: str | None = None  # where config, metrics, plot and checkpoints go (default runs/<name>)
    on_nan: str = "stop"  # stop | rollback (restore last checkpoint, halve lr)

    def __post_init__(self) -> None:
        # A pathlib.Path is the natural thing to pass from Python for a path field (run_dir, a corpus file):
        # kept as the str that config.json and the checkpoints record.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike) and f.type.startswith("str"):
                setattr(self, f.name, os.fspath(value))
            elif isinstance(value, (list, tuple)) and f.type.startswith("list[str]") \
                    and any(isinstance(v, os.PathLike) for v in value):
                setattr(self, f.name, [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value])

    def model_fields(self) -> dict[str, Any]:
        """The ModelConfig fields (all but vocab_size, which comes from the data), read off this config."""
        from deeprnn.models.config import ModelConfig  # torch-free

        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig) if f.name != "vocab_size"}

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name, options in (("token", TOKENS), ("normalization", NORMALIZATIONS), ("sampling", SAMPLINGS),
                              ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS),
                              ("on_nan", ON_NAN)):
            value = getattr(self, name)
            allowed = (f"'{options[0]}' or '{options[1]}'" if len(options) == 2 else
                       "one of " + ", ".join(options))
            need(value in options, f"{name} must be {allowed}, got {value!r}")
        need(not isinstance(self.seed, bool) and isinstance(self.seed, int) and 0 <= self.seed < 2**63,
             f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        # The ranges below compare numbers: types first, but for the fields whose own check takes any value.
        check_types(TrainConfig, {k: v for k, v in vars(self).items() if k not in ("seed", "source_weights")})
        need(self.encoding is None or known_encoding(self.encoding), unknown_encoding_message(self.encoding))
        need(self.run_dir is None or self.run_dir.strip() != "",
             "run_dir is empty; name a directory, or drop --run-dir for the default (runs/<name>)")
        need(self.data_dir is None or self.data_dir.strip() != "",
             "data_dir is empty; name a directory, or drop --data-dir for the default ($DEEPRNN_DATA_DIR, else "
             "~/.cache/deeprnn)")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.lr <= 3e38, f"lr must be <= 3e38 (what float32 weights can take), got {self.lr}")
        # inf passed the ranges below, and config.json and checkpoints then held a bare Infinity, which is not JSON
        finite = math.isfinite
        need(finite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(0 <= self.beta1 < 1, f"beta1 must be in [0, 1), got {self.beta1}")
        need(0 <= self.beta2 < 1, f"beta2 must be in [0, 1), got {self.beta2}")
        need(self.clip >= 0, f"clip must be >= 0 (0 disables clipping), got {self.clip}")
        need(finite(self.clip), f"clip must be finite (0 disables clipping), got {self.clip}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        need(self.lr_step_size >= 1, f"lr_step_size must be >= 1, got {self.lr_step_size}")
        need(0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        need(finite(self.ar_alpha) and self.ar_alpha >= 0, f"ar_alpha must be >= 0 and finite, got {self.ar_alpha}")
        need(finite(self.tar_beta) and self.tar_beta >= 0, f"tar_beta must be >= 0 and finite, got {self.tar_beta}")
        need(not self.variable_bptt or self.sampling == "sequential",
             "variable_bptt needs sampling='sequential' (random windows carry no state)")
        need(not self.partial_shuffle or self.sampling == "sequential",
             "partial_shuffle needs sampling='sequential' (random sampling already shuffles its windows)")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 disables), got {self.ema_decay}")
        need(self.ema_start >= 0, f"ema_start must be >= 0, got {self.ema_start}")
        need(self.num_epochs >= 1, f"num_epochs must be >= 1, got {self.num_epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        need(self.time_budget is None or self.time_budget > 0,
             f"time_budget must be > 0 minutes, got {self.time_budget}")
        need(self.time_budget is None or finite(self.time_budget),
             f"time_budget must be finite (leave it out for no time limit), got {self.time_budget}")
        need(self.patience >= 0, f"patience must be >= 0, got {self.patience}")
        need(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}")
        need(self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        need(self.eval_num_steps >= 1, f"eval_num_steps must be >= 1, got {self.eval_num_steps}")
        need(self.sample_every >= 0, f"sample_every must be >= 0, got {self.sample_every}")
        need(self.num_preds >= 0, f"num_preds must be >= 0, got {self.num_preds}")
        need(self.num_preds <= MAX_SAMPLE_TOKENS, f"num_preds must be <= {MAX_SAMPLE_TOKENS:,} (the sample printed "
             f"during training; deeprnn generate writes longer text), got {self.num_preds:,}")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(0 <= self.test_fraction < 1, f"test_fraction must be in [0, 1), got {self.test_fraction}")
        need(self.val_fraction + self.test_fraction < 1,
             "val_fraction + test_fraction must be < 1 to leave training text")
        need(self.max_tokens is None or self.max_tokens >= 2, f"max_tokens must be >= 2, got {self.max_tokens}")
        need(self.min_freq >= 0, f"min_freq must be >= 0, got {self.min_freq}")
        need(bool(self.corpus), "corpus must name at least one corpus, file or directory")
        need(self.source_weights is None or (
            isinstance(self.source_weights, (list, tuple))
            and all(valid_source_weight(w) for w in self.source_weights)),
             f"source_weights must be a list of numbers in (0, {MAX_SOURCE_WEIGHT:,}] (one per source), got "
             f"{self.source_weights}")
        from deeprnn.models import ModelConfig  # the model fields too, before any text is read

        ModelConfig(vocab_size=1, **self.model_fields()).validate()

    def unused_options(self) -> list[tuple[str, str, str]]:
        """The fields set away from their defaults that this configuration never reads, as ``(field, the field
        it depends on, what that field must be)``: ``momentum`` with Adam, ``ema_start`` without a weight
        average, ``lr_gamma`` under a cosine. The command line refuses them when the user gave them."""
        defaults = TrainConfig()
        out = []
        for name, on, works_with in UNUSED_UNLESS:
            if getattr(self, name) != getattr(defaults, name) and getattr(self, on) not in works_with:
                out.append((name, on, " or ".join(repr(v) for v in works_with)))
        if self.ema_start != defaults.ema_start and self.ema_decay == 0:
            out.append(("ema_start", "ema_decay", "> 0 (a weight average, e.g. 0.998)"))
        if self.residual and self.num_layers == 1:
            out.append(("residual", "num_layers", "> 1 (the connections join stacked layers)"))
        return out


def unused_option_message(cfg: TrainConfig, on: str, needs: str, given: str, fix: str, whence: str = "") -> str:
    """The one line that refuses an option ``cfg`` never reads (an entry of :meth:`TrainConfig.unused_options`),
    as the user gave it (``given``: ``--momentum 0.9``, ``--set momentum=0.9``) with that command's ``fix``."""
    return f"{given} has no effect with {on} {getattr(cfg, on)!r}{whence}; it is read only with {on} {needs}: {fix}"


# TrainConfig fields read only when another field takes one of some values: (field, the other field, its values)
UNUSED_UNLESS = (
    ("momentum", "optimizer", ("sgd",)),
    ("beta1", "optimizer", ("adam", "adamw")),
    ("beta2", "optimizer", ("adam", "adamw")),
    ("warmup_steps", "schedule", ("constant", "cosine", "wsd")),
    ("min_lr_ratio", "schedule", ("cosine", "wsd")),
    ("decay_fraction", "schedule", ("wsd",)),
    ("lr_step_size", "schedule", ("step",)),
    ("lr_gamma", "schedule", ("step", "plateau")),
)


# Fields a resumed run may change: budgets and reporting. Everything else shapes the computation.
RESUME_MAY_CHANGE = frozenset({
    "num_epochs", "max_steps", "time_budget", "patience", "eval_every", "sample_every", "prefix",
    "num_preds", "device", "run_dir", "data_dir", "on_nan", "eval_batch_size", "eval_num_steps",
})


# Fields that name sources: compared by the files they lead to, so that a run can be resumed from another
# directory with the same files spelled another way (a run stores them as absolute paths).
SOURCE_FIELDS = ("corpus", "heldout_from")


def check_resumable(cfg: TrainConfig, saved: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume with options that would silently change the computation."""
    from deeprnn.corpus import same_sources

    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE:
            continue
        # A field the run does not know is newer than the run: it trained as the field's default does.
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        new, old = getattr(cfg, f.name), saved.get(f.name, default)
        if isinstance(new, tuple):
            new = list(new)
        if f.name in SOURCE_FIELDS and same_sources(new, old):
            continue
        if new != old:
            hint = "resume without changing it, or start a new run"
            if f.name in SOURCE_FIELDS and any(_relative_elsewhere(s) for s in old or []):
                hint = "the run names its files relative to the directory it was started in: resume from there"
            raise ConfigError(f"{f.name} differs from the run in {run_dir} ({old!r} there, {new!r} now); {hint}")


def _relative_elsewhere(spec: str) -> bool:
    """Whether ``spec`` is a relative path (what runs of older deeprnn versions stored) that leads
    nowhere from the current directory: the run was probably started in another one."""
    from deeprnn.corpus import NAMED_CORPORA

    path = os.path.expanduser(spec)
    return spec not in NAMED_CORPORA and not os.path.isabs(path) and not os.path.exists(path)


def corpus_record(tokens: torch.Tensor) -> dict[str, Any]:
    """The token stream a run trains and scores on, as its checkpoints record it: count and SHA-256 of the ids."""
    import hashlib

    ids = tokens.contiguous().cpu().numpy()
    digest = hashlib.sha256(str(ids.dtype).encode() + b":")
    digest.update(memoryview(ids).cast("B"))  # no copy of the stream
    return {"tokens": int(tokens.numel()), "sha256": digest.hexdigest()}


def _first_few(tokens: list[str], n: int = 3) -> str:
    return ", ".join(map(repr, tokens[:n])) + (", …" if len(tokens) > n else "")


RESUME_ON_ITS_TEXT = "resume with the text the run was trained on, or start a new run"


def corpus_changed(run_dir: Path, how: str, fix: str = RESUME_ON_ITS_TEXT) -> str:
    """The message for a resume (or an evaluation) on text other than the run's own; ``how`` says what changed,
    ``fix`` what to do ("": the caller says)."""
    return f"the corpus has changed since the run in {run_dir} started ({how})" + (f"; {fix}" if fix else "")


def check_same_corpus(saved: dict[str, Any] | None, now: dict[str, Any], run_dir: Path,
                      fix: str = RESUME_ON_ITS_TEXT) -> None:
    """Refuse to resume (or score a run's splits) on text other than the run's own: the splits, best/ and the
    "exact resume" would all silently change. Checkpoints written before the record existed (``saved`` None) are
    not checked."""
    if saved is None or saved == now:
        return
    how = (f"{saved['tokens']:,} tokens then, {now['tokens']:,} now" if saved["tokens"] != now["tokens"] else
           f"the same {now['tokens']:,} tokens, but not the same text")
    raise CorpusError(corpus_changed(run_dir, how, fix))


def check_budget_left(cfg: TrainConfig, run_dir: Path, *, step: int, train_time: float = 0.0,
                      epochs: int | None = None) -> None:
    """Refuse to resume a run that has already used up its budget: ``step`` steps taken (``max_steps``),
    ``train_time`` seconds trained (``time_budget``, in minutes), or ``epochs`` whole epochs trained
    (``num_epochs``; None: not known yet). There is nothing to train, and carrying on would only take one
    more step, score the test split again and rewrite the summary."""
    if cfg.max_steps is not None and step >= cfg.max_steps:
        raise ConfigError(f"the run in {run_dir} is already at step {step}, at or past max_steps {cfg.max_steps}: "
                          f"nothing to train; resume with --max-steps above {step} to train on")
    if cfg.time_budget is not None and train_time >= cfg.time_budget * 60:
        minutes = f"{math.ceil(train_time / 60 * 1e4) / 1e4:g}"  # rounded up: "above" it is enough
        raise ConfigError(f"the run in {run_dir} has already trained {minutes} minutes, at or past time_budget "
                          f"{cfg.time_budget:g}: nothing to train; resume with --time-budget above {minutes} to "
                          "train on")
    if epochs is not None and epochs >= cfg.num_epochs:
        raise ConfigError(f"the run in {run_dir} has already trained {epochs} epochs, at or past num_epochs "
                          f"{cfg.num_epochs}: nothing to train; resume with --num-epochs above {epochs} to train on")


def saved_train_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig a run was started with (from its last checkpoint)."""
    from deeprnn.checkpoint import read_meta, resolve_checkpoint

    check_resume_target(Path(run_dir))
    meta = read_meta(resolve_checkpoint(run_dir, prefer="last"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in meta.get("train_config", {}).items() if k in known})


def check_resume_target(run_dir: Path) -> None:
    """``--resume`` continues a run from its ``last/`` checkpoint; a checkpoint directory (a run's ``best/``)
    is refused, since resuming it would write a run inside it."""
    from deeprnn.checkpoint import META_FILE

    if not (run_dir / META_FILE).is_file():
        return
    if run_dir.name in CHECKPOINT_DIRS and holds_run(run_dir.parent):
        raise CheckpointError(f"{run_dir} is a checkpoint inside the run {run_dir.parent}; --resume takes the run "
                              f"directory and continues from its last checkpoint: --resume {run_dir.parent}")
    raise CheckpointError(f"{run_dir} is a checkpoint directory, not a run; --resume takes a run directory "
                          f"(to train on from these weights: --init-from {run_dir})")


class TrainingInterrupted(DeepRNNError):
    """Raised after SIGINT/SIGTERM (or :func:`request_stop`) once the current step finished and a checkpoint
    was written."""

    def __init__(self, signum: int, run_dir: Path, resume_with: str | None = None):
        self.signum = signum
        self.run_dir = run_dir
        # SIGPIPE: deeprnn ignores the signal (Python does) and stops when a write meets the closed pipe
        why = "standard output was closed" if signum == signal.SIGPIPE else f"{signal.Signals(signum).name} received"
        resume_with = resume_with or f"deeprnn train --resume {run_dir}"
        super().__init__(f"{why}: checkpoint saved; resume with: {resume_with}")


class NonFiniteLoss(DeepRNNError):
    """The loss or the gradients became NaN or infinite (``on_nan="stop"``, or rollbacks exhausted)."""


MAX_NAN_ROLLBACKS = 3  # on_nan="rollback": consecutive rollbacks (no good evaluation between) allowed
NAN_CHECK_EVERY = 50  # steps between non-finite checks on an accelerator (each check is a host sync)


def nan_check_interval(device: torch.device, world_size: int = 1) -> int:
    """Steps between reads of the on-device non-finite flag (evaluations always read it).

    Reading it is free on a lone CPU process; on an accelerator, or across ranks, it costs a host
    sync (or an all-reduce), so there it happens every :data:`NAN_CHECK_EVERY` steps.
    """
    return 1 if device.type == "cpu" and world_size == 1 else NAN_CHECK_EVERY


# ----------------------------------------------------------------------------------------------
# helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit device is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):  # torch also parses meta, xpu, hpu, …
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if dev.type == "cpu":
        return torch.device("cpu")  # cpu:0 is the same device, and compares unequal to the model's "cpu"
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} requested but there are {torch.cuda.device_count()} CUDA devices "
                          "(cuda:0 is the first); use --device cuda or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device 'mps' requested but MPS is not available; use --device cpu or auto")
    return dev


def lr_at(cfg: TrainConfig, step: int, total_steps: int | None, elapsed_fraction: float | None) -> float:
    """Learning-rate multiplier-free schedule value at optimiser step ``step`` (0-based).

    The run's progress is ``elapsed_fraction`` of the time budget when there is one, else the steps after the
    warm-up over ``total_steps``. Cosine anneals over all of it; wsd holds lr and decays linearly to the floor
    over its last ``decay_fraction`` (warm-up, stable, decay: no schedule length to guess the length of)."""
    base = cfg.lr
    if cfg.schedule in ("cosine", "wsd", "constant") and cfg.warmup_steps and step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule in ("cosine", "wsd"):
        if elapsed_fraction is not None:
            frac = elapsed_fraction
        elif total_steps:
            frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        else:
            frac = 0.0
        frac = min(max(frac, 0.0), 1.0)
        floor = base * cfg.min_lr_ratio
        if cfg.schedule == "wsd":
            return base - (base - floor) * max(0.0, frac - (1 - cfg.decay_fraction)) / cfg.decay_fraction
        return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * frac))
    return base


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def sequence_loss(logits: torch.Tensor, Y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of time-major logits ``(T, B, V)`` against targets ``Y`` of shape ``(B, T)``."""
    V = logits.shape[-1]
    if logits.dtype in (torch.bfloat16, torch.float16):  # the loss is always taken in >= fp32
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, V), Y.T.reshape(-1), reduction=reduction)


def quiet_sample(model, vocab, prefix: str, num_preds: int, device) -> str:
    """Greedy sample of ``num_preds`` tokens for progress output. Prefix tokens outside the vocabulary raise
    :class:`VocabError`, as ``deeprnn generate`` refuses them (see :func:`prefix_note`)."""
    from deeprnn.generate import generate

    return generate(model, vocab, prefix, num_preds, device=device, unk="error")[0]


def prefix_note(vocab, prefix: str, normalization: str | None = None) -> str | None:
    """Why there is no sample for ``prefix`` (one line), or None when every prefix token is in ``vocab``;
    with the run's ``normalization``, what the prefix is after it, when that would do."""
    from deeprnn.generate import unknown_prefix_hint, unknown_tokens, word_tokens

    word = vocab.token == "word"
    missing = unknown_tokens(vocab, word_tokens(vocab, prefix) if word else list(prefix))
    if not missing:
        return None
    kind = "words" if word else "characters"
    return (f"no sample: the prefix {prefix!r} has {kind} not in the vocabulary: "
            f"{', '.join(repr(t) for t in missing)}{unknown_prefix_hint(vocab, missing, prefix, normalization)}; "
            f"pass --prefix with {kind} of the training text")


# The fewest tokens a held-out split needs to be scored (heldout_streams).
MIN_HELDOUT_TOKENS = 3


def heldout_streams(tokens: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``tokens`` cut into ``batch_size`` contiguous streams (fewer for a short text): inputs and next-token
    targets, each ``(B, L)``, every prediction after a stream's first token scored once. None below
    ``MIN_HELDOUT_TOKENS``."""
    n = tokens.numel()
    if n < MIN_HELDOUT_TOKENS:
        return None
    B = max(1, min(batch_size, (n - 1) // 2))
    L = (n - 1) // B
    return tokens[: B * L].view(B, L), tokens[1 : B * L + 1].view(B, L)


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    *,
    batch_size: int = 64,
    num_steps: int = 128,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int]:
    """Sum of next-token cross-entropy (nats) over ``tokens`` and the number of tokens scored.

    The split is cut into ``batch_size`` contiguous streams, scored window by window with the
    hidden state carried, so every predicted token after the first of each stream is scored
    exactly once. Under data parallelism each rank scores its own streams; the caller sums.
    """
    device = torch.device(device)
    streams = heldout_streams(tokens, batch_size)
    if streams is None:
        return 0.0, 0
    streams_x, streams_y = streams
    B = streams_x.shape[0]
    lo, hi = rank * B // world_size, (rank + 1) * B // world_size
    streams_x, streams_y = streams_x[lo:hi], streams_y[lo:hi]
    if streams_x.shape[0] == 0:
        return 0.0, 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    for logits, Y in heldout_windows(model, streams_x, streams_y, num_steps=num_steps, device=device,
                                     precision=precision):
        total += sequence_loss(logits, Y, reduction="sum").double()
    return float(total), streams_x.numel()


def heldout_windows(model: torch.nn.Module, streams_x: torch.Tensor, streams_y: torch.Tensor, *, num_steps: int,
                    device: torch.device, precision: str):
    """Yields ``(logits (T, B, V), targets (B, T))`` for each window of ``num_steps`` of the streams
    (``heldout_streams``), the state carried from window to window, the model in eval mode (its mode is
    restored when the loop ends). The caller chooses the gradient mode."""
    was_training = model.training
    model.eval()
    state = model.begin_state(streams_x.shape[0], device=device)
    try:
        for s in range(0, streams_x.shape[1], num_steps):
            X = streams_x[:, s : s + num_steps].to(device).long()
            Y = streams_y[:, s : s + num_steps].to(device).long()
            with autocast_context(device, precision):
                logits, state = model(X, state)
            yield logits, Y
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------
# the loop


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    active: "_SignalFlag | None" = None  # the flag of the training loop now running, for request_stop

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        _SignalFlag.active = self
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        _SignalFlag.active = None
        for s, h in self._old.items():
            signal.signal(s, h)


def request_stop(signum: int) -> bool:
    """Stop the training loop now running as if ``signum`` had arrived: after the current step it evaluates,
    writes ``last/`` and raises :class:`TrainingInterrupted`. False when no training loop is running."""
    flag = _SignalFlag.active
    if flag is None:
        return False
    if flag.signum is None:
        flag.signum = signum
    return True


RANK_SEED_STRIDE = 1_000_003


def _rng_key(rank: int) -> str:
    return "rng.torch" if rank == 0 else f"rng.torch.rank{rank}"


def _restore_rng(tensors: dict[str, torch.Tensor], rank: int, device: torch.device, fallback_seed: int) -> None:
    """This rank's CPU (and CUDA) generator from a checkpoint; a rank the checkpoint did not have
    (resumed with more processes) gets a fresh seed of its own."""
    key = _rng_key(rank)
    if key in tensors:
        torch.set_rng_state(tensors[key])
    else:
        torch.manual_seed(fallback_seed)  # seeds the CUDA generators too
    cuda_key = key.replace("rng.torch", "rng.cuda")
    if device.type == "cuda":
        if cuda_key in tensors:
            torch.cuda.set_rng_state(tensors[cuda_key])
        elif rank > 0:  # an older checkpoint kept rank 0's alone: a rank's own seed, not rank 0's masks again
            torch.cuda.manual_seed(fallback_seed)


def _rng_states() -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's CPU generator and, where CUDA is in use, its current device's."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def _rng_tensors(states: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """Each rank's generators (``states`` in rank order) as checkpoint tensors: ``rng.torch``/``rng.cuda`` for
    rank 0, ``rng.torch.rankR``/``rng.cuda.rankR`` for the others (dropout masks differ by rank)."""
    out = {}
    for rank, (cpu, cuda) in enumerate(states):
        key = _rng_key(rank)
        out[key] = cpu
        if cuda is not None:
            out[key.replace("rng.torch", "rng.cuda")] = cuda
    return out


def _state_tensors(state) -> dict[str, torch.Tensor]:
    if state is None:
        return {}
    if isinstance(state, tuple):
        return {"carry.h": state[0].detach(), "carry.c": state[1].detach()}
    return {"carry.h": state.detach()}


def _batches_in_epoch(loader, epoch: int) -> int:
    """Batches in ``epoch``: ``len(loader)``, or as many as the epoch's drawn windows for variable-length ones."""
    lengths = getattr(loader, "window_lengths", None)
    return len(lengths(epoch)[1]) if lengths is not None else len(loader)


def _state_from_tensors(t: dict[str, torch.Tensor], device: torch.device, shape: tuple[int, int, int], where: Path):
    """The carried hidden state saved in a checkpoint, which must be ``shape`` = (L, B, H) for the run."""
    if "carry.h" not in t:
        return None
    parts = [t[k] for k in ("carry.h", "carry.c") if k in t]
    if any(tuple(p.shape) != shape for p in parts):
        raise CheckpointError(f"{where} carries a hidden state of shape {tuple(parts[0].shape)} where the run needs "
                              f"{shape} (layers, batch, hidden units); it is corrupt or was edited")
    h, *c = (p.to(device) for p in parts)
    return (h, c[0]) if c else h


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    init_from: str | None = None,
    extend_vocab: bool = False,
    freeze_layers: int = 0,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train a model as ``cfg`` says; returns the run summary (also written to ``summary.json``).

    ``resume=True`` continues the run in ``cfg.run_dir`` exactly where its last checkpoint left
    off (same losses as an uninterrupted run); ``cfg`` must equal the run's own config except for
    budget and reporting fields (:data:`RESUME_MAY_CHANGE`). ``stop_after_steps`` pauses the run
    after that many steps in total (a ``last/`` checkpoint is written; nothing is evaluated unless the
    step is an evaluation's), as an interruption would, without changing the schedule. One process trains a run at a time: the run
    directory is locked (:func:`run_lock`) while it trains. Raises :class:`DeepRNNError` subclasses on bad
    input, :class:`TrainingInterrupted` after SIGINT/SIGTERM (checkpoint written).
    """
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"train() needs a TrainConfig, got {type(cfg).__name__}; build one with "
                          "TrainConfig(**options)")
    with contextlib.ExitStack() as held:  # the run directory's lock, released however training ends
        return _train(cfg, held, resume=resume, overwrite=overwrite, progress=progress, log=log, init_from=init_from,
                      extend_vocab=extend_vocab, freeze_layers=freeze_layers, stop_after_steps=stop_after_steps)


def _train(
    cfg: TrainConfig,
    held: contextlib.ExitStack,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
    init_from: str | None,
    extend_vocab: bool,
    freeze_layers: int,
    stop_after_steps: int | None,
) -> dict[str, Any]:
    """:func:`train`, with ``held`` to keep the run directory's lock in until it returns: it checks what it
    can before reading text, reads the corpus, builds the model and the run directory, then hands them to
    :class:`_Training`."""
    from deeprnn import distributed as dist_util
    from deeprnn.allocator import keep_freed_memory

    cfg.validate()
    keep_freed_memory()  # glibc: no page faults on every window's fresh activations (deeprnn.allocator)
    if (extend_vocab or freeze_layers) and init_from is None:
        raise ConfigError("--extend-vocab and --freeze-layers need --init-from RUN_OR_CHECKPOINT")
    dist = dist_util.current()
    is_main = dist.rank == 0
    if not is_main:
        progress = False
        log = lambda *_a, **_k: None  # noqa: E731

    resume_ckpt = _resume_checkpoint(cfg, held, is_main) if resume else None
    device = resolve_device(cfg.device) if dist.device is None else dist.device
    auto_precision = cfg.precision == "auto"
    cfg.precision = resolve_precision(cfg.precision, device)  # config.json records what auto became
    torch.manual_seed(cfg.seed)

    corpus, parent = _read_corpus(cfg, resume_ckpt, init_from, extend_vocab, freeze_layers, log)
    data_record = corpus_record(corpus.tokens)
    if resume_ckpt is not None:
        check_same_corpus(resume_ckpt.meta.get("data"), data_record, Path(cfg.run_dir))
    splits = corpus.split((1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction),
                          heldout_from=cfg.heldout_from, train_weights=cfg.source_weights)
    corpus_label = ", ".join(cfg.corpus)
    if resume_ckpt is None:
        from deeprnn.corpus import absolute_spec

        # The run's config names files by absolute path, so that it can be resumed and evaluated from anywhere.
        cfg.corpus = [absolute_spec(s) for s in cfg.corpus]
        if cfg.heldout_from is not None:
            cfg.heldout_from = [absolute_spec(s) for s in cfg.heldout_from]
    loader, train_tokens = _training_loader(cfg, corpus, splits, dist, resume_ckpt)
    _check_splits(cfg, corpus, splits, resuming=resume_ckpt is not None)

    model = _run_model(cfg, corpus.vocab, resume_ckpt, parent, freeze_layers, extend_vocab, log)
    resuming = {} if resume_ckpt is None else {
        "fix": f"the run in {cfg.run_dir} trained in bf16: resume it on a machine with AVX-512 or a GPU"}
    check_precision(cfg.precision, device, model.config.cell, model.config.impl, **resuming)  # before the run dir
    model.to(device)
    model.train()
    if model.config.impl == "scratch" and device.type == "cpu":
        from deeprnn.models import native

        native.load()  # a first build (~15 s) happens here, not inside the timed steps or the time budget
    net = dist.wrap(model)
    if dist.rank > 0 and resume_ckpt is None:
        # Weights are equal on every rank (same seed); dropout masks must not be.
        torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * dist.rank)

    lineage = {  # what every checkpoint of the run says of the run it was fine-tuned from
        # tied_embedding_trains: a tied embedding stayed trainable under --freeze-layers (runs before it: frozen)
        "finetune": ({"freeze_layers": freeze_layers, "extend_vocab": extend_vocab, "tied_embedding_trains": True}
                     if parent is not None
                     else (resume_ckpt.meta.get("finetune") if resume_ckpt is not None else None)),
        # by absolute path, as the corpus files: info follows the lineage from any directory
        "parent": (os.path.abspath(parent.path) if parent is not None else
                   (resume_ckpt.meta.get("parent") if resume_ckpt is not None else None)),
    }
    run = _Training(cfg, dist=dist, device=device, model=model, net=net, vocab=corpus.vocab, splits=splits,
                    loader=loader, records=lineage | {"data": data_record}, log=log, stop_after_steps=stop_after_steps)
    if resume_ckpt is not None:
        run.resume(resume_ckpt)
        if is_main:
            trim_metrics(Path(cfg.run_dir) / "metrics.csv", run.step)
        log(f"resuming {cfg.run_dir} at step {run.step} (epoch {run.epoch_done:g})")
        run_dir = Path(cfg.run_dir)
    else:
        run_dir = prepare_run_dir(cfg, overwrite=overwrite, held=held) if is_main else Path(cfg.run_dir or "runs/_")
        cfg.run_dir = str(run_dir)
        if is_main:
            (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    # Every rank names rank 0's run directory (the default name has a time stamp) once it exists.
    run.run_dir = Path(dist.broadcast_object(str(run_dir)))

    if is_main and run.step == 0:
        log(f"corpus: {corpus_label} — {corpus.tokens.numel():,} {cfg.token}s, vocabulary {len(corpus.vocab)}; "
            f"train {train_tokens.numel():,} / valid {splits.valid.numel():,} / test {splits.test.numel():,}")
        trainable = f" ({run.n_params:,} trainable)" if run.n_params != run.n_total else ""
        log(f"model: {cfg.impl} {cfg.cell} {cfg.num_layers}x{cfg.num_hiddens}, {run.n_total:,} parameters"
            f"{trainable}; {cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}x{cfg.num_steps}, {device}, "
            f"{cfg.precision}{' (auto)' if auto_precision else ''}; run dir {run.run_dir}")
        note = precision_note(device, cfg.precision, model.config.impl)
        if note:
            log(note)
    run.run(progress, first_run=resume_ckpt is None)
    return run.finish()


def _resume_checkpoint(cfg: TrainConfig, held: contextlib.ExitStack, is_main: bool):
    """The last checkpoint of the run in ``cfg.run_dir``, locked (rank 0) and checked before any text is read:
    it holds a training state, ``cfg`` may resume it (taking the run's own sources and what its ``auto``
    precision became), and its budget is not spent."""
    from deeprnn.checkpoint import RESUME_RECORDS, holds_checkpoint, load_checkpoint

    if not cfg.run_dir:
        raise ConfigError("resume needs a run directory (--resume RUN_DIR)")
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist" if not run_dir.exists()
                              else f"cannot resume: {run_dir} is a file; --resume takes the run directory")
    check_resume_target(run_dir)
    if is_main:  # locked before reading a checkpoint that another process may be writing
        held.enter_context(run_lock(run_dir, resume=True))
    if not any(holds_checkpoint(run_dir / name) for name in ("last", ".last.old")):
        best = holds_checkpoint(run_dir / "best")
        # best/ is where validation was lowest, not where training stopped (with --ema-decay, not even the
        # weights that trained): resuming from it silently went back in time, and dropped metrics.csv's later rows.
        raise CheckpointError(
            f"cannot resume {run_dir}: it has no last/ checkpoint (where training stopped)"
            + ("; its best/ holds the best weights, not the training state to go on from: fine-tune from them with "
               f"--init-from {run_dir / 'best'}, or start the run again with --overwrite" if best else
               "; start the run again with --overwrite"))
    ckpt = load_checkpoint(run_dir, prefer="last")
    if not {"position", "loader", "optimizer"} <= ckpt.meta.keys() or "rng.torch" not in ckpt.train_tensors:
        raise CheckpointError(f"{ckpt.path} holds weights but no training state to resume; "
                              "fine-tune from it with --init-from instead")
    missing = [f"{part}.{name}" for part, names in RESUME_RECORDS.items() for name in names
               if name not in ckpt.meta[part]]  # read_meta checked the types of those present
    if missing:
        raise CheckpointError(f"{ckpt.path / 'checkpoint.json'} lacks {', '.join(missing)}; it is corrupt "
                              "or was edited")
    saved = ckpt.meta.get("train_config", {})
    if cfg.precision == "auto" and saved.get("precision") in PRECISIONS:
        cfg.precision = saved["precision"]  # what auto became when the run started
    check_resumable(cfg, saved, run_dir)
    for name in SOURCE_FIELDS:  # the same sources: keep the names the run's spans and heldout_from use
        if name in saved:
            setattr(cfg, name, saved[name])
    position = ckpt.meta["position"]
    check_budget_left(cfg, run_dir, step=position["step"], train_time=position["train_time"])
    return ckpt


def _read_corpus(cfg: TrainConfig, resume_ckpt, init_from: str | None, extend_vocab: bool, freeze_layers: int,
                 log: Callable[[str], None]):
    """``(corpus, parent)``: the run's text in its vocabulary (a resumed run's own, checked against the text;
    a fine-tuned run's parent's, extended with ``extend_vocab``; else the corpus's), and the checkpoint
    ``init_from`` names, loaded (``None`` without one). Fine-tuning copies the parent's model fields into
    ``cfg``, so that config.json tells the truth."""
    from deeprnn.corpus import build_corpus

    build = dict(token=cfg.token, normalization=cfg.normalization, min_freq=cfg.min_freq,
                 data_dir=cfg.data_dir, encoding=cfg.encoding)
    if resume_ckpt is not None:
        vocab = resume_ckpt.vocab
        corpus = build_corpus(cfg.corpus, vocab=None, **build)
        if corpus.vocab.idx_to_token != vocab.idx_to_token:
            if resume_ckpt.meta.get("parent") is None:
                new = sorted(set(corpus.vocab.idx_to_token) - set(vocab.idx_to_token))
                gone = sorted(set(vocab.idx_to_token) - set(corpus.vocab.idx_to_token))
                how = "; ".join([f"new tokens {_first_few(new)}"] * bool(new) +
                                [f"tokens gone {_first_few(gone)}"] * bool(gone)) \
                    or f"the same {len(vocab)} tokens in another order of frequency"
                raise VocabError(corpus_changed(Path(cfg.run_dir), how))
            corpus = build_corpus(cfg.corpus, vocab=vocab, **build)  # fine-tuned: the parent's vocabulary
        return corpus, None
    if init_from is None:
        return build_corpus(cfg.corpus, vocab=None, **build), None

    from deeprnn.checkpoint import load_checkpoint
    from deeprnn.finetune import count_unknown, extended_vocab, grow_model, missing_tokens

    parent = load_checkpoint(init_from)
    n_layers = parent.model.config.num_layers
    if not 0 <= freeze_layers <= n_layers:  # before any text is read
        raise ConfigError(f"--freeze-layers must be in [0, {n_layers}] (the number of layers of the model in "
                          f"{init_from}), got {freeze_layers}")
    if parent.vocab.token != cfg.token:
        raise ConfigError(f"token must match the parent checkpoint's ({parent.vocab.token!r}) when fine-tuning; "
                          f"pass --token {parent.vocab.token}, or train a new model without --init-from")
    fresh = build_corpus(cfg.corpus, vocab=None, **build)
    new_tokens = missing_tokens(parent.vocab, fresh.vocab)
    vocab = parent.vocab
    if extend_vocab and new_tokens:
        vocab = extended_vocab(parent.vocab, new_tokens, fresh.vocab)
        parent.model = grow_model(parent.model, len(vocab))
        log(f"fine-tuning from {parent.path}: vocabulary extended by {len(new_tokens)} tokens "
            f"({len(parent.vocab)} -> {len(vocab)})")
    corpus = build_corpus(cfg.corpus, vocab=vocab, **build)
    n_unk = count_unknown(corpus.tokens, vocab)
    if not extend_vocab:
        log(f"fine-tuning from {parent.path}: {n_unk:,} tokens of the new corpus are not in the parent's "
            f"vocabulary and map to <unk> ({len(new_tokens)} distinct; --extend-vocab adds them)")
    for name, value in dataclasses.asdict(parent.model.config).items():
        if hasattr(cfg, name) and name != "vocab_size":
            setattr(cfg, name, value)
    return corpus, parent


def _training_loader(cfg: TrainConfig, corpus, splits, dist, resume_ckpt):
    """``(loader, train_tokens)``: this rank's batches of the training split (cut to ``max_tokens``); a resumed
    run's epoch budget is checked against the loader's epochs."""
    from deeprnn.batching import BatchLoader
    from deeprnn.regularize import VariableLengthLoader

    train_tokens = splits.train
    if cfg.max_tokens is not None:
        train_tokens = train_tokens[: cfg.max_tokens]
    loader_cls = VariableLengthLoader if cfg.variable_bptt else BatchLoader
    cut = f"--max-tokens {cfg.max_tokens}; " if train_tokens.numel() < splits.train.numel() else ""
    if cfg.source_weights is not None and any(w < 1 for w in cfg.source_weights):  # weights below 1 cut text too
        cut = f"--source-weights {' '.join(f'{w:g}' for w in cfg.source_weights)}; " + cut
    loader = loader_cls(train_tokens, cfg.batch_size, cfg.num_steps, mode=cfg.sampling, seed=cfg.seed,
                        rank=dist.rank, world_size=dist.world_size, partial_shuffle=cfg.partial_shuffle,
                        what="the training split",
                        sizes=f" ({cut}the corpus has {corpus.tokens.numel()})")
    if resume_ckpt is not None:  # a last/ saved after an epoch's last batch has trained that epoch too
        at = resume_ckpt.meta["loader"]
        check_budget_left(cfg, Path(cfg.run_dir), step=resume_ckpt.meta["position"]["step"],
                          epochs=at["epoch"] + (at["batch"] >= _batches_in_epoch(loader, at["epoch"])))
    return loader, train_tokens


def _check_splits(cfg: TrainConfig, corpus, splits, *, resuming: bool) -> None:
    """Refuse, before anything is written, a vocabulary of ``<unk>`` alone and held-out splits too short to score."""
    if cfg.min_freq > 0 and len(corpus.vocab) == 1:
        raise ConfigError(f"vocabulary has only <unk> after --min-freq {cfg.min_freq} (no token occurs that "
                          "often); lower --min-freq")
    # Validation picks best/, drives early stopping and the plateau schedule: a run without it would report
    # numbers for a checkpoint it never wrote.
    if heldout_streams(splits.valid, cfg.eval_batch_size) is None:
        raise ConfigError(
            "--val-fraction 0 leaves no validation text; training needs some to keep the best checkpoint: "
            "use e.g. --val-fraction 0.05" if cfg.val_fraction == 0 else
            f"the validation split has {splits.valid.numel()} tokens (--val-fraction {cfg.val_fraction:g}); "
            f"it needs at least {MIN_HELDOUT_TOKENS}: raise --val-fraction or use more text")
    # A test split asked for but too short to score would fail only after the whole run has trained.
    # (Runs that started before this check resume as they trained: without a test score.)
    if not resuming and cfg.test_fraction > 0 and heldout_streams(splits.test, cfg.eval_batch_size) is None:
        raise ConfigError(
            f"the test split has {splits.test.numel()} tokens (--test-fraction {cfg.test_fraction:g}); it needs at "
            f"least {MIN_HELDOUT_TOKENS} to be scored: raise --test-fraction, use more text, or --test-fraction 0 "
            "for none")


def _run_model(cfg: TrainConfig, vocab, resume_ckpt, parent, freeze_layers: int, extend_vocab: bool,
               log: Callable[[str], None]) -> torch.nn.Module:
    """The model to train: a resumed run's (its frozen layers frozen again), the parent's to fine-tune
    (``freeze_layers`` frozen), or a new one as ``cfg`` says."""
    from deeprnn.finetune import freeze_layers as freeze
    from deeprnn.models import ModelConfig, build_model

    if resume_ckpt is not None:
        ft = resume_ckpt.meta.get("finetune") or {}
        if ft.get("freeze_layers"):
            freeze(resume_ckpt.model, ft["freeze_layers"], include_embedding=not ft.get("extend_vocab", False),
                   tied_trains=ft.get("tied_embedding_trains", False))  # as the run froze it, so resuming is exact
        return resume_ckpt.model
    if parent is not None:
        if freeze_layers:
            frozen = freeze(parent.model, freeze_layers, include_embedding=not extend_vocab)
            tied = " (the embedding stays trainable: with --tie-weights it is the output layer's weight too)"
            log(f"froze the {freeze_layers} lowest layers ({len(frozen)} parameter tensors)"
                + (tied if parent.model.config.tie_weights and not extend_vocab else ""))
        return parent.model
    mcfg = ModelConfig(vocab_size=len(vocab), **cfg.model_fields())
    mcfg.validate()
    return build_model(mcfg)


class _Training:
    """One run's training loop and what it carries from window to window: the position (step, epoch, batch,
    tokens, time), the evaluation counters (best validation loss, evaluations without improvement, the
    plateau schedule's state), the rollback counters and the carried hidden state. :meth:`save` writes all of
    them into a checkpoint and :meth:`restore` reads them back, for a resume and for a rollback alike.

    ``run_dir`` is set once the run directory exists; :meth:`run` trains, :meth:`finish` scores the test split
    with the best checkpoint and writes ``summary.json``."""

    def __init__(self, cfg: TrainConfig, *, dist, device: torch.device, model: torch.nn.Module,
                 net: torch.nn.Module, vocab, splits, loader, records: dict[str, Any],
                 log: Callable[[str], None], stop_after_steps: int | None) -> None:
        self.cfg, self.dist, self.device, self.model, self.net = cfg, dist, device, model, net
        self.vocab, self.splits, self.loader, self.records, self.log = vocab, splits, loader, records, log
        from deeprnn.models import detach_state

        self.detach_state = detach_state
        self.is_main = dist.rank == 0
        self.run_dir = Path(cfg.run_dir) if cfg.run_dir else None
        self.optimizer = build_optimizer(cfg, model)
        self.averager = None  # averaged weights for evaluation and best/ (ema_decay > 0)
        if cfg.ema_decay > 0:
            from deeprnn.averaging import WeightAverage

            self.averager = WeightAverage(model, cfg.ema_decay, cfg.ema_start)
        self.carry_shape = (model.config.num_layers, cfg.batch_size, model.config.num_hiddens)  # (L, B, H), all ranks'
        self.n_params = model.num_params()  # trainable: --freeze-layers leaves some out
        self.n_total = sum(p.numel() for p in model.parameters())  # a tied weight once, as parameters() yields it

        self.step, self.epoch, self.batch_in_epoch, self.tokens_seen, self.train_time = 0, 0, 0, 0, 0.0
        self.best_val, self.bad_evals, self.evals_done = math.inf, 0, 0
        self.plateau = {"best": math.inf, "bad": 0, "scale": 1.0}
        self.lr_scale, self.nan_rollbacks = 1.0, 0  # on_nan="rollback" halves lr_scale; both saved, survive resume
        self.state = None

        self.steps_per_epoch = len(loader)
        # Schedules need a length; epochs may differ by a batch (random offsets), so it is an estimate.
        self.sched_steps = cfg.num_epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.sched_steps = min(self.sched_steps, cfg.max_steps)
        self.stop_steps = cfg.max_steps if cfg.max_steps is not None else math.inf
        self.stop_after_steps = stop_after_steps
        self.budget_s = cfg.time_budget * 60 if cfg.time_budget else None

        self.last_row: dict[str, Any] = {}
        self._new_interval()
        self.nan_every = nan_check_interval(device, dist.world_size)
        self.rolled_back = False
        self.stop_reason = "epochs"
        self.pbar = None
        self.last_plot = -math.inf
        self.plot_failed = False

    @property
    def epoch_done(self) -> float:
        """Epochs trained, the batches of the current one as a fraction (as metrics.csv shows them)."""
        return round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 4)

    @property
    def metrics_csv(self) -> Path:
        return self.run_dir / "metrics.csv"

    def _new_interval(self) -> None:
        """Start the sums the next evaluation reports (train loss, tokens/s) and the finiteness flag: non-finite
        loss or gradient norm, accumulated on the device and read per nan_check_interval()."""
        self.interval_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.interval_count, self.interval_tokens, self.interval_time = 0, 0, 0.0
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)

    def _write(self, msg: str) -> None:
        """A line for the user, above the progress bar when there is one."""
        (self.pbar.write if self.pbar is not None else self.log)(msg)

    def restore(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path) -> None:
        """Take up the training state of a checkpoint (``meta``, ``tensors``, read from ``where``): optimiser,
        position, counters, the sums since the last evaluation, carried state, averaged weights and this rank's
        generators. The weights are the
        caller's to load; ``train_time`` is too (a resume takes the run's, a rollback keeps counting)."""
        from deeprnn.checkpoint import optimizer_from_flat

        optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        self.step, self.tokens_seen = meta["position"]["step"], meta["position"]["tokens"]
        self.epoch, self.batch_in_epoch = meta["loader"]["epoch"], meta["loader"]["batch"]
        self.best_val, self.bad_evals, self.evals_done, self.plateau = _eval_counters(meta, self.plateau)
        self.last_row = dict(meta.get("metrics") or {})  # the last evaluation's: an epoch's end is not scored twice
        self._new_interval()
        interval = meta.get("interval")
        if interval:
            # Each rank its own sums, so that evaluate()'s all-reduce adds them as the uninterrupted run does;
            # under another number of processes rank 0 takes them all (the same total, rounded otherwise).
            ranks = interval.get("ranks")
            if ranks is not None and len(ranks) == self.dist.world_size:
                loss, self.interval_count, self.interval_tokens = ranks[self.dist.rank]
                self.interval_loss += loss
            elif self.is_main:
                self.interval_loss += interval["loss_sum"]
                self.interval_count, self.interval_tokens = interval["count"], interval["tokens"]
            self.interval_time = interval["time"]
        saved = _state_from_tensors(tensors, self.device, self.carry_shape, where)  # all ranks' streams
        self.state = self.dist.shard_batch(saved)
        if self.averager is not None:
            self.averager.load_tensors(tensors)
        _restore_rng(tensors, self.dist.rank, self.device,
                     self.cfg.seed + RANK_SEED_STRIDE * self.dist.rank + self.step)

    def resume(self, ckpt) -> None:
        """Continue from ``ckpt``, the run's last checkpoint, whose weights the model already holds."""
        self.restore(ckpt.meta, ckpt.train_tensors, ckpt.path)
        self.train_time = ckpt.meta["position"]["train_time"]
        self.lr_scale, self.nan_rollbacks = ckpt.meta.get("lr_scale", 1.0), ckpt.meta.get("nan_rollbacks", 0)

    def scored(self, tokens: torch.Tensor) -> tuple[float, int]:
        """Summed loss and token count of ``tokens`` over every rank."""
        cfg = self.cfg
        loss_sum, count = evaluate_tokens(self.model, tokens, batch_size=cfg.eval_batch_size,
                                          num_steps=cfg.eval_num_steps, device=self.device,
                                          precision=cfg.precision, rank=self.dist.rank,
                                          world_size=self.dist.world_size)
        return self.dist.all_reduce_sum(loss_sum, count)

    def save(self, name: str, metrics: dict[str, Any]) -> None:
        """Checkpoint ``run_dir/name`` (rank 0 writes; every rank hands it its streams and generator)."""
        from deeprnn.checkpoint import optimizer_to_flat, save_checkpoint

        dist, averager = self.dist, self.averager
        carry = dist.gather_batch(self.state)  # every rank's streams (L, B, H): resumable under any world size
        # each rank's dropout generators, and its share of the training loss since the last evaluation
        ranks = dist.gather_objects((_rng_states(), float(self.interval_loss), self.interval_count,
                                     self.interval_tokens))
        if not self.is_main:
            return
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer)
        tensors = {**opt_tensors, **_rng_tensors([rank[0] for rank in ranks]), **_state_tensors(carry),
                   **(averager.tensors() if averager is not None else {})}
        meta = {
            "train_config": dataclasses.asdict(self.cfg),
            "position": {"step": self.step, "epoch": self.epoch, "tokens": self.tokens_seen,
                         "train_time": self.train_time},
            "loader": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "optimizer": opt_meta,
            "data": self.records["data"],  # what resume checks the text against
            # no evaluation yet: best_val is inf, written as null (JSON has no Infinity); _loss_or_inf reads it
            "best_val": json_safe(self.best_val), "bad_evals": self.bad_evals, "evals_done": self.evals_done,
            "plateau": json_safe(self.plateau),
            "lr_scale": self.lr_scale, "nan_rollbacks": self.nan_rollbacks,
            # the training loss, tokens and time since the last evaluation (none when saved by one): the next
            # evaluation after a resume reports them as the uninterrupted run would
            "interval": {"loss_sum": sum(r[1] for r in ranks), "count": sum(r[2] for r in ranks),
                         "tokens": self.interval_tokens, "time": self.interval_time,
                         "ranks": [list(r[1:]) for r in ranks]},  # each rank's [loss sum, count, tokens]
            "metrics": json_safe(metrics),
            "finetune": self.records["finetune"],
            "parent": self.records["parent"],
        }
        # best/ holds the averaged weights (what was evaluated); last/ the raw ones, to resume from.
        with averager.swapped(self.model) if averager is not None and name == "best" else contextlib.nullcontext():
            save_checkpoint(self.run_dir / name, model=self.model, vocab=self.vocab, meta=meta, train_tensors=tensors)

    def roll_back(self, what: str) -> None:
        """Non-finite loss or gradients: raise NonFiniteLoss, or (on_nan="rollback") restore last/
        (weights, optimiser, RNG, position), halve the learning rate and let the loop go on."""
        from deeprnn.checkpoint import load_checkpoint

        cfg, dist, run_dir = self.cfg, self.dist, self.run_dir
        has_last = dist.broadcast_object(
            any((run_dir / name / "checkpoint.json").exists() for name in ("last", ".last.old")))
        if cfg.on_nan != "rollback" or self.nan_rollbacks >= MAX_NAN_ROLLBACKS or not has_last:
            if cfg.on_nan != "rollback":
                hint = ("; lower --lr or --clip; resume from the last good checkpoint with: deeprnn train "
                        f"--resume {run_dir} --on-nan rollback") if has_last else \
                    "; lower --lr or --clip, or use --on-nan rollback"
            elif has_last:
                hint = f" after {self.nan_rollbacks} rollbacks in a row; lower --lr or --clip and resume {run_dir}"
            else:
                hint = "; no checkpoint to roll back to; lower --lr or --clip"
            raise NonFiniteLoss(f"{what} at step {self.step}{hint}")
        # Rank 0 reads last/ and hands it to every rank (a node may not share its disk).
        ck = load_checkpoint(run_dir, prefer="last") if self.is_main else None
        meta, tensors, weights = dist.broadcast_object(
            (ck.meta, ck.train_tensors, ck.model.state_dict()) if self.is_main else None)
        bad_step = self.step
        self.model.load_state_dict(weights)
        self.restore(meta, tensors, run_dir / "last")  # train_time keeps counting
        self.nan_rollbacks += 1
        self.lr_scale *= 0.5
        self._write(f"{what} at step {bad_step}: rolled back to step {self.step} ({run_dir / 'last'}), learning "
                    f"rate halved to {self.lr_scale:g} x schedule (rollback {self.nan_rollbacks} of "
                    f"{MAX_NAN_ROLLBACKS})")

    def sample_text(self) -> str | None:
        cfg = self.cfg
        if not cfg.prefix or cfg.num_preds == 0:
            return None
        try:
            return quiet_sample(self.model, self.vocab, cfg.prefix, cfg.num_preds, self.device)
        except DeepRNNError:
            return None

    def evaluate(self) -> bool:
        """Evaluate, log, checkpoint; returns True when early stopping says stop."""
        cfg, dist = self.cfg, self.dist
        train_loss = float(self.interval_loss) / max(1, self.interval_count)
        if dist.world_size > 1:
            s, c = dist.all_reduce_sum(float(self.interval_loss), self.interval_count)
            train_loss = s / max(1, c)
        with self.averager.swapped(self.model) if self.averager is not None else contextlib.nullcontext():
            val_sum, val_n = self.scored(self.splits.valid) if self.splits.valid.numel() > 1 else (0.0, 0)
        val_loss = val_sum / val_n if val_n else float("nan")
        tps = (self.interval_tokens * dist.world_size / self.interval_time if self.interval_time > 0
               else float("nan"))
        row = {
            "step": self.step, "epoch": self.epoch_done,
            "tokens": self.tokens_seen, "elapsed_s": round(self.train_time, 3),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss, "train_ppl": perplexity(train_loss),
            "val_loss": val_loss, "val_ppl": perplexity(val_loss) if val_n else float("nan"),
            "val_bpc": val_loss / LN2 if val_n else float("nan"), "tokens_per_s": tps,
        }
        if dist.any_flag(not bool(self.finite)) or not math.isfinite(train_loss) or (
                val_n and not math.isfinite(val_loss)):
            bad = train_loss if not math.isfinite(train_loss) else val_loss
            self.roll_back(f"loss became {bad}" if not math.isfinite(bad) else "gradients became non-finite")
            self.rolled_back = True  # nothing logged or saved: the weights are not finite
            return False
        self.nan_rollbacks = 0  # a good evaluation: the next rollback starts a new count
        self.last_row = row
        self.evals_done += 1
        improved = val_n and val_loss < self.best_val - 1e-6
        if self.is_main:
            new = not self.metrics_csv.exists()
            with open(self.metrics_csv, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
                if new:
                    w.writeheader()
                w.writerow(row)
            unit = "bpc" if cfg.token == "char" else "bits/word"
            self._write(f"epoch {row['epoch']:.1f} step {self.step}: train ppl {row['train_ppl']:.3f}, "
                        f"valid ppl {row['val_ppl']:.3f} ({row['val_bpc']:.3f} {unit}), "
                        f"{tps:,.0f} tokens/s{' *' if improved else ''}")
            if cfg.sample_every and self.evals_done % cfg.sample_every == 0:
                text = self.sample_text()
                if text is not None:
                    self._write(f"  sample: {text!r}")
        plateau = self.plateau
        if cfg.schedule == "plateau" and val_n:
            if val_loss < plateau["best"] - 1e-6:
                plateau["best"], plateau["bad"] = val_loss, 0
            else:
                plateau["bad"] += 1
                if plateau["bad"] >= (cfg.patience // 2 if cfg.patience >= 2 else 2):
                    plateau["scale"] *= cfg.lr_gamma
                    plateau["bad"] = 0
        self._new_interval()  # (finite is true on every rank here: any_flag above said so)
        if improved:
            self.best_val, self.bad_evals = val_loss, 0
            self.save("best", row)
        else:
            self.bad_evals += 1
        self.save("last", row)
        if self.is_main and time.perf_counter() - self.last_plot > PLOT_EVERY_S:
            # Drawing costs ~0.2-1 s: refreshed at most every PLOT_EVERY_S seconds, and at the end.
            self.draw_curve()
            self.last_plot = time.perf_counter()
        return bool(cfg.patience and self.bad_evals >= cfg.patience)

    def save_position(self) -> None:
        """A stop between evaluations (a signal, ``stop_after_steps``): ``last/`` records where the run is, with
        the training loss since the last evaluation, and nothing is evaluated. An evaluation here would add a row
        to metrics.csv, and a count towards the plateau schedule, early stopping and ``best/``, that the
        uninterrupted run never has. Non-finite weights are never saved: they roll back (or raise) instead."""
        if self.dist.any_flag(not bool(self.finite)):
            self.roll_back("loss or gradients became non-finite")  # raises unless rolling back
            self.rolled_back = True
            return
        self.save("last", self.last_row)

    def draw_curve(self) -> None:
        """curve.png from metrics.csv. It is only a picture: a failure (an edited metrics.csv, a directory in
        curve.png's place) is one warning, said once, and training goes on."""
        cfg = self.cfg
        try:
            write_plot(self.metrics_csv, self.run_dir / "curve.png",
                       title=f"{cfg.cell} {cfg.num_layers}x{cfg.num_hiddens}")
        except Exception as e:  # noqa: BLE001 - matplotlib and csv raise many kinds; none may stop training
            if not self.plot_failed:
                self.plot_failed = True
                reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
                self.log(f"warning: cannot draw {self.run_dir / 'curve.png'} ({reason}); training goes on, and "
                         f"{self.metrics_csv} has the numbers")

    def lr(self, X: torch.Tensor) -> float:
        """The learning rate of the step about to train on ``X``: the schedule's, times the rollbacks' scale."""
        cfg = self.cfg
        lr = lr_at(cfg, self.step, self.sched_steps, self.train_time / self.budget_s if self.budget_s else None)
        if cfg.schedule == "step":
            lr = cfg.lr * cfg.lr_gamma ** (self.epoch // cfg.lr_step_size)
        elif cfg.schedule == "plateau":
            lr = cfg.lr * self.plateau["scale"]
        if cfg.variable_bptt:
            lr *= X.shape[1] / cfg.num_steps  # AWD-LSTM: a short window takes a smaller step
        return lr * self.lr_scale

    def train_step(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """One window: forward, loss (plus AR/TAR), backward, clipping, the optimiser's step; returns the loss.
        The carried state goes on to the next window, detached (sequential), or starts again (random)."""
        cfg, model = self.cfg, self.model
        X, Y = X.to(self.device, non_blocking=True), Y.to(self.device, non_blocking=True)
        if cfg.sampling == "random" or self.state is None:
            self.state = model.begin_state(X.shape[0], device=self.device)
        else:
            self.state = self.detach_state(self.state)
        lr = self.lr(X)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with autocast_context(self.device, cfg.precision):
            if cfg.ar_alpha or cfg.tar_beta:
                logits, self.state, top = self.net(X, self.state, return_hidden=True)  # top (T, B, H)
            else:
                logits, self.state = self.net(X, self.state)
        loss = sequence_loss(logits, Y)
        objective = loss
        if cfg.ar_alpha or cfg.tar_beta:
            objective = loss + activation_penalty(top, cfg.ar_alpha, cfg.tar_beta)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.finite &= torch.isfinite(loss.detach())
        if cfg.clip > 0:
            self.finite &= torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip))
        self.optimizer.step()
        self.interval_loss += loss.detach().double()
        self.interval_count += 1
        self.step += 1
        if self.averager is not None:
            self.averager.update(self.step)
        self.batch_in_epoch += 1
        self.tokens_seen += X.numel() * self.dist.world_size
        return loss

    def run(self, progress: bool, *, first_run: bool) -> None:
        """Train until the epochs, ``max_steps``, the time budget, early stopping or ``stop_after_steps`` end it;
        raises :class:`TrainingInterrupted` after SIGINT/SIGTERM (checkpoint written) and :class:`NonFiniteLoss`
        unless rolling back. ``first_run``: the run starts here (not a resume)."""
        cfg, dist, device = self.cfg, self.dist, self.device
        if progress:
            from tqdm.auto import tqdm

            self.pbar = tqdm(total=self.sched_steps, initial=self.step, unit="step", dynamic_ncols=True, leave=False)
        done = False
        try:
            with _SignalFlag() as flag:
                done = self.epoch >= cfg.num_epochs or self.step >= self.stop_steps
                if cfg.on_nan == "rollback" and first_run and self.step == 0:
                    self.save("last", {})  # something to roll back to before the first evaluation
                while not done:
                    self.rolled_back = False
                    self.loader.load_state_dict({"epoch": self.epoch, "batch": self.batch_in_epoch})
                    in_last_epoch = (_batches_in_epoch(self.loader, self.epoch) if self.epoch == cfg.num_epochs - 1
                                     else None)
                    for X, Y in self.loader:
                        t0 = time.perf_counter()
                        loss = self.train_step(X, Y)
                        if device.type == "cuda" and (self.step % 50 == 0 or self.step >= self.stop_steps):
                            torch.cuda.synchronize()
                        dt = time.perf_counter() - t0
                        self.train_time += dt
                        self.interval_time += dt
                        self.interval_tokens += X.numel()
                        if self.pbar is not None:
                            self.pbar.update(1)
                            # float(loss) is a host sync on an accelerator: there only with the timing sync above
                            if self.step % (50 if device.type == "cuda" else 10) == 0:
                                self.pbar.set_postfix(
                                    loss=f"{float(loss):.3f}",
                                    tok_s=f"{self.interval_tokens / max(self.interval_time, 1e-9):,.0f}")
                        if self.step % self.nan_every == 0 and dist.any_flag(not bool(self.finite)):
                            self.roll_back("loss or gradients became non-finite")  # raises unless rolling back
                            break  # restart the loader at the restored position
                        at_end = self.step >= self.stop_steps
                        paused = self.stop_after_steps is not None and self.step >= self.stop_after_steps
                        over_time = self.budget_s is not None and dist.any_flag(self.train_time >= self.budget_s)
                        interrupted = dist.any_flag(flag.signum is not None)
                        if (cfg.eval_every and self.step % cfg.eval_every == 0) or at_end or over_time:
                            if self.evaluate():
                                self.stop_reason, done = "early stopping", True
                        elif interrupted or paused:
                            self.save_position()
                        last_batch = in_last_epoch is not None and self.batch_in_epoch >= in_last_epoch
                        # At its end a run finishes instead: a resume would have nothing left to train. Every
                        # rank names a signal that some rank received (SIGINT sent to rank 1 alone), as rank 0
                        # reports it.
                        if interrupted and not (done or at_end or over_time or last_batch):
                            raise TrainingInterrupted(min(s for s in dist.gather_objects(flag.signum) if s),
                                                      self.run_dir)
                        if self.rolled_back:
                            break  # restart the loader at the restored position
                        if at_end:
                            self.stop_reason, done = "max_steps", True
                        elif over_time:
                            self.stop_reason, done = "time budget", True
                        elif paused and not last_batch:  # on the run's last batch it finishes instead, as above
                            self.stop_reason, done = "paused", True
                        if done:
                            break
                    else:
                        # The epoch ran out: the next position is the start of the next epoch.
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                        if cfg.eval_every == 0 and self.last_row.get("step") != self.step:  # once per epoch
                            if self.evaluate():
                                self.stop_reason, done = "early stopping", True
                        if self.epoch >= cfg.num_epochs:
                            done = True
        finally:
            if self.pbar is not None:
                self.pbar.close()
        if self.is_main and self.metrics_csv.exists():
            self.draw_curve()

    def finish(self) -> dict[str, Any]:
        """Score the test split once, with the best checkpoint; write and return the run's summary."""
        from deeprnn.checkpoint import load_checkpoint

        cfg, dist, device, run_dir = self.cfg, self.dist, self.device, self.run_dir
        summary: dict[str, Any] = {
            "run_dir": str(run_dir), "stop_reason": self.stop_reason, "steps": self.step,
            "epochs": round(self.epoch + self.batch_in_epoch / self.steps_per_epoch, 3),
            "train_time_s": round(self.train_time, 3),
            "parameters": self.n_total, "trainable_parameters": self.n_params, "vocab_size": len(self.vocab),
            "device": str(device),
            "last": self.last_row}
        best_dir = run_dir / "best"
        # Rank 0 wrote the checkpoints: the other ranks take its word and its weights, so the sharded test
        # score is one model's even where a node does not share rank 0's disk.
        if dist.broadcast_object((best_dir / "checkpoint.json").exists()):
            if self.is_main:
                best = load_checkpoint(best_dir, map_location=device)
                eval_model = best.model
                summary["best"] = best.meta.get("metrics", {})
            else:
                eval_model = copy.deepcopy(self.model)
            dist.broadcast_module(eval_model)
        else:
            eval_model = self.model
        if heldout_streams(self.splits.test, cfg.eval_batch_size) is not None:
            s, c = evaluate_tokens(eval_model, self.splits.test, batch_size=cfg.eval_batch_size,
                                   num_steps=cfg.eval_num_steps, device=device, precision=cfg.precision,
                                   rank=dist.rank, world_size=dist.world_size)
            s, c = dist.all_reduce_sum(s, c)
            test_loss = s / c
            summary.update(test_loss=test_loss, test_ppl=perplexity(test_loss), test_bpc=test_loss / LN2,
                           test_tokens=c)
        best_val = self.best_val
        summary["best_val_ppl"] = perplexity(best_val) if math.isfinite(best_val) else None
        summary["best_val_bpc"] = best_val / LN2 if math.isfinite(best_val) else None
        summary["tokens_per_s"] = self.tokens_seen / self.train_time if self.train_time > 0 else None
        if self.is_main:
            if cfg.prefix and cfg.num_preds:
                summary["sample"] = None
                # skipped, as deeprnn generate refuses such a prefix
                note = prefix_note(self.vocab, cfg.prefix, cfg.normalization)
                if note is not None:
                    self.log(note)
                else:
                    try:
                        summary["sample"] = quiet_sample(eval_model, self.vocab, cfg.prefix, cfg.num_preds, device)
                    except DeepRNNError as e:
                        self.log(f"no sample: {e}")
            write_text_atomic(run_dir / "summary.json", json.dumps(json_safe(summary), indent=1, default=str) + "\n")
        return summary
