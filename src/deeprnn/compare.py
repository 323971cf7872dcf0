"""Experiments as commands: a grid of training runs under one budget, cached, summarised as a report.

``deeprnn compare`` expands a grid — cells × layers × hiddens × implementations × data variants ×
seeds — into :class:`~deeprnn.train.TrainConfig` s that differ only on those axes, trains each with
:func:`deeprnn.train.train` in ``RUNS/<config hash>/`` (a run whose ``summary.json`` exists is
reused, ``--rerun`` forces), and writes a report directory::

    OUT/report.md     Markdown table, one row per configuration (mean ± std over seeds)
    OUT/results.csv   one row per run (every seed), every recorded number
    OUT/curves.png    held-out perplexity against training wall time, one line per configuration
    OUT/speed.png     training tokens per second, one bar per configuration

A *data variant* is a labelled list of sources trained on together, optionally with
``heldout_from`` (only those sources give validation/test text, the rest go wholly to training:
the "more data" experiment) and ``weights`` (a source's training text repeated or truncated: the
"merging authors" experiment). ``eval_on`` scores each run's best checkpoint on the validation span
of each named source, cut exactly as training cut it, so per-source numbers never score training text.

The seed's exercises 2-4 are the presets in :data:`PRESETS`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deeprnn.corpus import (MAX_SOURCE_WEIGHT, NAMED_CORPORA, check_sources, match_sources,
                            respell_encoding_option, source_names, valid_source_weight)
from deeprnn.errors import ConfigError, CorpusError
from deeprnn.files import write_text_atomic

# Held-out files of a weighted variant are split (≈0, valid, test): this leaves int(n * 2e-9) = 0
# tokens to training for any text shorter than 5e8 tokens, so no held-out token is ever trained on.
_EPS = 1e-9


@dataclass
class DataVariant:
    """Sources trained on together. ``weights`` maps a source to a multiplier on its training text
    (2.5 = two copies and half of a third, 0.3 = its first 30 %), or is ``"balance"``: every source
    repeated up to the largest one's training size."""

    label: str
    corpus: list[str]
    heldout_from: list[str] | None = None
    weights: dict[str, float] | str | None = None


@dataclass
class GridSpec:
    """What ``deeprnn compare`` runs. ``base`` holds fixed TrainConfig overrides shared by every run."""

    cells: list[str] = field(default_factory=lambda: ["lstm"])
    layers: list[int] = field(default_factory=lambda: [2])
    hiddens: list[int] = field(default_factory=lambda: [256])
    impls: list[str] = field(default_factory=lambda: ["concise"])
    seeds: list[int] = field(default_factory=lambda: [0])
    data: list[DataVariant] = field(default_factory=lambda: [DataVariant("timemachine", ["timemachine"])])
    base: dict[str, Any] = field(default_factory=dict)
    eval_on: list[str] = field(default_factory=list)  # sources scored on their own validation span
    target_ppl: float | None = None  # report the training time to reach this held-out perplexity
    title: str = "deeprnn compare"
    description: str = ""  # Markdown placed above the table (the question and the recipe)


@dataclass
class RunPoint:
    """One grid point: the config to train, its cache key and its place in the report."""

    label: str  # the configuration, without the seed
    seed: int
    variant: DataVariant
    cfg: Any  # TrainConfig (logical: the variant's own sources, before weighting)
    key: str


# ----------------------------------------------------------------------------------------------
# presets: the seed's exercises 2-4

# The book's architecture (section 9.3: 2 x 256, one-hot input, batch 32 x 35) with a recipe that is
# measured on held-out text. The book's SGD lr 2 for 500 epochs on 10,000 characters memorises them
# ("perplexity 1.0" for every cell); here every cell gets the same wall-clock budget on the whole
# book with a held-out tail, Adam 3e-3 with a cosine decay over that budget, clipping 1, no dropout
# (too short a budget to overfit), precision auto (the project default: bf16 autocast where the device
# multiplies bf16 natively, 2x faster for the LSTM on an AVX-512 CPU; fp32 elsewhere).
BOOK_RECIPE: dict[str, Any] = dict(
    normalization="d2l", token="char", input="one_hot", dropout=0.0, init="torch", batch_size=32,
    num_steps=35, sampling="sequential", optimizer="adam", lr=3e-3, clip=1.0, schedule="cosine",
    precision="auto", eval_every=100, sample_every=0, num_preds=0,
)

WELLS = ["timemachine", "war-of-the-worlds"]

PRESETS: dict[str, dict[str, Any]] = {
    "gru-vs-lstm": dict(
        title="Exercise 2: vanilla RNN vs GRU vs LSTM at the book's configuration",
        cells=["rnn_tanh", "gru", "lstm"], layers=[2], hiddens=[256], impls=["concise"], seeds=[0],
        data=[DataVariant("timemachine", ["timemachine"])], base=dict(BOOK_RECIPE), minutes=1.0,
        target_ppl=8.0,
        description=(
            "Which cell is more accurate and which is faster at the book's 2 x 256 configuration? The book "
            "answers \"perplexity 1.0 for both\" because it scores the 10,000 characters it trained on. "
            "Here every cell trains on the whole *Time Machine* (90 %) for the same wall-clock budget and is "
            "scored on the held-out 5 % validation / 5 % test tail.\n\n"
            "Recipe (all cells alike): one-hot input, 2 layers x 256 hidden units, batch 32 x 35 sequential, "
            "Adam lr 3e-3 with a cosine decay over the budget, clipping 1, no dropout, bf16 autocast where "
            "the CPU has AVX-512 (fp32 elsewhere), "
            "evaluation every 100 steps."),
    ),
    "more-data": dict(
        title="Exercise 3: more data — The Time Machine alone vs + The War of the Worlds",
        cells=["lstm"], layers=[2], hiddens=[256], impls=["concise"], seeds=[0],
        data=[DataVariant("timemachine", ["timemachine"], heldout_from=["timemachine"]),
              DataVariant("timemachine+war-of-the-worlds", WELLS, heldout_from=["timemachine"])],
        base=dict(BOOK_RECIPE), minutes=1.0, target_ppl=8.0, eval_on=["timemachine"],
        description=(
            "Does adding *The War of the Worlds* to the training text lower the perplexity on *The Time "
            "Machine*? Both models are scored on **the same held-out Time Machine split** (its last 10 %: "
            "validation 5 %, test 5 %); with `heldout_from=[\"timemachine\"]` the added book goes wholly to "
            "training and never into the held-out text. Recipe: the gru-vs-lstm recipe (2 x 256 LSTM, "
            "one-hot, Adam 3e-3 cosine, clip 1, no dropout)."),
    ),
    "authors": dict(
        title="Exercise 4: merging authors — Wells vs Tiny Shakespeare vs the merge",
        cells=["lstm"], layers=[2], hiddens=[256], impls=["concise"], seeds=[0],
        data=[DataVariant("wells", WELLS),
              DataVariant("shakespeare", ["tinyshakespeare"]),
              DataVariant("merge", [*WELLS, "tinyshakespeare"]),
              DataVariant("merge-balanced", [*WELLS, "tinyshakespeare"], weights="balance")],
        base=dict(BOOK_RECIPE), minutes=1.0, target_ppl=8.0,
        eval_on=[*WELLS, "tinyshakespeare"],
        description=(
            "Should texts by different authors be merged? Each model is scored on the validation span of "
            "every source (each source is split 90/5/5 on its own, so these spans are never trained on). "
            "`merge-balanced` repeats each source's training text up to the largest one's size "
            "(`--weights balance`). The book's `d2l` normalisation (lower-case letters and spaces) gives "
            "every source the same 28-symbol vocabulary, so cross-author perplexities are comparable. "
            "Recipe: the gru-vs-lstm recipe (2 x 256 LSTM, one-hot, Adam 3e-3 cosine, clip 1, no dropout)."),
    ),
}


