"""The command line: parses, validates and delegates to the library; nothing else.

Training flags are generated from :class:`deeprnn.train.TrainConfig` (one flag per field, the
field's comment as help), so the dataclass is the single source of truth. Precedence:
defaults < ``--preset`` < ``--config FILE.toml`` < flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from deeprnn import __version__, choices
from deeprnn.errors import ConfigError, CorpusError, DeepRNNError

PRESETS: dict[str, dict[str, Any]] = {
    # The book's exact experiment (section 9.3): first 10,000 characters, one-hot 2x256 LSTM, SGD lr 2,
    # 500 epochs. Unlike the book we also score a held-out part of the book.
    "d2l-9.3": dict(corpus=["timemachine"], normalization="d2l", max_tokens=10000, cell="lstm", num_layers=2,
                    num_hiddens=256, impl="concise", input="one_hot", dropout=0.0, init="torch",
                    batch_size=32, num_steps=35, sampling="sequential", optimizer="sgd", lr=2.0, clip=1.0,
                    schedule="constant", num_epochs=500, precision="fp32", eval_every=80, sample_every=1,
                    prefix="time traveller", num_preds=50),
    # The book's recipe on the whole book with a held-out tail (the reference curve in the README).
    "d2l-full": dict(corpus=["timemachine"], normalization="d2l", cell="lstm", num_layers=2, num_hiddens=256,
                     impl="concise", input="one_hot", dropout=0.0, init="torch", batch_size=32, num_steps=35,
                     optimizer="sgd", lr=2.0, clip=1.0, schedule="constant", num_epochs=60, precision="fp32"),
    # Word level on The Time Machine with the book's tokenize(lines, 'word'): tied embedding/output.
    "word-tm": dict(corpus=["timemachine"], normalization="d2l", token="word", min_freq=2, input="embedding",
                    tie_weights=True, num_layers=2, num_hiddens=256, dropout=0.4, batch_size=32, num_steps=35,
                    optimizer="adam", lr=3e-3, num_epochs=30, patience=5, prefix="the time traveller",
                    num_preds=20),
    # Word level on any text (punctuation-aware tokens and <eol>): pass --corpus PATH.
    "word": dict(normalization="raw", token="word", min_freq=2, input="embedding", tie_weights=True,
                 num_layers=2, num_hiddens=256, dropout=0.4, optimizer="adam", lr=3e-3, num_epochs=30,
                 patience=5, prefix="The", num_preds=20),
    # A tiny configuration for smoke tests and --dry-run.
    "tiny": dict(num_layers=1, num_hiddens=16, batch_size=4, num_steps=8, num_epochs=1, max_steps=5,
                 eval_batch_size=4, eval_num_steps=32, sample_every=0, num_preds=10, precision="fp32"),
    # Quality recipes (docs/quality.md): AWD-LSTM-style regularisation, trained to a wall-clock budget. The CPU
    # ones take precision "auto": bf16 on a CPU with AVX-512, where they were measured, fp32 on one without,
    # where emulated bf16 would take several times longer per step.
    # The Time Machine's 17k held-out characters are scored as 8 long streams with the state carried
    # (AWD-LSTM scores with small evaluation batches too): each stream starts cold once, not every 266
    # characters as 64 streams would. Tiny Shakespeare's 111k keep 64 streams of 1.7k characters.
    # The Time Machine (d2l normalisation, last 10% held out), 2 CPU cores, 10 minutes: 3 residual layers and
    # strong regularisation, so that it is still at its best after 10 minutes (50 epochs) instead of overfitting.
    # A high constant learning rate after the warm-up, averaged by the EMA, regularises too: with it the dropout
    # is lighter than under a cosine (docs/quality.md: 3.876 -> 3.824). Adam at 1.6e-2 with beta2 0.95: the
    # higher rate plateaus lower, the shorter second-moment average gets there sooner (3.824 -> 3.810).
    # Zoneout (c 0.3, h 0.05) instead of weight-drop on the recurrent path, so the scratch layers (the C++
    # window kernels; torch.nn.LSTM has no zoneout): 3.810 / 3.809 (seeds 0 / 1) -> 3.795 / 3.809 / 3.799 /
    # 3.823 (seeds 0-3, mean 3.807). h's rate is the sharp knob: 0.025 over-fits (3.830 with seed 1), 0.065
    # gives 3.811 / 3.794 (seeds 0 / 1), 0.1 is far behind.
    "tm-cpu": dict(corpus=["timemachine"], normalization="d2l", val_fraction=0.1, test_fraction=0.0,
                   cell="lstm", num_layers=3, residual=True, num_hiddens=512, impl="scratch", input="embedding",
                   embed_size=128, dropout=0.35, output_dropout=0.45, input_dropout=0.15, embed_dropout=0.1,
                   locked_dropout=True, zoneout_cell=0.3, zoneout_hidden=0.05, ar_alpha=2.0, tar_beta=1.0,
                   variable_bptt=True,
                   batch_size=32, num_steps=80, optimizer="adam", lr=1.6e-2, beta2=0.95, clip=0.25,
                   schedule="constant", warmup_steps=50, ema_decay=0.998, ema_start=600, time_budget=10.0,
                   num_epochs=1000, eval_every=200, eval_batch_size=8, eval_num_steps=512, precision="auto",
                   sample_every=5),
    # The War of the Worlds added to training; held out: the Time Machine's last 10% only. The Time Machine's
    # training text counts twice (the held-out text is its), 3 layers with residual connections. A constant
    # learning rate after the warm-up, averaged by the EMA: a cosine's annealing over-fitted sooner (3.535 -> 3.496).
    "tm-wells-cpu": dict(corpus=["timemachine", "war-of-the-worlds"], heldout_from=["timemachine"],
                         source_weights=[2.0, 1.0], normalization="d2l", val_fraction=0.1, test_fraction=0.0,
                         cell="lstm", num_layers=3, residual=True, num_hiddens=512, impl="concise",
                         input="embedding", embed_size=128, dropout=0.25,
                         output_dropout=0.3, input_dropout=0.1, embed_dropout=0.02, locked_dropout=True,
                         weight_drop=0.25, ar_alpha=2.0, tar_beta=1.0, variable_bptt=True, batch_size=32,
                         num_steps=80, optimizer="adam", lr=1.2e-2, clip=0.25, schedule="constant",
                         warmup_steps=50, ema_decay=0.998, ema_start=600, time_budget=10.0, num_epochs=1000,
                         eval_every=100, eval_batch_size=8, eval_num_steps=512, precision="auto", sample_every=5),
    # The Time Machine on one GPU (cuDNN LSTM, weight-drop through the fused call), 5 minutes: twice as wide as
    # the CPU recipe, with AWD-LSTM's heavier weight-drop, since a GPU runs many more epochs.
    "tm-gpu": dict(corpus=["timemachine"], normalization="d2l", val_fraction=0.1, test_fraction=0.0,
                   cell="lstm", num_layers=3, num_hiddens=1024, residual=True, impl="concise", input="embedding",
                   embed_size=256, dropout=0.4, output_dropout=0.5, input_dropout=0.15, embed_dropout=0.1,
                   locked_dropout=True, weight_drop=0.5, ar_alpha=2.0, tar_beta=1.0, variable_bptt=True,
                   batch_size=64, num_steps=100, optimizer="adam", lr=2e-3, clip=0.25, schedule="cosine",
                   warmup_steps=100, min_lr_ratio=0.02, ema_decay=0.998, ema_start=500, time_budget=5.0,
                   num_epochs=10000, eval_every=100, eval_batch_size=8, eval_num_steps=1024, precision="bf16",
                   device="cuda", sample_every=5),
    # Tiny Shakespeare as is (raw), first 90% train / last 10% validation like nanoGPT; 2 CPU cores, 10 minutes.
    "shakespeare-cpu": dict(corpus=["tinyshakespeare"], normalization="raw", val_fraction=0.1, test_fraction=0.0,
                            cell="lstm", num_layers=2, num_hiddens=512, impl="concise", input="embedding",
                            embed_size=128, dropout=0.2, output_dropout=0.25, input_dropout=0.05,
                            locked_dropout=True, weight_drop=0.2, ar_alpha=1.0, tar_beta=1.0, variable_bptt=True,
                            batch_size=32, num_steps=100, optimizer="adam", lr=3e-3, clip=0.25, schedule="cosine",
                            warmup_steps=50, min_lr_ratio=0.02, ema_decay=0.995, ema_start=500, time_budget=10.0,
                            num_epochs=1000, eval_every=200, eval_batch_size=64, eval_num_steps=256,
                            precision="auto", prefix="ROMEO:", sample_every=5),
    # Tiny Shakespeare on one GPU (cuDNN LSTM, weight-drop through the fused call): 2.4 minutes of training,
    # measured on an H100 (docs/quality.md). Lighter dropout (0.25/0.3, weight-drop 0.3) over-fitted after 1 min.
    "shakespeare-gpu": dict(corpus=["tinyshakespeare"], normalization="raw", val_fraction=0.1, test_fraction=0.0,
                            cell="lstm", num_layers=3, num_hiddens=1024, impl="concise", input="embedding",
                            embed_size=256, dropout=0.45, output_dropout=0.5, input_dropout=0.1, embed_dropout=0.1,
                            locked_dropout=True, weight_drop=0.5, ar_alpha=1.0, tar_beta=1.0, variable_bptt=True,
                            batch_size=128, num_steps=150, optimizer="adam", lr=2e-3, clip=0.25, schedule="cosine",
                            warmup_steps=100, min_lr_ratio=0.02, ema_decay=0.998, ema_start=600, time_budget=2.4,
                            num_epochs=1000, eval_every=200, eval_batch_size=128, eval_num_steps=512,
                            precision="bf16", device="cuda", prefix="ROMEO:", sample_every=5),
}

# Twins of CPU presets for a CPU without native bf16 (AVX2-only x86): there "auto" means float32 and a step
# takes several times longer, so each twin is its preset with what a few times fewer steps want changed.
# tm-cpu's 3x512 scratch layers get ~750 steps in 10 minutes there instead of ~3,500, under regularisation meant
# for 60 epochs (4.234 on a 2-core AVX2 EPYC). Two residual layers of torch.nn.LSTM with weight-drop instead
# of three scratch layers with zoneout: ~1,200 steps, 19 epochs. Lighter dropout over-fits by then, heavier is
# behind throughout, 3x384 and a WSD decay gain nothing; a shorter weight average (EMA 0.995 instead of 0.998)
# is what helps: 3.919 -> 3.886 (docs/quality.md, "CPUs without native bf16"). Session 15 swept 30 variants on
# a GPU at the AVX2 machine's step counts (103 runs, benchmarks/step_sweep.py): none moved the mean by more than
# 0.7%; batch 24 (more, smaller steps) with partial shuffle was the best, -0.69% there, and on the AVX2 machine
# 3.887 / 3.886 / 3.897 / 3.912 with seeds 0-3, mean 3.896 against batch 32's 3.907.
PRESETS["tm-cpu-fp32"] = {**PRESETS["tm-cpu"], "num_layers": 2, "impl": "concise", "dropout": 0.3,
                          "output_dropout": 0.4, "input_dropout": 0.1, "embed_dropout": 0.05, "zoneout_cell": 0.0,
                          "zoneout_hidden": 0.0, "weight_drop": 0.3, "partial_shuffle": True, "batch_size": 24,
                          "lr": 1.2e-2, "ema_decay": 0.995, "eval_every": 100, "precision": "fp32"}
# shakespeare-cpu gets ~1,000 steps (3 epochs) there instead of ~4,200, so it under-fits rather than over-fits.
# Lighter dropout and weight-drop (0.1), twice the learning rate, held constant after the warm-up (the EMA
# averages): 1.4972 -> 1.4364 nats on a 2-core AVX2 EPYC (seed 0; lr 1e-2 with beta2 0.95: 1.4457); seeds 1-2:
# 1.4275, 1.4378, mean 1.4339. Batch 24 with partial shuffle (more, smaller steps, as tm-cpu-fp32): 1.4165 /
# 1.4296 / 1.4242 / 1.4502 with seeds 0-3, mean 1.4301, still 0.7% above issue 11's 1.42 (docs/quality.md, "CPUs
# without native bf16").
PRESETS["shakespeare-cpu-fp32"] = {**PRESETS["shakespeare-cpu"], "dropout": 0.1, "output_dropout": 0.1,
                                   "input_dropout": 0.0, "weight_drop": 0.1, "lr": 6e-3, "schedule": "constant",
                                   "batch_size": 24, "partial_shuffle": True, "precision": "fp32"}

# tm-wells-cpu's 3 layers get ~800 steps (3 epochs of the two texts) there: 3.809. With tm-cpu-fp32's model,
# batch and EMA (~1,570 steps, 4.7 epochs) its dropout 0.3/0.4 under-fits (3.775); dropout 0.15 gives 3.586,
# 0.05 stalls at 3.581 from step 1,400, 0.1/0.15/0.05 with weight-drop 0.1 gives 3.572 / 3.590 / 3.581 / 3.585
# with seeds 0-3, mean 3.582, still 2.3% above issue 11's 3.5 (docs/quality.md, "tm-wells-cpu-fp32").
PRESETS["tm-wells-cpu-fp32"] = {**PRESETS["tm-wells-cpu"], "num_layers": 2, "dropout": 0.1, "output_dropout": 0.15,
                                "input_dropout": 0.05, "embed_dropout": 0.0, "weight_drop": 0.1,
                                "partial_shuffle": True, "batch_size": 24, "beta2": 0.95, "ema_decay": 0.995,
                                "precision": "fp32"}

# The CPU presets tuned where bf16 is native (AVX-512), each with its twin tuned for a CPU without it, where
# their precision "auto" means float32 and each step takes several times longer.
FP32_TWINS: dict[str, str] = {"tm-cpu": "tm-cpu-fp32", "tm-wells-cpu": "tm-wells-cpu-fp32",
                              "shakespeare-cpu": "shakespeare-cpu-fp32"}


def preset_note(name: str | None, cfg) -> str | None:
    """A line for a run of a preset tuned for native bf16 on a CPU without it, in float32 (``auto``): the preset
    tuned for such a CPU. None elsewhere."""
    from deeprnn.precision import native_bf16
    from deeprnn.train import resolve_device

    if name not in FP32_TWINS or cfg.precision != "auto":
        return None
    try:
        device = resolve_device(cfg.device)
    except ConfigError:  # train() says what is wrong with the device
        return None
    if device.type != "cpu" or native_bf16(device):
        return None
    return (f"note: {name} was tuned on a CPU with native bfloat16 (AVX-512); this one has none, so it trains in "
            f"float32, several times slower per step; --preset {FP32_TWINS[name]} is tuned for such a CPU "
            "(docs/quality.md)")


CHOICES: dict[str, tuple[str, ...]] = {
    "normalization": choices.NORMALIZATIONS,
    "token": choices.TOKENS,
    "cell": choices.CELLS,
    "impl": choices.IMPLS,
    "input": choices.INPUTS,
    "init": choices.INITS,
    "gru_variant": choices.GRU_VARIANTS,
    "sampling": choices.SAMPLINGS,
    "optimizer": choices.OPTIMIZERS,
    "schedule": choices.SCHEDULES,
    "precision": choices.PRECISIONS,
    "on_nan": choices.ON_NAN,
}

ALIASES = {"num_epochs": ["--epochs"]}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what, and where to look) and exit status 2, and a flag must be
    spelled out: an abbreviation (``--epoch`` for ``--epochs``) would let a typo pick another flag silently."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _DefaultsOnceFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help unless the help already says what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _field_help() -> dict[str, str]:
    from deeprnn.train import TrainConfig

    helps: dict[str, str] = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*#\s*(.+)$", line)
        if m:
            helps[m.group(1)] = m.group(2).strip()
    return helps


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults suppressed so we know what the user set."""
    from deeprnn.train import TrainConfig

    helps = _field_help()
    defaults = TrainConfig()
    group = p.add_argument_group("training options (defaults = the main job's recipe)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *ALIASES.get(f.name, [])]
        default = getattr(defaults, f.name)
        help_text = helps.get(f.name, "")
        if "default" not in help_text:  # else the field's comment already says what the default is
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_text += f" (default: {shown})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        t = str(f.type)
        if t == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif t.startswith("list[float]"):
            kw.update(nargs="+", metavar="W", type=float)
        elif t.startswith("list"):
            kw.update(nargs="+", metavar="X")
        else:
            base = t.split("|")[0].strip()
            kw["type"] = {"int": int, "float": float, "str": str}[base]
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
        group.add_argument(*names, **kw)


def load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ConfigError("--config needs Python >= 3.11 (tomllib); pass the options as flags instead") from None
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; pass the .toml file inside it")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    if "train" not in data:
        return data  # the options at the top level
    table, outside = data["train"], [key for key in data if key != "train"]
    if not isinstance(table, dict):
        raise ConfigError(f"{p}: 'train' must be a table ([train]), got {type(table).__name__} {table!r}")
    if outside:  # they used to be ignored without a word: a [model] table, or keys above [train]
        raise ConfigError(f"{p}: {outside[0]!r} is outside the [train] table, where it would be ignored; put every "
                          "option under [train], or all of them at the top level")
    return table


# train's flags that are not TrainConfig fields: they say what to do with a run, not how to train it
COMMAND_LINE_ONLY = ("preset", "config", "init_from", "extend_vocab", "freeze_layers", "resume", "overwrite",
                     "dry_run", "nproc", "quiet")


def config_from_mapping(values: dict[str, Any], source: str):
    """Check keys and types of a mapping (config file) against TrainConfig."""
    from deeprnn.fields import type_error
    from deeprnn.train import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "epochs":  # --epochs is --num-epochs's other name on the command line
            raise ConfigError(f"{source}: unknown key {key!r}; the key is num_epochs")
        if name in COMMAND_LINE_ONLY:  # listed by --help, so "see --help" sent the user in a circle
            raise ConfigError(f"{source}: {key!r} is not a config file key: pass --{name.replace('_', '-')} on the "
                              "command line")
        if name not in fields:
            raise ConfigError(f"{source}: unknown key {key!r}; see deeprnn train --help for the options")
        t = str(fields[name].type)
        if t.startswith("list[str]") and isinstance(value, str):
            value = [value]  # corpus = "a.txt"
        problem = type_error(key, t, value)
        if problem:
            raise ConfigError(f"{source}: {problem}")
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[name])}, got {value!r}")
        if t.startswith("float") and isinstance(value, int):
            value = float(value)
        elif t.startswith("list[float]") and value is not None:
            value = [float(v) for v in value]
        if name == "run_dir" and value is not None:
            _check_contained(value, key, source)
        out[name] = value
    return out