# ----------------------------------------------------------------------------------------------
# the grid


def _norm_heldout(corpus: list[str], heldout_from: list[str] | None) -> list[str] | None:
    """``None`` when every source is held out anyway, so equal computations share a cache key."""
    if heldout_from is None or set(heldout_from) >= set(corpus):
        return None
    return list(heldout_from)


def held_sources(variant: DataVariant) -> list[str]:
    """The sources that give ``variant`` its validation and test text: those of ``--heldout-from`` that it
    trains on (``--heldout-from A,B`` with a variant of A alone holds out A), or all of them without it.
    Raises ConfigError when it trains on none of them: it would have no held-out text."""
    names = source_names(variant.corpus)
    if variant.heldout_from is None:
        return names
    matched = match_sources(names, variant.heldout_from)
    held = [s for s in variant.heldout_from if matched[s]]
    if not held:
        raise ConfigError(f"--heldout-from {','.join(variant.heldout_from)}: variant {variant.label!r} trains on "
                          f"none of these ({', '.join(names)}), so it would have no held-out text; name a source of "
                          "every variant, or compare these variants separately")
    return held


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file's bytes (cached while its modification time and size stay the same)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest(path: Path) -> str:
    st = path.stat()
    return _file_digest(os.path.realpath(path), st.st_mtime_ns, st.st_size)


def source_identity(spec: str) -> str:
    """What a corpus spec reads, for a cache key: a file is the SHA-256 of its bytes, a directory that of the names
    and bytes of the ``.txt`` files training reads from it (``corpus.source_names``). So a run is reused for the
    same text wherever it lies, and never for other text behind the same path (an edited file, or ``text.txt`` in
    another folder). A named corpus stays its name, as the keys of every run before this had it: its text is
    the one the project names (checksum-verified, but for The War of the Worlds, which Gutenberg re-encodes at
    times). A path that cannot be read stays as given (training says why)."""
    if spec in NAMED_CORPORA:
        return spec
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            h = hashlib.sha256()
            for name in source_names([spec]):
                f = Path(name)
                h.update(f.name.encode("utf-8", "surrogateescape") + b"\0" + _digest(f).encode() + b"\0")
            return "dir:sha256:" + h.hexdigest()
        if path.is_file():
            return "file:sha256:" + _digest(path)
    except (OSError, CorpusError):  # a directory without .txt files: training says so
        pass
    return spec


def config_key(cfg, weights: dict[str, float] | str | None = None) -> str:
    """Cache key of a run: a hash of every TrainConfig field that shapes the result, the text its corpus
    files hold (:func:`source_identity`), and the weights."""
    d = dataclasses.asdict(cfg)
    identity = {spec: source_identity(spec) for spec in [*d["corpus"], *(d.get("heldout_from") or [])]}
    if any(identity[k] != k for k in identity):  # named corpora only: the key is as it always was
        d["corpus"] = [identity[x] for x in d["corpus"]]
        if d.get("heldout_from"):
            d["heldout_from"] = [identity[x] for x in d["heldout_from"]]
    if d.get("precision") == "auto":  # what auto means on this machine: a bf16 run is not reused as fp32
        from deeprnn.precision import resolve_precision
        from deeprnn.train import resolve_device

        d["precision"] = resolve_precision("auto", resolve_device(cfg.device))
    for volatile in ("run_dir", "data_dir", "device"):
        d.pop(volatile, None)
    d["_weights"] = weights
    blob = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def expand_grid(spec: GridSpec) -> list[RunPoint]:
    """Every grid point in report order (data variant, cell, layers, hiddens, impl, then seed)."""
    from deeprnn.train import TrainConfig

    points = []
    multi = len(spec.data) > 1
    held = {v.label: held_sources(v) if v.heldout_from is not None else None for v in spec.data}
    weights = spec.base.get("source_weights")
    for variant in spec.data:
        if weights is not None:  # checked for every variant before the first one trains
            if variant.weights:
                raise ConfigError("--set source_weights and --weights both weight the training text; use one of "
                                  "them")
            names = source_names(variant.corpus)
            if len(weights) != len(names):
                raise ConfigError(f"--set source_weights has {len(weights)} values but variant {variant.label!r} "
                                  f"has {len(names)} source{'s' * (len(names) != 1)} ({', '.join(names)}); give one "
                                  "weight per source, in order, or weight sources by name with --weights SRC=W")
    for variant in spec.data:
        for cell in spec.cells:
            for layers in spec.layers:
                for hiddens in spec.hiddens:
                    for impl in spec.impls:
                        label = f"{cell} {layers}x{hiddens} {impl}"
                        if multi:
                            label = f"{variant.label} · {label}"
                        for seed in spec.seeds:
                            cfg = TrainConfig(**{
                                **spec.base, "corpus": list(variant.corpus),
                                "heldout_from": _norm_heldout(variant.corpus, held[variant.label]),
                                "cell": cell, "num_layers": layers, "num_hiddens": hiddens, "impl": impl,
                                "seed": seed})
                            cfg.validate()
                            points.append(RunPoint(label, seed, variant, cfg, config_key(cfg, variant.weights)))
    return points


# ----------------------------------------------------------------------------------------------
# data: held-out spans and weighted training text


def split_fractions(cfg) -> tuple[float, float, float]:
    return (1 - cfg.val_fraction - cfg.test_fraction, cfg.val_fraction, cfg.test_fraction)


def heldout_ranges(corpus, fractions, heldout_from=None) -> dict[str, list[tuple[str, int, int]]]:
    """Where :meth:`Corpus.split` takes each part from (see :meth:`Corpus.split_ranges`)."""
    return corpus.split_ranges(fractions, heldout_from)


def _weight_for(weights, name: str, n_train: int, largest: int) -> float:
    if weights == "balance":
        return largest / max(1, n_train)
    return float((weights or {}).get(name, 1.0))


def materialise_weighted(cfg, weights, dest: Path):
    """Write a weighted variant's text to ``dest`` and return the TrainConfig that trains on it.

    Per source, ``<i>.train.txt`` holds its training text repeated/truncated by its weight and
    ``<i>.heldout.txt`` its untouched validation + test text; the returned config holds out only the
    ``.heldout`` files, split so that none of their tokens reach training (see ``_EPS``).
    """
    from deeprnn.corpus import build_corpus, repeat_tokens

    if isinstance(weights, dict):
        bad = [w for w in weights.values() if not valid_source_weight(w)]
        if bad:
            raise ConfigError(f"weights must be in (0, {MAX_SOURCE_WEIGHT:,}], got {bad[0]}")
    corpus = build_corpus(cfg.corpus, token=cfg.token, normalization=cfg.normalization,
                          data_dir=cfg.data_dir, encoding=cfg.encoding)
    fr = split_fractions(cfg)
    ranges = heldout_ranges(corpus, fr, cfg.heldout_from)
    train_of = {name: (a, b) for name, a, b in ranges["train"]}
    largest = max((b - a for a, b in train_of.values()), default=0)
    dest.mkdir(parents=True, exist_ok=True)
    train_files, held_files = [], []
    for i, (name, start, end) in enumerate(corpus.spans):
        a, b = train_of.get(name, (start, start))
        ids = corpus.tokens[a:b]
        weighted = repeat_tokens(ids, _weight_for(weights, name, b - a, largest))
        if weighted.numel():
            p = dest / f"{i}.train.txt"
            p.write_text(corpus.vocab.decode(weighted), encoding="utf-8")
            train_files.append(str(p))
        held = [(a2, b2) for part in ("valid", "test") for n2, a2, b2 in ranges[part] if n2 == name]
        if held:
            p = dest / f"{i}.heldout.txt"
            p.write_text(corpus.vocab.decode(corpus.tokens[held[0][0]: held[-1][1]]), encoding="utf-8")
            held_files.append(str(p))
    if not held_files:
        raise ConfigError("heldout_from leaves no validation text in the weighted variant")
    vf, tf = cfg.val_fraction, cfg.test_fraction
    scale = (1 - 2 * _EPS) / (vf + tf)
    return dataclasses.replace(cfg, corpus=train_files + held_files, heldout_from=held_files,
                               val_fraction=vf * scale, test_fraction=tf * scale)


# ----------------------------------------------------------------------------------------------
# one run


def time_to_target(rows: list[dict[str, str]], target: float | None) -> float | None:
    """Training seconds (``elapsed_s``) at the first evaluation with held-out perplexity <= target."""
    if target is None:
        return None
    for r in rows:
        v = r.get("val_ppl", "")
        if v not in ("", "nan") and float(v) <= target:
            return float(r["elapsed_s"])
    return None


def trained_whole(variant: DataVariant, spec: str) -> bool:
    """Whether ``variant`` trains on all of a source ``spec`` names (none of it held out), however the path is
    spelled (``./d/a.txt`` for ``d/a.txt``) and a file inside a directory the variant trains on."""
    names = source_names(variant.corpus)
    named = match_sources(names, [spec])[spec]
    if variant.heldout_from is None:
        return False
    held = {name for found in match_sources(names, variant.heldout_from).values() for name in found}
    return any(name not in held for name in named)


def check_eval_on(points: list[RunPoint], eval_on: list[str]) -> None:
    """Each ``--eval-on`` source that a variant does not train on whole must have a validation span long enough
    to score, as the variant's runs cut it: refused before the grid trains (the column said ``nan`` after it)."""
    from deeprnn.corpus import build_corpus
    from deeprnn.train import MIN_HELDOUT_TOKENS, heldout_streams

    checked = set()
    for point in points:
        cfg = point.cfg
        for src in eval_on:
            cut = (src, cfg.token, cfg.normalization, cfg.val_fraction, cfg.test_fraction, cfg.eval_batch_size)
            if cut in checked or trained_whole(point.variant, src):
                continue
            checked.add(cut)
            corpus = build_corpus([src], token=cfg.token, normalization=cfg.normalization, data_dir=cfg.data_dir,
                                  encoding=cfg.encoding)
            valid = corpus.split(split_fractions(cfg)).valid
            if heldout_streams(valid, cfg.eval_batch_size) is None:
                raise ConfigError(f"--eval-on {src}: its validation span has {valid.numel()} tokens (--set "
                                  f"val_fraction={cfg.val_fraction:g}); it needs at least {MIN_HELDOUT_TOKENS} to be "
                                  "scored: use a longer text, or leave it out of --eval-on")


def per_source_eval(run_dir: Path, cfg, variant: DataVariant, sources: list[str]) -> dict[str, dict[str, Any]]:
    """Best checkpoint scored on each source's own validation span (cut as training cut it).

    A source the run trained on without holding any of it out is not scored (``None``): its
    "validation span" was training text.
    """
    from deeprnn.checkpoint import load_checkpoint
    from deeprnn.corpus import build_corpus
    from deeprnn.train import LN2, evaluate_tokens, perplexity

    ck = load_checkpoint(run_dir, map_location="cpu")
    out: dict[str, dict[str, Any]] = {}
    for src in sources:
        if trained_whole(variant, src):
            out[src] = None
            continue
        corpus = build_corpus([src], token=cfg.token, normalization=cfg.normalization, vocab=ck.vocab,
                              data_dir=cfg.data_dir, encoding=cfg.encoding)
        valid = corpus.split(split_fractions(cfg)).valid
        s, n = evaluate_tokens(ck.model, valid, batch_size=cfg.eval_batch_size, num_steps=cfg.eval_num_steps,
                               precision=cfg.precision)
        loss = s / n if n else float("nan")
        out[src] = {"ppl": perplexity(loss), "bpc": loss / LN2, "tokens": n,
                    "unknown": int((valid == ck.vocab.unk).sum())}
    return out