def _check_contained(value: str, key: str, source: str) -> None:
    """A directory a config file names for writing must stay inside the current directory.

    A shared or downloaded config file must not make deeprnn write (or ``--overwrite``) files
    elsewhere: the path must be relative, without ``..``, and must not leave the current
    directory through a symbolic link. Flags given on the command line are the user's own choice.
    """
    pure = Path(value)
    cwd = Path.cwd().resolve()
    if pure.is_absolute() or ".." in pure.parts or value.startswith("~") or not value.strip():
        raise ConfigError(f"{source}: {key} must be a relative path inside the current directory "
                          f"(no '..', not absolute), got {value!r}; pass --run-dir on the command line instead")
    if not (cwd / pure).resolve().is_relative_to(cwd):
        raise ConfigError(f"{source}: {key} {value!r} leads outside the current directory through a "
                          "symbolic link; pass --run-dir on the command line instead")


def build_train_config(args: argparse.Namespace):
    """The validated TrainConfig of defaults < ``--preset`` < ``--config`` < flags. A range error that the
    config file's values cause is prefixed with the file's name, as its other errors are."""
    from deeprnn.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    preset = dict(PRESETS[args.preset]) if getattr(args, "preset", None) else {}
    from_file = config_from_mapping(load_toml(args.config), args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    # --dry-run shrinks the job (the tiny preset over the preset's and the file's sizes) but not what was typed:
    # it overrode the flags, so it checked another setup than the one asked for (--precision bf16 went fp32)
    # (sizes and budget only: the precision stays what the run would use)
    dry = {k: v for k, v in PRESETS["tiny"].items() if k != "precision"} if getattr(args, "dry_run", False) else {}
    cfg = TrainConfig(**{**preset, **from_file, **dry, **flags})
    # what the command set, not the defaults, and where each came from
    args.chosen_from = {**dict.fromkeys(preset, "preset"), **dict.fromkeys(from_file, "config"),
                        **dict.fromkeys(dry, "dry-run"), **dict.fromkeys(flags, "flag")}
    args.chosen = args.chosen_from.keys()
    try:
        cfg.validate()
    except ConfigError as e:
        if from_file:
            try:  # the same options without the file's: do they pass? Then a value from the file is at fault
                TrainConfig(**{**preset, **flags}).validate()
            except ConfigError:
                raise e from None
            raise ConfigError(f"{args.config}: {e}") from None
        raise
    _refuse_unused(args, cfg)
    return cfg


def _refuse_unused(args: argparse.Namespace, cfg) -> None:
    """An option the user gave (a flag or a ``--config`` key) that the run would never read, such as
    ``--momentum`` with Adam, is refused rather than ignored. A preset's own settings give way: ``--preset
    tm-cpu --optimizer sgd`` trains without the preset's Adam betas."""
    from deeprnn.train import unused_option_message

    whence = {"preset": f" (--preset {getattr(args, 'preset', None)}'s)", "config": f" (from {args.config})",
              "dry-run": " (--dry-run's)", None: " (the default)"}
    for name, on, needs in cfg.unused_options():
        source = args.chosen_from.get(name)
        if source not in ("flag", "config"):
            continue
        value = getattr(cfg, name)
        flag = f"--{name.replace('_', '-')}" + ("" if isinstance(value, bool) else f" {value}")
        what = flag if source == "flag" else f"{args.config}: {name} = {json.dumps(value)}"
        fix = f"drop it, or set --{on.replace('_', '-')}" if source == "flag" else f"remove it, or set {on}"
        raise ConfigError(unused_option_message(cfg, on, needs, what, fix, whence.get(args.chosen_from.get(on), "")))


# ----------------------------------------------------------------------------------------------
# commands


def cmd_train(args: argparse.Namespace) -> int:
    from deeprnn.train import train

    _check_train_flags(args)
    if args.resume:
        from deeprnn.train import saved_train_config

        # The run's own config, changed only by the flags given now (checked by train()).
        saved = saved_train_config(args.resume)
        explicit = {k: v for k, v in vars(args).items() if k in dataclasses.asdict(saved)}
        cfg = dataclasses.replace(saved, **{**explicit, "run_dir": args.resume})
        cfg.validate()
    else:
        cfg = build_train_config(args)
        if args.init_from:
            from deeprnn.checkpoint import read_meta, resolve_checkpoint

            parent = read_meta(resolve_checkpoint(args.init_from))
            _check_flags_against_parent(args, cfg, parent)
            _inherit_text_options(args, cfg, parent)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:  # checked first: a bad flag is one line, not one per rank
        return _launch_torchrun(args.nproc, getattr(args, "argv", None))
    if not args.resume:
        note = preset_note(args.preset, cfg)
        if note and not args.quiet and os.environ.get("RANK", "0") == "0":
            print(note)
    progress = not args.quiet and sys.stderr.isatty()
    log = (lambda *_a, **_k: None) if args.quiet else print
    summary = train(cfg, resume=bool(args.resume), overwrite=args.overwrite, progress=progress, log=log,
                    init_from=args.init_from, extend_vocab=args.extend_vocab, freeze_layers=args.freeze_layers)
    from deeprnn import distributed

    if distributed.current().rank == 0:
        _print_summary(summary, cfg)
    return 0


def _check_train_flags(args: argparse.Namespace) -> None:
    """Flags that contradict each other are refused rather than one of them ignored."""
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (processes to launch), got {args.nproc}")
    for flag, what in (("resume", "the run directory"), ("init_from", "a run or checkpoint"),
                       ("config", "a .toml file")):
        value = getattr(args, flag, None)
        if value is not None and not value.strip():  # an unset shell variable: it was taken for "not given"
            name = "--" + flag.replace("_", "-")
            raise ConfigError(f"{name} is empty; name {what}, or drop {name}")
    run_dir = getattr(args, "run_dir", None)  # present only when given
    if args.init_from and run_dir is not None and _same_dir(run_dir, _run_of(args.init_from)):
        raise ConfigError(f"--init-from {args.init_from} would fine-tune the run in {args.run_dir} into itself, "
                          "replacing the weights it starts from: give --run-dir a new directory")
    if not args.resume:
        return
    if args.init_from:
        raise ConfigError(f"--resume continues the run in {args.resume} from its own weights and --init-from starts a "
                          "new run from other weights: pass only one of them")
    if args.overwrite:
        raise ConfigError(f"--resume continues the run in {args.resume} and --overwrite replaces it: drop --overwrite "
                          "to continue it, or drop --resume to start it over")
    if args.dry_run:
        raise ConfigError(f"--dry-run starts a new tiny run and cannot continue the run in {args.resume}: drop "
                          "--dry-run, or drop --resume and give --run-dir a new directory")
    if run_dir is not None and not _same_dir(run_dir, args.resume):
        raise ConfigError(f"--resume continues the run in {args.resume}, in place, and --run-dir names another "
                          f"directory ({run_dir}): drop --run-dir (to start a new run from its weights instead, "
                          "use --init-from)")
    for flag, value in (("--preset", args.preset), ("--config", args.config)):
        if value:  # a resumed run takes its own configuration; only flags may change its budget
            raise ConfigError(f"--resume continues the run in {args.resume} with its own configuration, which "
                              f"{flag} would not change: drop {flag} (flags such as --max-steps still apply)")


def _run_of(run_or_ckpt: str) -> Path:
    """The directory a run or checkpoint path's checkpoint lives in (``RUN`` for ``RUN``, ``RUN/best`` or a file
    in it)."""
    from deeprnn.checkpoint import resolve_checkpoint

    return resolve_checkpoint(run_or_ckpt).parent


def _same_dir(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _check_flags_against_parent(args: argparse.Namespace, cfg, meta: dict[str, Any]) -> None:
    """A fine-tuned model is the parent's model (``meta``: its checkpoint.json): a model option given with
    ``--init-from`` (a flag, a ``--config`` key or a ``--preset``'s) that differs from the parent's value would be
    ignored, so it is refused instead. ``--dry-run``'s tiny sizes are not the user's: they give way."""
    from deeprnn.models.config import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    parent = meta.get("model_config", {})
    for name, source in args.chosen_from.items():
        value = getattr(cfg, name, None)
        if name not in fields or source == "dry-run" or name not in parent or \
                parent[name] == (list(value) if isinstance(value, tuple) else value):
            continue
        there = (f"differs from the model in {args.init_from} ({parent[name]!r} there); fine-tuning keeps the "
                 "parent's model")
        if source == "flag":
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {value} {there}: drop {flag}, or train a new model without --init-from")
        if source == "config":
            raise ConfigError(f"{name} = {value!r} in {args.config} {there}: remove it from {args.config}, or train a "
                              "new model without --init-from")
        raise ConfigError(f"--preset {args.preset} sets {name} {value!r}, which {there}: drop --preset, or train a "
                          "new model without --init-from")


INHERITED_TEXT_OPTIONS = ("token", "normalization")  # how text becomes the parent's tokens


def _inherit_text_options(args: argparse.Namespace, cfg, meta: dict[str, Any]) -> None:
    """A fine-tuned model reads its new text as its parent read its own: ``--token`` and ``--normalization``
    that neither a flag, ``--preset`` nor ``--config`` sets are the parent's (a ``raw`` parent was fine-tuned on
    ``d2l`` text, the default, without a word). ``meta``: the parent's checkpoint.json."""
    parent = meta.get("train_config") or {}
    for name in INHERITED_TEXT_OPTIONS:
        if name not in args.chosen and isinstance(parent.get(name), str):
            setattr(cfg, name, parent[name])


def _print_summary(summary: dict[str, Any], cfg) -> None:
    unit = "bpc" if cfg.token == "char" else "bits/word"
    print(f"done ({summary['stop_reason']}): {summary['steps']} steps, {summary['epochs']} epochs, "
          f"{summary['train_time_s']:.1f} s, {summary['tokens_per_s'] or 0:,.0f} tokens/s on {summary['device']}")
    if summary.get("best_val_ppl") is not None:
        print(f"best validation perplexity {summary['best_val_ppl']:.3f} ({summary['best_val_bpc']:.3f} {unit})")
    if "test_ppl" in summary:
        print(f"held-out test perplexity {summary['test_ppl']:.3f} ({summary['test_bpc']:.3f} {unit}) "
              f"on {summary['test_tokens']:,} tokens, best checkpoint")
    last = summary.get("last") or {}
    if last.get("train_ppl") is not None:
        print(f"final training perplexity {last['train_ppl']:.3f}")
    if summary.get("sample"):
        print(f"sample: {summary['sample']}")
    print(f"run: {summary['run_dir']}")


def _launch_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    """Run this command again under torchrun with ``nproc`` processes, this process being torchrun's agent.

    A failure ends as one line and the failing rank's exit status, not as torchrun's ``ChildFailedError``
    traceback: each rank writes the line it would print into a report directory (``_fail``) and the agent
    prints the one that says what went wrong (the lowest rank's own error before any rank's "lost contact").
    Ctrl-C reaches the agent, which passes it on to the ranks; they save a checkpoint and rank 0's resume
    line is printed.
    """
    import logging
    import tempfile

    import torch
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []  # argv without --nproc N / --nproc=N
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    launch = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "deeprnn", *cleaned])
    muted = logging.root.manager.disable  # torchrun's agent logs a rank's failure as its own: the line is enough
    logging.disable(logging.ERROR)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # torchrun replaces them
    env = {_REPORT_DIR: None, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}  # to restore afterwards
    if env["OMP_NUM_THREADS"] is None:  # each process its share of the cores (torchrun would give each 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // nproc))
    with tempfile.TemporaryDirectory(prefix="deeprnn-ranks-") as reports:
        os.environ[_REPORT_DIR] = reports
        try:
            torchrun.run(launch)
            return 0
        except ChildFailedError as e:
            code = e.get_first_failure()[1].exitcode
            killed = sorted((rank, -f.exitcode) for rank, f in e.failures.items() if f.exitcode < 0)
            stopped = (f"deeprnn: error: rank {killed[0][0]} was killed by {_signal_name(killed[0][1])}",
                       128 + killed[0][1]) if killed else None
        except SignalException as e:
            code, stopped = 128 + e.sigval, ("deeprnn: interrupted", 128 + e.sigval)
        finally:
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            logging.disable(muted)
            for s, h in handlers.items():
                signal.signal(s, h)
        own, peer = (_rank_report(Path(reports), kind) for kind in ("own", "peer"))
    # A rank's own error says most; then a rank killed by a signal (it could not say so); then a lost peer.
    # A rank that printed a traceback (a bug) leaves nothing here: its exit status alone.
    line, code = own or stopped or peer or (None, code)
    if line:
        print(line, file=sys.stderr)
    return code


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_REPORT_DIR = "DEEPRNN_RANK_REPORTS"  # set by the --nproc launcher: where each rank leaves its failure line