def run_point(point: RunPoint, runs_dir: Path, *, eval_on: list[str], target_ppl: float | None,
              rerun: bool = False, train_log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``point`` unless ``runs_dir/<key>/summary.json`` exists; return its record."""
    from deeprnn.rundir import check_overwritable, read_metrics, run_lock
    from deeprnn.train import TrainingInterrupted, json_safe, train

    run_dir = runs_dir / point.key
    state = point_state(run_dir, rerun)
    cached = state == "cached"
    if not cached:
        if run_dir.is_dir():  # a point another compare (or train) is training now: refused before anything changes
            with run_lock(run_dir, resume=True):
                pass
        cfg = dataclasses.replace(point.cfg, run_dir=str(run_dir))
        # A run of this point that was interrupted (Ctrl-C, SIGTERM, a closed pipe) continues where it stopped.
        info = _json_object(run_dir / "compare.json") if state == "continuing" else None
        if info is None:
            if run_dir.exists() and not run_dir.is_dir():  # mkdir's FileExistsError was a traceback
                raise ConfigError(f"{run_dir} is a file where compare keeps this run; move it away")
            stale = ("summary.json", "eval.json")  # the cache entry: dropped, damaged or not
            if run_dir.is_dir():  # train's refusal of a file it did not write came after the results were gone
                check_overwritable(run_dir, instead="use another --runs-dir", damaged_ok=stale)
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in stale:
                (run_dir / name).unlink(missing_ok=True)
            info = {"label": point.label, "seed": point.seed, "key": point.key,
                    "variant": dataclasses.asdict(point.variant), "config": dataclasses.asdict(point.cfg),
                    "wall_s": None, "finished": None}
            # Written first: it marks the folder as a run's (deeprnn.rundir.holds_run) before data/ goes in.
            write_text_atomic(run_dir / "compare.json", json.dumps(info, indent=1) + "\n")
        if point.variant.weights:
            cfg = materialise_weighted(cfg, point.variant.weights, run_dir / "data")
        t0 = time.perf_counter()
        try:
            train(cfg, resume=bool(info.get("interrupted")), overwrite=not info.get("interrupted"), progress=False,
                  log=train_log or (lambda *_a, **_k: None))
        except TrainingInterrupted as e:  # wall time so far kept; the same compare command continues the run
            info.update(interrupted=True, wall_s_so_far=(info.get("wall_s_so_far") or 0) + time.perf_counter() - t0)
            write_text_atomic(run_dir / "compare.json", json.dumps(info, indent=1) + "\n")
            raise TrainingInterrupted(e.signum, e.run_dir, resume_with="the same deeprnn compare command") from None
        info.update(wall_s=(info.pop("wall_s_so_far", None) or 0) + time.perf_counter() - t0,
                    finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        info.pop("interrupted", None)
        write_text_atomic(run_dir / "compare.json", json.dumps(info, indent=1) + "\n")
    summary, info = _json_object(run_dir / "summary.json"), _json_object(run_dir / "compare.json")

    eval_path = run_dir / "eval.json"
    evals = {k: v for k, v in (_json_object(eval_path) or {}).items()  # a damaged cache is scored again
             if isinstance(v, dict) and {"ppl", "bpc"} <= v.keys()}
    missing = [s for s in eval_on if s not in evals]
    if missing:
        evals.update(per_source_eval(run_dir, point.cfg, point.variant, missing))
        write_text_atomic(eval_path, json.dumps(json_safe(evals), indent=1) + "\n")

    last = summary.get("last") or {}
    cfg = point.cfg
    rec: dict[str, Any] = {
        "label": point.label, "data": point.variant.label, "cell": cfg.cell, "layers": cfg.num_layers,
        "hiddens": cfg.num_hiddens, "impl": cfg.impl, "seed": point.seed, "key": point.key,
        "parameters": summary.get("parameters"),
        "best_val_ppl": summary.get("best_val_ppl"), "best_val_bpc": summary.get("best_val_bpc"),
        "final_val_ppl": _num(last.get("val_ppl")), "final_val_bpc": _num(last.get("val_bpc")),
        "test_ppl": summary.get("test_ppl"), "test_bpc": summary.get("test_bpc"),
        "train_ppl": _num(last.get("train_ppl")), "tokens": _num(last.get("tokens")),
        "tokens_per_s": summary.get("tokens_per_s"),
        "train_time_s": summary.get("train_time_s"), "wall_s": info.get("wall_s"),
        "steps": summary.get("steps"), "epochs": summary.get("epochs"),
        "target_ppl": target_ppl,
        "time_to_target_s": time_to_target(read_metrics(run_dir / "metrics.csv"), target_ppl),
        "stop_reason": summary.get("stop_reason"), "cached": cached, "run_dir": str(run_dir),
    }
    for src in eval_on:
        e = evals.get(src)
        rec[f"valid_ppl[{src}]"] = e["ppl"] if e else None
        rec[f"valid_bpc[{src}]"] = e["bpc"] if e else None
        rec[f"trained_on[{src}]"] = trained_whole(point.variant, src)
    return rec


def _json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object read from ``path``; None when it is missing or damaged (cut short by a kill, edited)."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def point_state(run_dir: Path, rerun: bool = False) -> str:
    """What a grid point's run directory calls for: "cached" (its summary.json, compare.json and metrics.csv
    readable: a damaged one is trained again rather than stopping the grid with a traceback, or reporting a
    target "not reached" for want of the curve), "continuing" (a run that stopped with a checkpoint to resume) or
    "training"; ``rerun`` trains every point from the start."""
    from deeprnn.rundir import holds_metrics

    if rerun:
        return "training"
    info = _json_object(run_dir / "compare.json")
    if info is not None and _json_object(run_dir / "summary.json") is not None and holds_metrics(run_dir):
        return "cached"
    if info and info.get("interrupted") and (run_dir / "last" / "checkpoint.json").exists():
        return "continuing"
    return "training"


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ----------------------------------------------------------------------------------------------
# the report

COLUMNS = [  # (record field, header, format)
    ("parameters", "params", "{:,.0f}"),
    ("best_val_ppl", "held-out ppl (best)", "{:.3f}"),
    ("best_val_bpc", "held-out bpc (best)", "{:.3f}"),
    ("final_val_ppl", "held-out ppl (final)", "{:.3f}"),
    ("final_val_bpc", "held-out bpc (final)", "{:.3f}"),
    ("test_ppl", "test ppl (best ckpt)", "{:.3f}"),
    ("train_ppl", "train ppl (final)", "{:.3f}"),
    ("tokens", "tokens seen", "{:,.0f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
]


def _cell(values: list[float | None], fmt: str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    text = fmt.format(mean)
    if len(vals) > 1:
        text += " ± " + fmt.format(statistics.stdev(vals))
    return text


def aggregate(records: list[dict[str, Any]], eval_on: list[str], target_ppl: float | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the report table: one row per configuration, mean ± std over its seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["label"], []).append(r)
    header = ["configuration", "seeds", *[h for _, h, _ in COLUMNS]]
    if target_ppl is not None:
        header.append(f"train s to ppl ≤ {target_ppl:g}")
    header += [f"valid ppl {src}" for src in eval_on]
    rows = []
    for label, runs in groups.items():
        row = [label, str(len(runs))]
        row += [_cell([r[k] for r in runs], fmt) for k, _, fmt in COLUMNS]
        if target_ppl is not None:
            reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
            if len(reached) == len(runs):
                row.append(_cell(reached, "{:.1f}"))
            else:
                row.append(f"not reached ({len(runs) - len(reached)}/{len(runs)})")
        for src in eval_on:
            vals = [r[f"valid_ppl[{src}]"] for r in runs]
            if any(v is not None for v in vals):
                row.append(_cell(vals, "{:.3f}"))
            else:  # only a source trained on whole is "trained on"; an unscored one (an older cache's nan) is not
                row.append("n/a (trained on)" if all(r.get(f"trained_on[{src}]", True) for r in runs) else "n/a")
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def cells(row: list[str]) -> str:  # a label's own "|" would end its cell
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    lines = [cells(header), "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
    lines += [cells(r) for r in rows]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict[str, Any]], out_png: Path, target_ppl: float | None = None) -> None:
    """Held-out perplexity against training seconds; seeds of one configuration share a colour."""
    from deeprnn.rundir import read_metrics

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours: dict[str, Any] = {}
    for r in records:
        rows = [x for x in read_metrics(Path(r["run_dir"]) / "metrics.csv") if _num(x["val_ppl"]) is not None]
        if not rows:
            continue
        first = r["label"] not in colours
        if first:
            colours[r["label"]] = f"C{len(colours) % 10}"
        ax.plot([float(x["elapsed_s"]) for x in rows], [float(x["val_ppl"]) for x in rows],
                color=colours[r["label"]], marker=".", alpha=0.9, label=r["label"] if first else None)
    if target_ppl is not None:
        ax.axhline(target_ppl, color="grey", linestyle=":", linewidth=1, label=f"target ppl {target_ppl:g}")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("held-out (validation) perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[1]:  # no run scored yet: an empty chart, without matplotlib's warning
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, metadata=PNG_METADATA)
    plt.close(fig)


def plot_speed(records: list[dict[str, Any]], out_png: Path) -> None:
    """Training tokens per second per configuration (bar = mean, whisker = std over seeds)."""
    plt = _plt()
    groups: dict[str, list[float]] = {}
    for r in records:
        groups.setdefault(r["label"], []).append(r["tokens_per_s"] or 0.0)
    labels = list(groups)
    means = [statistics.fmean(v) for v in groups.values()]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in groups.values()]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 4.5), dpi=100)
    ax.bar(range(len(labels)), means, yerr=stds, color=[f"C{i % 10}" for i in range(len(labels))], capsize=4)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("training tokens / s")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, metadata=PNG_METADATA)
    plt.close(fig)


def _answers(records: list[dict[str, Any]], eval_on: list[str], same_heldout: bool = True) -> list[str]:
    """One-line answers: the most accurate and the fastest configuration, the best on each source.
    The most accurate is only named when every run was scored on the same held-out sources."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["label"], []).append(r)

    def mean(label, key):
        vals = [r[key] for r in by[label] if r[key] is not None]
        return statistics.fmean(vals) if vals else None

    lines = []
    acc = [(mean(k, "best_val_ppl"), k) for k in by if mean(k, "best_val_ppl") is not None]
    if acc and same_heldout:
        v, k = min(acc)
        lines.append(f"- Lowest held-out perplexity: **{k}** ({v:.3f}).")
    spd = [(mean(k, "tokens_per_s"), k) for k in by if mean(k, "tokens_per_s") is not None]
    if spd:
        v, k = max(spd)
        lines.append(f"- Highest training throughput: **{k}** ({v:,.0f} tokens/s).")
    for src in eval_on:
        key = f"valid_ppl[{src}]"
        scored = [(mean(k, key), k) for k in by if mean(k, key) is not None]
        if scored:
            v, k = min(scored)
            lines.append(f"- Lowest perplexity on {src}'s validation text: **{k}** ({v:.3f}).")
    return lines


REPORT_FILES = ("report.md", "results.csv", "curves.png", "speed.png")
PNG_METADATA = {"Source": "deeprnn compare"}  # a PNG text chunk: how a plot is known as the report's own
_PNG_TAG = b"".join(f"{k}\0{v}".encode("latin-1") for k, v in PNG_METADATA.items())  # the chunk's bytes
_REPORT_TAIL = "Per-run numbers (every seed) are in [results.csv](results.csv)."  # report.md's last line
_RESULTS_HEAD = "label,data,cell,layers,hiddens,impl,seed,key,"


def _is_own_report_file(path: Path) -> bool:
    """Whether ``path`` (named as one of :data:`REPORT_FILES`) is what :func:`write_report` writes, by content."""
    try:
        if path.suffix == ".png":
            with open(path, "rb") as f:
                head = f.read(4096)
            if not head.startswith(b"\x89PNG\r\n\x1a\n"):
                return False
            if _PNG_TAG in head:
                return True
            # Plots of reports written before the tag: any Matplotlib PNG, but only beside our own report.md
            # (any other Matplotlib plot of that name is the user's).
            return b"Matplotlib" in head and _is_own_report_file(path.with_name("report.md"))
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith(_RESULTS_HEAD) if path.name == "results.csv" else _REPORT_TAIL in text


NOTES_FILE = "notes.md"  # hand-written findings in --out, appended to report.md