def _fail(line: str, code: int, *, peer: bool = False) -> int:
    """Print a command's failure line to standard error and return its exit status. Under the ``--nproc``
    launcher a rank leaves the line for the launcher instead, which prints one line for all ranks."""
    reports = os.environ.get(_REPORT_DIR)
    if reports is None or "RANK" not in os.environ:
        print(line, file=sys.stderr)
    else:
        kind = "peer" if peer else "own"
        Path(reports, f"{kind}.{int(os.environ['RANK']):06d}").write_text(f"{code}\n{line}", encoding="utf-8")
    return code


def _rank_report(reports: Path, kind: str) -> tuple[str, int] | None:
    """The lowest rank's failure line of ``kind`` ("own", or "peer": it lost contact with another rank) and
    its exit status, if any rank left one."""
    found = sorted(reports.glob(f"{kind}.*"))
    if not found:
        return None
    code, line = found[0].read_text(encoding="utf-8").split("\n", 1)
    return line, int(code)


def cmd_generate(args: argparse.Namespace) -> int:
    from deeprnn.checkpoint import load_checkpoint
    from deeprnn.generate import generate
    from deeprnn.train import resolve_device

    if args.temperature == 0 and args.strategy == "sample":
        raise ConfigError(f"temperature must be > 0, got {args.temperature}; "
                          "use --strategy greedy for the most likely text")
    sampling = args.strategy == "sample"  # the other strategies ignore these (with a warning): not checked
    seed = args.seed
    if sampling and seed is None:  # drawn here, so that it can be told
        from deeprnn.generate import fresh_seed

        seed = fresh_seed()
    device = resolve_device(args.device)
    ck = load_checkpoint(args.checkpoint, map_location=device)
    stream = args.num_samples == 1 and args.strategy != "beam" and not args.json
    started = False  # the prefix goes out with the first piece: generate() checks every argument before it
    ignored = _ignored_generate_flags(args.strategy, getattr(args, "argv", None) or [])

    tell_seed = sampling and args.seed is None and not args.json and sys.stderr.isatty()

    def warn_ignored() -> None:  # once, when generation goes ahead, before any text: not before an error
        nonlocal ignored, tell_seed
        if ignored:
            print(f"deeprnn: warning: --strategy {args.strategy} does not use {', '.join(ignored)}; "
                  f"{'it is' if len(ignored) == 1 else 'they are'} ignored", file=sys.stderr)
            ignored = []
        if tell_seed:  # at a terminal, where it can be copied; --json holds it for programs
            print(f"deeprnn: seed {seed} (--seed {seed} draws this text again)", file=sys.stderr)
            tell_seed = False

    def on_text(i: int, piece: str) -> None:
        nonlocal started
        if not started:
            warn_ignored()
        sys.stdout.write(piece if started else args.prefix + piece)
        sys.stdout.flush()
        started = True

    import warnings

    def show(message, *_args, **_kwargs) -> None:  # at once, on stderr, before any text is written
        print(f"deeprnn: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            texts = generate(ck.model, ck.vocab, args.prefix, args.num_preds, strategy=args.strategy,
                             temperature=args.temperature if sampling else 1.0,
                             top_k=args.top_k if sampling else None, top_p=args.top_p if sampling else None,
                             num_samples=args.num_samples, beam_width=args.beam_width, seed=seed,
                             unk=args.unk, on_text=on_text if stream else None, device=device,
                             normalization=(ck.meta.get("train_config") or {}).get("normalization"))
        except DeepRNNError:
            if started:  # end the partial line, so that the error is a line of its own
                sys.stdout.write("\n")
            raise
    warn_ignored()
    if args.json:
        print(json.dumps({"samples": texts, "seed": seed if sampling else None}))
    elif stream:
        sys.stdout.write(("" if started else args.prefix) + "\n")
    else:
        for t in texts:
            print(t)
    return 0