def prepare_output(out: Path, runs: Path) -> None:
    """Create the report and runs directories, or raise :class:`ConfigError` (one line) when one is a file or
    cannot be created or written into, when the report directory holds a file of a report's name that
    deeprnn did not write (a report replaces only its own files), or a ``notes.md`` that cannot be read: all
    before any training, not when the report is written at the end."""
    for path, flag in ((out, "--out"), (runs, "--runs-dir")):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path} is a file, not a directory; choose another {flag}")
    for name in REPORT_FILES:
        if (out / name).exists() and not _is_own_report_file(out / name):
            raise ConfigError(f"{out / name} was not written by deeprnn compare and would be replaced; "
                              "move it away or choose another --out")
    notes = out / NOTES_FILE
    if notes.exists():
        try:
            notes.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else "not UTF-8 text"
            raise ConfigError(f"{notes} cannot be read for the report's Notes section ({why}); fix or move it, "
                              "or choose another --out") from None
    for path, flag in ((out, "--out"), (runs, "--runs-dir")):
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):  # writable now, not only after the whole grid has trained
                pass
        except OSError as e:
            raise ConfigError(f"cannot write into {flag} {path}: {e.strerror or e}; choose another {flag}") from None


def write_report(out: Path, spec: GridSpec, records: list[dict[str, Any]], *, command: str = "",
                 machine: str = "") -> str:
    """Write report.md, results.csv, curves.png and speed.png into ``out``; return the Markdown table.

    ``out/notes.md``, when present, is appended as a "Notes" section (findings written by hand)."""
    out.mkdir(parents=True, exist_ok=True)
    header, rows = aggregate(records, spec.eval_on, spec.target_ppl)
    table = markdown_table(header, rows)
    fields = list(records[0]) if records else []
    rows_csv = io.StringIO(newline="")
    w = csv.DictWriter(rows_csv, fieldnames=fields)
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    write_text_atomic(out / "results.csv", rows_csv.getvalue(), newline="")  # UTF-8, whatever the locale
    plot_curves(records, out / "curves.png", spec.target_ppl)
    plot_speed(records, out / "speed.png")
    budget = []
    if spec.base.get("time_budget"):
        budget.append(f"{spec.base['time_budget']:g} min of training per run")
    if spec.base.get("max_steps"):
        budget.append(f"at most {spec.base['max_steps']} steps per run")
    if not spec.base.get("time_budget"):
        from deeprnn.train import TrainConfig

        budget.append(f"{spec.base.get('num_epochs', TrainConfig().num_epochs)} epochs per run")
    shown = {k: v for k, v in spec.base.items() if not (k == "num_epochs" and spec.base.get("time_budget"))}
    base_text = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
    unit = "word" if spec.base.get("token") == "word" else "character"
    parts = [f"# {spec.title}", ""]
    if spec.description:
        parts += [spec.description, ""]
    parts += [
        f"Budget: {'; '.join(budget)}; seed{'s' if len(spec.seeds) > 1 else ''} "
        f"{', '.join(str(s) for s in spec.seeds)}. "
        "Held-out = the validation split (best = the best evaluation, final = the last one); test = the "
        f"test split scored once with the best checkpoint. bpc = bits per {unit} = log2 of perplexity.",
        "",
    ]
    if command:
        parts += ["Reproduce:", "", "```", command, "```", ""]
    parts += [table, ""]
    if any(r["time_to_target_s"] is None for r in records) and spec.target_ppl is not None:
        parts += [f"*not reached*: the run's held-out perplexity never fell to {spec.target_ppl:g} within the budget.", ""]
    if spec.eval_on:
        parts += ["`valid ppl <source>`: the best checkpoint on that source's own validation span (5 % of it, "
                  "never trained on); *n/a (trained on)*: the run trained on the whole source.", ""]
    held = {frozenset(held_sources(v)) for v in spec.data}
    if len(held) > 1:
        parts += ["`held-out ppl` and `test ppl` score each run on its own sources' held-out text; they compare "
                  "across rows only where those sources agree.", ""]
    parts += _answers(records, spec.eval_on, same_heldout=len(held) == 1) + [""]
    parts += ["![held-out perplexity against wall time](curves.png)", "", "![training throughput](speed.png)", ""]
    parts += ["Fixed options (every run): " + (f"`{base_text}`" if base_text else "the defaults of `deeprnn train`") + ".", ""]
    if machine:
        parts += [f"Machine: {machine} Throughput and wall times depend on the machine and on what else "
                  "ran on it; compare them within one report only.", ""]
    named = sorted({s for r in spec.data for s in r.corpus} & NAMED_CORPORA.keys())
    bundled = [s for s in named if NAMED_CORPORA[s].bundled]
    cached = [s for s in named if not NAMED_CORPORA[s].bundled]
    where = [f"{', '.join(bundled)} {'is' if len(bundled) == 1 else 'are'} bundled with deeprnn"] if bundled else []
    if cached:  # a file of the user's is neither: it is read where it is
        where.append(f"{', '.join(cached)} {'comes' if len(cached) == 1 else 'come'} from `$DEEPRNN_DATA_DIR` "
                     "(downloaded there when missing unless `DEEPRNN_OFFLINE=1`)")
    if where:
        parts += [f"Corpora: {'; '.join(where)}.", ""]
    notes = out / NOTES_FILE
    if notes.exists():  # hand-written findings survive regenerating the report (prepare_output read it)
        parts += ["## Notes", "", notes.read_text(encoding="utf-8").strip(), ""]
    parts += [_REPORT_TAIL, ""]
    write_text_atomic(out / "report.md", "\n".join(parts))  # UTF-8, whatever the locale; never cut short
    return table


def machine_summary() -> str:
    load = ""
    try:
        load = ", load average {:.1f} at the start".format(os.getloadavg()[0])
    except OSError:
        pass
    dev = "CUDA " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.platform()}, {os.cpu_count()} CPU cores{load}, {dev}, torch {torch.__version__} "
            f"({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}), "
            f"{time.strftime('%Y-%m-%d')}.")


def run_compare(spec: GridSpec, out: str | os.PathLike, *, runs_dir: str | os.PathLike | None = None,
                rerun: bool = False, command: str = "", log: Callable[[str], None] = print,
                train_log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or reuse) every grid point and write the report. Returns ``{"records", "table", "trained"}``
    where ``trained`` counts the runs trained now (the rest came from the cache). Raises ``ConfigError``
    before training anything when ``out`` or ``runs_dir`` cannot be used (see :func:`prepare_output`)."""
    out = Path(out)
    runs = Path(runs_dir) if runs_dir is not None else out / "runs"
    for sources in [*(v.corpus for v in spec.data), *(v.heldout_from for v in spec.data if v.heldout_from),
                    *([spec.eval_on] if spec.eval_on else [])]:
        check_sources(sources)  # a typo is one line now, not after a run (or the whole grid) has trained
    points = expand_grid(spec)  # every point's options checked too, before the first one trains
    check_eval_on(points, spec.eval_on)
    prepare_output(out, runs)
    machine = machine_summary()
    records = []
    for i, p in enumerate(points, 1):
        log(f"[{i}/{len(points)}] {p.label} seed {p.seed}: {point_state(runs / p.key, rerun)} ({runs / p.key})")
        rec = run_point(p, runs, eval_on=spec.eval_on, target_ppl=spec.target_ppl, rerun=rerun,
                        train_log=train_log)
        records.append(rec)
    table = write_report(out, spec, records, command=command, machine=machine)
    return {"records": records, "table": table, "trained": sum(not r["cached"] for r in records)}


# ----------------------------------------------------------------------------------------------
# command line


def _csv_list(text: str, kind=str) -> list:
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None


def _first_repeat(values: list) -> Any:
    """The first value that occurs earlier in ``values`` too, else None."""
    return next((v for i, v in enumerate(values) if v in values[:i]), None)


def _grid_list(kind=str):
    """An argparse type for a grid axis: a comma-separated list with at least one value."""
    def parse(text: str) -> list:
        values = _csv_list(text, kind)
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one value (comma-separated), got {text!r}")
        repeated = _first_repeat(values)
        if repeated is not None:  # --seeds 0,0 counted one run twice in the mean ± std
            raise argparse.ArgumentTypeError(f"{repeated} is given twice in {text!r}; give each value once")
        return values

    return parse


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs as typed TrainConfig overrides (lists: comma-separated; ``none``)."""
    from deeprnn.cli import _parse_bool, config_from_mapping
    from deeprnn.train import TrainConfig

    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    grid = {"cell": "--cells", "num_layers": "--layers", "num_hiddens": "--hiddens", "impl": "--impl",
            "seed": "--seeds", "corpus": "--corpus", "heldout_from": "--heldout-from", "run_dir": "--runs-dir",
            "time_budget": "--minutes", "num_epochs": "--epochs"}  # a preset's budget silently won over these
    raw: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        if name in grid:
            raise ConfigError(f"{name} is a grid axis or compare option; use {grid[name]} instead of --set")
        if name not in types:
            raise ConfigError(f"--set: unknown key {key!r}; see deeprnn train --help for the options")
        t = types[name]
        base = t.split("|")[0].strip()
        try:
            if value.lower() == "none" and "None" in t:
                raw[name] = None
            elif base == "bool":
                raw[name] = _parse_bool(value)
            elif base == "list[float]":
                raw[name] = _csv_list(value, float)
            elif base.startswith("list"):
                raw[name] = _csv_list(value)
            elif base in ("int", "float"):
                raw[name] = {"int": int, "float": float}[base](value)
            else:
                raw[name] = value
        except (ValueError, argparse.ArgumentTypeError):
            raise ConfigError(f"--set: {name} must be of type {base}, got {value!r}") from None
    return config_from_mapping(raw, "--set")


def refuse_unused_sets(cfg, sets: dict[str, Any]) -> None:
    """A ``--set`` option that ``cfg`` never reads (``momentum`` with Adam) is a ``ConfigError``, as train's
    flags are: it would train as if it were not there."""
    from deeprnn.train import unused_option_message

    for name, on, needs in cfg.unused_options():
        if name in sets:
            raise ConfigError(unused_option_message(cfg, on, needs, f"--set {name}={sets[name]}",
                                                    f"drop it, or --set {on}=..."))


def parse_weights(text: str | None) -> dict[str, float] | str | None:
    if text is None:
        return None
    if text.strip() == "balance":
        return "balance"
    out = {}
    for part in _csv_list(text):
        name, sep, w = part.rpartition("=")
        try:
            out[name] = float(w)
        except ValueError:
            name = ""
        if not sep or not name or not valid_source_weight(out[name]):
            raise ConfigError(f"weights must be 'balance' or SOURCE=W,... with 0 < W <= {MAX_SOURCE_WEIGHT:,}, "
                              f"got {part!r}")
    return out


def parse_variant(text: str) -> DataVariant:
    if os.path.exists(os.path.expanduser(text)):  # a file named "v=2.txt" or "a,b.txt" is that file, unlabelled
        return DataVariant(text, [text])
    label, sep, sources = text.partition("=")
    if not sep:
        label, sources = text, text
    srcs = _csv_list(sources)
    if not srcs:
        raise ConfigError(f"corpus must name at least one source, got {text!r}")
    return DataVariant(label.strip(), srcs)