# The options each strategy reads (deeprnn.generate.generate); the others are ignored by it.
_STRATEGY_FLAGS = {"--temperature": ("sample",), "--top-k": ("sample",), "--top-p": ("sample",),
                   "--seed": ("sample",), "--beam-width": ("beam",)}


def _given_flags(argv: list[str]) -> set[str]:
    """The long flags given in ``argv`` (``--flag`` and ``--flag=value`` alike)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _ignored_generate_flags(strategy: str, argv: list[str]) -> list[str]:
    """The flags given in ``argv`` that ``strategy`` does not use, in the order of :data:`_STRATEGY_FLAGS`."""
    given = _given_flags(argv)
    return [flag for flag, users in _STRATEGY_FLAGS.items() if flag in given and strategy not in users]


SCORE_ITS_SPLITS = ("restore the text it was trained on to score its splits, or pass --corpus FILE --split all to "
                    "score that text")


def checkpoint_split_tokens(ck, split: str, *, corpus=None, data_dir=None, encoding=None,
                            changed_fix: str = SCORE_ITS_SPLITS):
    """The tokens of ``split`` ('train', 'valid', 'test' or 'all') of the corpus a checkpoint was trained
    on (or of ``corpus``), cut exactly as its training run cut them: 'train' is the text the run trained
    on (its sources repeated by ``source_weights``, then its first ``max_tokens``); the held-out splits
    are whole, as training scored them."""
    from deeprnn.corpus import NoTokensError, build_corpus

    tcfg = ck.train_config
    sources = corpus or tcfg.get("corpus", ["timemachine"])
    if corpus is None:  # the run's own text: read it as the run did, unless told otherwise
        encoding = encoding or tcfg.get("encoding")
        saved_dir = tcfg.get("data_dir")
        data_dir = data_dir or (saved_dir if saved_dir and Path(saved_dir).is_dir() else None)
    normalization = tcfg.get("normalization", "d2l")
    try:
        built = build_corpus(sources, token=tcfg.get("token", ck.vocab.token), normalization=normalization,
                             vocab=ck.vocab, data_dir=data_dir, encoding=encoding)
    except NoTokensError as e:  # "or normalisation": the model's is fixed, and evaluate has no such flag
        raise CorpusError(f"{e.source!r} has no tokens after {normalization!r} normalisation, the one the model "
                          "was trained with; pass a text in the model's alphabet") from None
    if corpus is None:  # its splits of other text would be scored as its own: an edited file, a new edition
        from deeprnn.train import check_same_corpus, corpus_record

        run = ck.path.parent if ck.path.name in ("best", "last") else ck.path
        check_same_corpus(ck.meta.get("data"), corpus_record(built.tokens), run,
                          fix=changed_fix)
    if split == "all":
        return built.tokens
    vf, tf = tcfg.get("val_fraction", 0.05), tcfg.get("test_fraction", 0.05)
    # Another corpus is cut whole: the run's --heldout-from names its own sources (a source the new text lacks
    # was an error naming a flag evaluate does not have).
    splits = built.split((1 - vf - tf, vf, tf), heldout_from=tcfg.get("heldout_from") if corpus is None else None,
                         train_weights=tcfg.get("source_weights") if corpus is None else None)
    if split == "train":
        return splits.train[: tcfg.get("max_tokens")] if corpus is None else splits.train
    return {"valid": splits.valid, "test": splits.test}[split]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deeprnn.checkpoint import load_checkpoint
    from deeprnn.precision import check_precision
    from deeprnn.train import (LN2, MIN_HELDOUT_TOKENS, evaluate_tokens, heldout_streams, json_safe, perplexity,
                               resolve_device)

    device = resolve_device(args.device)
    ck = load_checkpoint(args.checkpoint, map_location=device)
    check_precision(args.precision, device, ck.model.config.cell, ck.model.config.impl,
                    fix="use --precision fp32 (the default) or auto")
    tokens = checkpoint_split_tokens(ck, args.split, corpus=args.corpus, data_dir=args.data_dir,
                                     encoding=args.encoding)
    if tokens.numel() < MIN_HELDOUT_TOKENS:
        others = ", ".join(x for x in ("valid", "test", "all") if x != args.split)
        field = {"valid": "val_fraction", "test": "test_fraction"}.get(args.split)
        if args.corpus is None and field and ck.train_config.get(field) == 0:  # the quality presets hold out no
            # test text: "or more text" misled
            raise ConfigError(f"the run holds out no {args.split} text (--{field.replace('_', '-')} 0 when it "
                              f"trained); use another --split ({others})")
        raise ConfigError(f"split {args.split!r} has {tokens.numel()} tokens; need at least {MIN_HELDOUT_TOKENS} to "
                          f"score: use another --split ({others}) or more text")
    dynamic = args.dynamic_lr is not None
    given = _given_flags(getattr(args, "argv", None) or [])
    unused = [flag for flag in ("--dynamic-rule", "--dynamic-decay") if flag in given and not dynamic]
    if unused:
        print(f"deeprnn: warning: {' and '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} only with "
              f"--dynamic-lr; {'it is' if len(unused) == 1 else 'they are'} ignored", file=sys.stderr)
    # Statically, as the run scored its validation text (eval_batch_size, eval_num_steps): a fixed 64 x 128 did
    # not reproduce the numbers of a run that set them (the quality presets: 8 x 512)
    tcfg = ck.train_config
    batch_size = args.batch_size or (1 if dynamic else tcfg.get("eval_batch_size", 64))
    num_steps = args.num_steps or (20 if dynamic else tcfg.get("eval_num_steps", 128))
    for flag, value in (("--batch-size", args.batch_size), ("--num-steps", args.num_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if dynamic:
        from deeprnn.dynamic import dynamic_evaluate_tokens, gradient_mean_square

        ms = None
        if args.dynamic_rule == "rms":  # the statistics come from the training text, never the scored text
            try:
                train_text = checkpoint_split_tokens(ck, "train", data_dir=args.data_dir, encoding=args.encoding,
                                                     changed_fix="")  # the fix follows below
            except CorpusError as e:  # the run's own text, not --corpus: say why it is read at all
                raise CorpusError(f"--dynamic-rule rms reads the run's training text for its gradient statistics: "
                                  f"{e}; restore it, or use --dynamic-rule sgd") from None
            ms = gradient_mean_square(ck.model, train_text, num_steps=num_steps, device=device,
                                      precision=args.precision)
        s, n = dynamic_evaluate_tokens(ck.model, tokens, lr=args.dynamic_lr, decay=args.dynamic_decay,
                                       mean_square=ms, batch_size=batch_size, num_steps=num_steps, device=device,
                                       precision=args.precision)
    else:
        s, n = evaluate_tokens(ck.model, tokens, batch_size=batch_size, num_steps=num_steps, device=device,
                               precision=args.precision)
    loss = s / n
    if dynamic and not loss < float("inf"):  # inf or nan: the updates blew the weights up; the score stands
        print(f"deeprnn: warning: dynamic evaluation diverged at --dynamic-lr {args.dynamic_lr:g} (the updated "
              "weights gave a non-finite loss); use a smaller --dynamic-lr", file=sys.stderr)
    # Over what was scored (each stream's targets), as n is: counted over the whole split, the unknown tokens
    # could outnumber the scored ones. The streams: fewer than --batch-size for a short split.
    _, targets = heldout_streams(tokens, batch_size)
    unk = int((targets == ck.vocab.unk).sum())
    if unk > n / 2:
        print(f"deeprnn: warning: {unk:,} of the {n:,} tokens scored are <unk> (outside the model's vocabulary); "
              "the perplexity says little about this text", file=sys.stderr)
    result = {"checkpoint": str(ck.path), "split": args.split, "tokens": n, "loss_nats": loss,
              "perplexity": perplexity(loss), "bits_per_token": loss / LN2, "unknown_tokens": unk,
              "batch_size": targets.shape[0], "num_steps": num_steps,
              "evaluation": "dynamic" if dynamic else "static"}
    if dynamic:
        result.update(dynamic_rule=args.dynamic_rule, dynamic_lr=args.dynamic_lr, dynamic_decay=args.dynamic_decay)
    if args.json:
        print(json.dumps(json_safe(result)))
    else:
        unit = "bpc" if ck.vocab.token == "char" else "bits/word"
        how = (f" (dynamic evaluation, {args.dynamic_rule} lr {args.dynamic_lr:g}, decay {args.dynamic_decay:g})"
               if dynamic else "")
        print(f"{args.split}{how}: perplexity {result['perplexity']:.4f}, {result['bits_per_token']:.4f} {unit}, "
              f"cross-entropy {loss:.4f} nats over {n:,} tokens ({unk:,} unknown)")
    return 0


def cmd_corpora(args: argparse.Namespace) -> int:
    from deeprnn.corpus import NAMED_CORPORA, data_dir, digest_matches

    root = data_dir(args.data_dir)
    print(f"cache directory: {root} (set DEEPRNN_DATA_DIR or --data-dir to change)")
    for name, info in NAMED_CORPORA.items():
        path = root / info.filename
        if getattr(info, "bundled", False):
            where = "bundled with deeprnn"
        elif not path.is_file():
            where = "not downloaded yet"
        else:  # checked as training would read it: a damaged copy was listed as cached, then refused
            ok = info.checksum is None or digest_matches(path.read_bytes(), info.checksum)
            where = "cached" if ok else "corrupt (delete it)"
        print(f"  {name:<20} {where:<22} {info.url}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from deeprnn.checkpoint import load_checkpoint
    from deeprnn.train import json_safe

    ck = load_checkpoint(args.checkpoint)
    meta = ck.meta
    info = {
        "checkpoint": str(ck.path),
        "deeprnn_version": meta.get("deeprnn_version"),
        "model": dataclasses.asdict(ck.model.config),  # with the defaults an older checkpoint left out
        "parameters": ck.model.num_params(),
        "vocab_size": len(ck.vocab),
        "token": ck.vocab.token,
        "position": meta.get("position"),
        "metrics": meta.get("metrics"),
        "corpus": ck.train_config.get("corpus"),
        "run": _run_progress(ck.path),
    }
    # paths only, for programs; the last one's own parent unknown when it was not found from here
    info["lineage"], info["lineage_complete"] = _lineage(meta)
    if args.json:
        print(json.dumps(json_safe(info), indent=1))
        return 0
    m = info["model"]
    print(f"checkpoint  {info['checkpoint']} (deeprnn {info['deeprnn_version']})")
    print(f"model       {m['impl']} {m['cell']} {m['num_layers']}x{m['num_hiddens']}, input {m['input']}, "
          f"{info['parameters']:,} parameters, vocabulary {info['vocab_size']} {info['token']}s")
    print(f"corpus      {', '.join(info['corpus'] or [])}")
    pos = info["position"] or {}
    print(f"trained     {pos.get('step')} steps, {pos.get('tokens', 0):,} tokens, {pos.get('train_time', 0):.1f} s")
    run = info["run"]
    if run is not None:  # a run's best/ is not where it stopped: "3 steps" read as the run's length
        state = (f"finished ({run['stop_reason']})" if run["finished"] else
                 f"unfinished: deeprnn train --resume {run['dir']} continues it")
        print(f"run         {run['steps']} steps, {state}; this is its {run['checkpoint']}/ checkpoint"
              + (" (the lowest validation loss)" if run["checkpoint"] == "best" else ""))
    met = info["metrics"] or {}
    if met.get("val_bpc") is not None:  # an overflowed perplexity is saved as null: it is inf
        ppl = float("inf") if met.get("val_ppl") is None else float(met["val_ppl"])
        unit = "bpc" if info["token"] == "char" else "bits/word"  # as evaluate and train say it
        print(f"validation  perplexity {ppl:.4f}, {float(met['val_bpc']):.4f} {unit}")
    unknown = "" if info["lineage_complete"] else " (not found from here: its own lineage is unknown)"
    print("lineage     " + (" <- ".join(info["lineage"]) + unknown if info["lineage"] else "trained from scratch"))
    return 0


def _run_progress(ckpt_path: Path) -> dict[str, Any] | None:
    """Where the run a checkpoint belongs to stands: its step (its last/ checkpoint's), whether it finished
    (``summary.json`` written at that step) and which of its checkpoints this is. None for a checkpoint
    outside a run directory."""
    from deeprnn.checkpoint import read_meta

    if ckpt_path.name not in ("best", "last"):
        return None
    run = ckpt_path.parent
    try:
        step = read_meta(run / "last")["position"]["step"]
    except (DeepRNNError, KeyError, TypeError):
        return None
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    # (a pause, Python's train(stop_after_steps=), writes its summary too: it has not finished)
    finished = isinstance(summary, dict) and summary.get("steps") == step and summary.get("stop_reason") != "paused"
    return {"dir": str(run), "steps": step, "finished": finished,
            "stop_reason": summary.get("stop_reason") if finished else None, "checkpoint": ckpt_path.name}


def _lineage(meta: dict[str, Any]) -> tuple[list[str], bool]:
    """The checkpoints a model was fine-tuned from, parent first, and whether the chain is whole (False when the
    last one was not found from here: moved, or named relative to another directory by an older run)."""
    from deeprnn.checkpoint import read_meta

    chain: list[str] = []
    parent = meta.get("parent")
    seen = set()
    while parent and parent not in seen:
        seen.add(parent)
        chain.append(parent)
        try:
            parent = read_meta(Path(parent)).get("parent")
        except DeepRNNError:
            return chain, False
    return chain, True


# ----------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsOnceFormatter
    p = OneLineParser(prog="deeprnn", description="Deep recurrent language models (D2L section 9.3), "
                "trained, evaluated and sampled from the command line.")
    p.add_argument("--version", action="version", version=f"deeprnn {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=OneLineParser, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (no arguments: the main job on The Time Machine)",
                       description="Train a deep RNN language model. With no arguments: a 2-layer LSTM on "
                       "the bundled Time Machine, held-out evaluation, about 1 minute of training on 2 CPU cores with "
                       "AVX-512, 3.5 to 6 without.")
    t.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration (flags still win)")
    t.add_argument("--config", metavar="FILE.toml", help="options from a TOML file ([train] table or top level)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.add_argument("--dry-run", action="store_true",
                   help="a few steps of a tiny model (the tiny preset's sizes and budget, under the flags you give), "
                        "to check the setup")
    t.add_argument("--nproc", type=int, default=1,
                   help="launch torchrun with this many processes (DDP) when more than 1 (default: 1)")
    t.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT", help="fine-tune: start from these weights")
    t.add_argument("--extend-vocab", action="store_true",
                   help="with --init-from: add rows for new tokens instead of mapping them to <unk>")
    t.add_argument("--freeze-layers", type=int, default=0, help="with --init-from: freeze the K lowest layers")
    add_train_flags(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate text from a trained model", formatter_class=fmt)
    g.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    g.add_argument("--prefix", default="time traveller", help="text to start from")
    g.add_argument("--num-preds", type=int, default=200, help="tokens to generate")
    g.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="sample", help="decoding strategy")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely tokens (default: all of them)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold in (0, 1] (default: 1, no threshold)")
    g.add_argument("--num-samples", type=int, default=1, help="independent samples (batched)")
    g.add_argument("--beam-width", type=int, default=4, help="beam width for --strategy beam")
    g.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling (default: one drawn and told: on stderr at a terminal, in --json)")
    g.add_argument("--unk", choices=["error", "replace"], default="error",
                   help="prefix characters outside the vocabulary: refuse, or map to <unk>")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    g.add_argument("--json", action="store_true", help="print the samples as JSON")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="perplexity and bits per character of a checkpoint", formatter_class=fmt)
    e.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    e.add_argument("--corpus", nargs="+", default=None, help="corpora/files to score (default: the run's corpus)")
    e.add_argument("--split", choices=["train", "valid", "test", "all"], default="test",
                   help="which split of the corpus to score: 'train' is the text the run trained on "
                        "(after --max-tokens and --source-weights); 'all' for a new file")
    e.add_argument("--data-dir", default=None,
                   help="cache directory for named corpora (default: $DEEPRNN_DATA_DIR, else ~/.cache/deeprnn)")
    e.add_argument("--encoding", default=None,
                   help="text encoding of the files (default: the run's for its own files; UTF-8, cp1252 detected)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="parallel streams (default: the run's --eval-batch-size, 64 unless it set one; 1 with "
                        "--dynamic-lr, so the text is read in order)")
    e.add_argument("--num-steps", type=int, default=None,
                   help="window length (default: the run's --eval-num-steps, 128 unless it set one; 20 with "
                        "--dynamic-lr)")
    e.add_argument("--dynamic-lr", type=float, default=None, metavar="LR",
                   help="dynamic evaluation: after scoring each window, take an SGD step of this size on it "
                        "(Krause et al. 2018; reported apart from static scores; default: off)")
    e.add_argument("--dynamic-rule", choices=["rms", "sgd"], default="rms",
                   help="dynamic evaluation update: steps scaled by the RMS of training gradients, or plain SGD")
    e.add_argument("--dynamic-decay", type=float, default=0.0, metavar="D",
                   help="dynamic evaluation: pull the weights back towards the trained ones by this fraction per window")
    e.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="compute precision (auto: bf16 where the device multiplies it natively)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("corpora", help="list named corpora and where they are cached", formatter_class=fmt)
    c.add_argument("--data-dir", default=None,
                   help="cache directory (default: $DEEPRNN_DATA_DIR, else ~/.cache/deeprnn)")
    c.set_defaults(func=cmd_corpora)

    i = sub.add_parser("info", help="describe a checkpoint: model, training, metrics, lineage", formatter_class=fmt)
    i.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)

    for name, module in (("compare", "deeprnn.compare"), ("serve", "deeprnn.serve")):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return p


class _OutputError(Exception):
    """Standard output cannot be written (a closed pipe, a full disk); ``args[0]`` is the OSError."""


class _Stdout:
    """``sys.stdout`` while a command runs, its write errors raised as :class:`_OutputError`, so that the
    entry point tells them apart from other OSErrors (a full disk under a run directory)."""

    def __init__(self, stream):
        self._stream = stream
        self._closed = False

    def write(self, text: str) -> int:
        if self._closed:
            return len(text)
        try:
            return self._stream.write(text)
        except UnicodeEncodeError as e:  # a ValueError: it escaped as a traceback
            encoding = getattr(self._stream, "encoding", None) or e.encoding
            raise _OutputError(OSError(
                f"standard output's encoding ({encoding}) cannot write {e.object[e.start:e.end]!r}; set "
                "PYTHONIOENCODING=utf-8")) from e
        except OSError as e:
            from deeprnn.train import request_stop

            # A closed pipe while training (deeprnn train | head): stop as Ctrl-C would, saving a checkpoint,
            # and drop the rest of the output. Elsewhere the command ends (cli._output_failed).
            if isinstance(e, BrokenPipeError) and request_stop(signal.SIGPIPE):
                self._closed = True
                _stdout_to_devnull()
                return len(text)
            raise _OutputError(e) from e

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise _OutputError(e) from e

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _output_failed(error: OSError) -> int:
    """A closed pipe (``deeprnn generate ... | head``) ends the command quietly with status 141 (128 + SIGPIPE),
    as it would a shell tool; any other write error is one line and status 1. Either way standard output is
    pointed at /dev/null first, so that the interpreter's flush at exit cannot fail again (see the Python
    documentation's "Note on SIGPIPE")."""
    _stdout_to_devnull()
    if isinstance(error, BrokenPipeError):
        return 141
    return _fail(f"deeprnn: error: cannot write the output: {error.strerror or error}", 1)


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a file descriptor (a test harness's capture)
        pass


# What does not fit in memory, and the flags that shrink it, by command.
OUT_OF_MEMORY = {
    "train": ("the model or batch", "use a smaller --num-hiddens, --num-layers or --batch-size"),
    "compare": ("the model or batch", "use smaller --hiddens or --layers, or --set batch_size=N with a smaller N"),
    "evaluate": ("the model or batch", "use a smaller --batch-size or --num-steps"),
    "generate": ("the batch of samples", "ask for fewer --num-samples or --num-preds, or a smaller --beam-width"),
    "serve": ("a model", "serve fewer or smaller models"),
}


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # at any point outside training's own handler, also while torch is imported
        print("deeprnn: interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank of a multi-process run has left its process group (cli._main's finally) and written
        # everything it writes (checkpoints are fsynced, metrics closed per row). Skip the interpreter's
        # teardown: gloo's threads, destroyed during it, can abort the process ("terminate called
        # without an active exception", exit -6) after a run that succeeded.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code or 0))
    return code


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: ``MemoryError``, torch's (CUDA) ``OutOfMemoryError`` or its CPU
    allocator's ``RuntimeError``."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


class StderrHandler(logging.StreamHandler):
    """A log handler that writes to ``sys.stderr`` as it is at each line (as logging's last-resort handler
    does), not as it was when the handler was made: one bound to a replaced stream (a test's capture, closed
    since) failed with "--- Logging error ---"."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _main(argv: list[str] | None) -> int:
    from deeprnn.allocator import keep_freed_memory

    keep_freed_memory()  # a deeprnn command owns its process: keep freed memory for reuse (deeprnn.allocator)
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.stderr.isatty():  # at a terminal, say what a long silent pause is (e.g. the first C++ build)
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("deeprnn: %(message)s"))
        logger = logging.getLogger("deeprnn")
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = parser._subparsers._group_actions[0].choices.get(args.command) if args.command else None
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    from deeprnn.train import TrainingInterrupted

    args.argv = argv  # what --nproc relaunches under torchrun
    ok = False
    stdout, sys.stdout = sys.stdout, _Stdout(sys.stdout)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a write error surfaces here, not as a message at interpreter exit
        ok = True
        return code
    except _OutputError as e:
        return _output_failed(e.args[0])
    except TrainingInterrupted as e:
        if os.environ.get("RANK", "0") != "0" and _REPORT_DIR not in os.environ:
            return 128 + e.signum  # every rank stopped at the same step; rank 0 says how to resume
        return _fail(f"deeprnn: {e}", 128 + e.signum)
    except DeepRNNError as e:
        return _fail(f"deeprnn: error: {e}", 2)
    except Exception as e:
        from deeprnn import distributed

        if _out_of_memory(e):
            what, fix = OUT_OF_MEMORY.get(args.command, OUT_OF_MEMORY["train"])
            return _fail(f"deeprnn: error: out of memory: {what} does not fit on this device; {fix}", 1)
        lost = distributed.peer_failure(e)  # another rank failed first and said why
        if lost is None:
            raise
        return _fail(f"deeprnn: error: {lost}", 1, peer=True)
    finally:
        sys.stdout = stdout
        from deeprnn import distributed

        distributed.shutdown(wait=ok)