def spec_from_args(args: argparse.Namespace) -> GridSpec:
    """Preset values, then flags."""
    import copy

    preset = copy.deepcopy(PRESETS[args.preset]) if args.preset else {}
    minutes = preset.pop("minutes", None)
    base = dict(preset.pop("base", {}))
    spec = GridSpec(**preset, base=base)
    if not args.preset:
        spec.title = "deeprnn compare"
    changed = []  # what the command changes of a preset's grid, said above its description in the report
    for attr, flag in (("cells", "cells"), ("layers", "layers"), ("hiddens", "hiddens"), ("impls", "impl"),
                       ("seeds", "seeds"), ("eval_on", "eval_on")):
        if getattr(args, flag) is not None:
            setattr(spec, attr, getattr(args, flag))
            changed.append(f"--{flag.replace('_', '-')} {','.join(map(str, getattr(args, flag)))}")
    repeated = _first_repeat(spec.eval_on)
    if repeated is not None:  # two identical columns
        raise ConfigError(f"--eval-on names {repeated!r} twice; give each source once")
    if args.heldout_from is not None and not args.heldout_from:
        raise ConfigError("--heldout-from is empty; name the sources that give validation/test text, or drop it "
                          "to hold out part of every source")
    if args.corpus:
        changed += [f"--corpus {c}" for c in args.corpus]
        spec.data = [parse_variant(c) for c in args.corpus]
        repeated = _first_repeat([v.label for v in spec.data])
        if repeated is not None:  # their runs were averaged into one row
            raise ConfigError(f"--corpus label {repeated!r} names two variants; give each its own LABEL=")
    if args.heldout_from is not None:
        for v in spec.data:
            v.heldout_from = args.heldout_from
    weights = parse_weights(args.weights)
    if weights == "balance" and not any(len(v.corpus) > 1 for v in spec.data):
        raise ConfigError("--weights balance weights the sources of a multi-source --corpus variant, and no "
                          "variant has several sources; drop --weights or give a variant SRC,SRC")
    if isinstance(weights, dict):
        known = {src for v in spec.data if len(v.corpus) > 1 for src in v.corpus}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ConfigError(f"weights name {unknown[0]!r}, which no multi-source --corpus variant trains on; "
                              f"sources: {', '.join(sorted(known)) or 'none'}")
    if weights is not None:
        for v in spec.data:
            if len(v.corpus) > 1 and (weights == "balance" or set(weights) & set(v.corpus)):
                v.weights = weights
    if args.target_ppl is not None:
        if not (math.isfinite(args.target_ppl) and args.target_ppl > 1):
            raise ConfigError(f"--target-ppl must be a number > 1 (a perplexity is at least 1), got {args.target_ppl}")
        spec.target_ppl = args.target_ppl
    sets = parse_set(args.set or [])
    spec.base.update(sets)
    from deeprnn.train import TrainConfig

    refuse_unused_sets(TrainConfig(**spec.base), sets)
    if args.minutes is not None:
        minutes = args.minutes
    if args.epochs is not None:
        spec.base.update(num_epochs=args.epochs)
        spec.base.pop("time_budget", None)
    elif minutes is not None:
        if not (math.isfinite(minutes) and minutes > 0):
            raise ConfigError(f"minutes must be a finite number > 0, got {minutes}")
        # the wall clock is the budget: epochs only bound it from above
        spec.base.update(time_budget=float(minutes), num_epochs=10**6)
    for flag in ("heldout_from", "weights", "target_ppl", "minutes", "epochs"):
        value = getattr(args, flag, None)
        if value is not None:
            changed.append(f"--{flag.replace('_', '-')} {','.join(value) if isinstance(value, list) else value}")
    changed += [f"--set {item}" for item in args.set or []]
    if args.preset and changed:
        spec.description = (f"*Changed from the preset `{args.preset}`:* `{' '.join(changed)}`; the description "
                            "below is the preset's." + (f"\n\n{spec.description}" if spec.description else ""))
    for c in spec.cells:
        if c not in ("rnn_tanh", "rnn_relu", "gru", "lstm"):
            raise ConfigError(f"cells must be among rnn_tanh, rnn_relu, gru, lstm, got {c!r}")
    for i in spec.impls:
        if i not in ("concise", "scratch"):
            raise ConfigError(f"impl must be concise or scratch, got {i!r}")
    return spec


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``deeprnn compare`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "compare", help="train a grid of configurations under one budget and report a comparison",
        description="Train every combination of --cells x --layers x --hiddens x --impl x --corpus x --seeds "
        "with the same budget, cache each run by its config hash, and write OUT/report.md, results.csv, "
        "curves.png and speed.png. Presets reproduce the seed's exercises 2-4.")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a ready experiment (flags still win)")
    p.add_argument("--cells", type=_grid_list(), help="cells, comma-separated: rnn_tanh,rnn_relu,gru,lstm")
    p.add_argument("--layers", type=_grid_list(int), help="numbers of layers, comma-separated")
    p.add_argument("--hiddens", type=_grid_list(int), help="hidden sizes, comma-separated")
    p.add_argument("--impl", type=_grid_list(), help="implementations, comma-separated: concise,scratch")
    p.add_argument("--seeds", type=_grid_list(int), help="seeds, comma-separated (mean ± std)")
    p.add_argument("--corpus", action="append", metavar="[LABEL=]SRC[,SRC]",
                   help="a data variant: sources trained on together; repeat for several variants")
    p.add_argument("--heldout-from", type=_csv_list, metavar="SRC[,SRC]",
                   help="only these sources give validation/test text (the rest go wholly to training)")
    p.add_argument("--weights", metavar="SRC=W[,SRC=W]|balance",
                   help="multiply a source's training text in every multi-source variant that has it (W=2: twice, "
                   "W=0.5: its first half); 'balance' repeats each up to the largest source's size")
    p.add_argument("--eval-on", type=_csv_list, metavar="SRC[,SRC]",
                   help="also score each run's best checkpoint on these sources' validation spans")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="budget per run in epochs")
    budget.add_argument("--minutes", type=float, help="budget per run in minutes of training")
    p.add_argument("--target-ppl", type=float, help="report the training time to reach this held-out perplexity")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a fixed TrainConfig override for every run, e.g. --set lr=0.001 --set dropout=0 "
                   "(a `deeprnn train` option, underscores or dashes; lists comma-separated; the grid axes and the "
                   "budget have flags of their own, and fine-tuning's --init-from, --extend-vocab and "
                   "--freeze-layers are not available; a key given twice: the last one, as with flags)")
    p.add_argument("--out", help="report directory (default: reports/<preset> or reports/compare)")
    p.add_argument("--runs-dir", help="where runs are trained and cached (default: OUT/runs); share it between "
                   "reports to reuse runs")
    p.add_argument("--rerun", action="store_true", help="train again even when a finished run is cached")
    p.add_argument("--verbose", action="store_true", help="print every evaluation of every run")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is much faster "
                   "on a machine shared with other jobs")
    p.set_defaults(func=cmd_compare)
    return p


def _as_compare_flags(message: str) -> str:
    """A corpus message names train's ``--encoding``; compare spells it ``--set encoding=NAME``."""
    return respell_encoding_option(message, "--set encoding={}", "--set encoding=NAME")


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        return _compare(args)
    except (ConfigError, CorpusError) as e:  # compare has no --encoding flag: the message pointed to one
        if "--encoding" not in str(e):
            raise
        raise type(e)(_as_compare_flags(str(e))) from e


def _compare(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for flag, value in (("--out", args.out), ("--runs-dir", args.runs_dir)):
        if value is not None and not value.strip():  # "" used to mean the default directory, silently
            raise ConfigError(f"{flag} is empty; name a directory, or drop {flag} for the default")
    out = Path(args.out or f"reports/{args.preset or 'compare'}")
    command = "deeprnn " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else ""
    result = run_compare(spec, out, runs_dir=args.runs_dir, rerun=args.rerun, command=command,
                         log=print, train_log=(lambda m: print("    " + m)) if args.verbose else None)
    print(result["table"])
    print(f"report: {out / 'report.md'} ({result['trained']} trained, "
          f"{len(result['records']) - result['trained']} from the cache)")
    return 0
