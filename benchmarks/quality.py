"""Time to quality: train a recipe under a wall-clock budget and print the held-out curve.

    python benchmarks/quality.py --preset tm-cpu --minutes 10                 # issue 11's measurement
    python benchmarks/quality.py --preset tm-cpu --minutes 2 --set num_hiddens=256 lr=0.004
    python benchmarks/quality.py --ablation --steps 600 --seeds 0 1           # the table in docs/quality.md
    python benchmarks/quality.py --preset tm-cpu --dynamic-lr 1e-4 2e-4       # + dynamic evaluation at the end

A run trains ``--preset`` (from ``deeprnn.cli.PRESETS``) with ``time_budget = --minutes`` (training
time only: evaluation is not counted, as in ``deeprnn train``), evaluating every ``--eval-every``
steps, and prints one line per evaluation (minutes, step, validation loss in nats and perplexity),
then the best held-out value, the test score of the best checkpoint and the machine it ran on. The run lives
in a temporary directory, or in ``--run-dir``, where an earlier run is replaced only with ``--overwrite``.
``--dynamic-lr`` then scores the best checkpoint again with dynamic evaluation (``deeprnn.dynamic``),
a separate protocol whose numbers are never mixed with the static ones.

``--ablation`` runs the regulariser ablation on The Time Machine: a small baseline (2x128 LSTM,
ordinary dropout 0.2) and the baseline with each regulariser switched on alone, then everything on,
for every seed, all with the same number of optimiser steps (``--steps``) so that the comparison does
not depend on how loaded the machine is; it prints a Markdown table (mean and each seed's best
validation perplexity) ready for ``docs/quality.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import loadavg, machine, parse_sets, refuse_repeated_seeds  # noqa: E402
from deeprnn.cli import PRESETS, preset_note  # noqa: E402
from deeprnn.compare import refuse_unused_sets  # noqa: E402
from deeprnn.errors import DeepRNNError  # noqa: E402
from deeprnn.rundir import read_metrics  # noqa: E402
from deeprnn.train import TrainConfig, TrainingInterrupted, train  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402


def run(values: dict, *, run_dir: Path, log=None, overwrite: bool = False) -> dict:
    """Train ``values`` into ``run_dir``; the summary with its held-out ``curve``. An earlier run there is
    replaced only with ``overwrite`` (else train's CheckpointError)."""
    cfg = TrainConfig(**{**values, "run_dir": str(run_dir)})
    summary = train(cfg, overwrite=overwrite, progress=False, log=log or (lambda *_: None))
    summary["curve"] = [(float(r["elapsed_s"]) / 60, int(r["step"]), float(r["val_loss"]), float(r["val_ppl"]))
                        for r in read_metrics(run_dir / "metrics.csv")]
    return summary


def refuse_invalid(parser, values: dict, where: str = "") -> None:
    """``parser.error`` (one line, exit 2) where ``TrainConfig(**values)`` does not validate, so that bad
    input is refused before any run starts rather than by the run that trains it; ``where`` prefixes the
    message (which run it is)."""
    try:
        TrainConfig(**values).validate()
    except DeepRNNError as e:
        parser.error(f"{where}{e}")


def print_curve(summary: dict) -> None:
    print(f"{'minutes':>8} {'step':>7} {'val loss':>9} {'val ppl':>8}")
    for minutes, step, loss, ppl in summary["curve"]:
        print(f"{minutes:8.2f} {step:7d} {loss:9.4f} {ppl:8.3f}")
    best = min(summary["curve"], key=lambda r: r[2]) if summary["curve"] else None
    if best:
        print(f"best held-out: loss {best[2]:.4f} nats, perplexity {best[3]:.3f} at {best[0]:.2f} min "
              f"(step {best[1]})")
    if "test_ppl" in summary:
        print(f"test (best checkpoint): loss {summary['test_loss']:.4f} nats, perplexity {summary['test_ppl']:.3f}")
    print(f"steps {summary['steps']}, training time {summary['train_time_s'] / 60:.2f} min, "
          f"{summary['parameters']:,} parameters, stop: {summary['stop_reason']}")


def print_dynamic(checkpoint: Path, lrs: list[float], decay: float, *, num_steps: int = 20) -> None:
    """Static and dynamic (RMS rule) scores of ``checkpoint`` on its held-out split, all on one stream."""
    import math

    from deeprnn.checkpoint import load_checkpoint
    from deeprnn.cli import checkpoint_split_tokens
    from deeprnn.dynamic import dynamic_evaluate_tokens, gradient_mean_square

    ck = load_checkpoint(checkpoint)
    split = "test" if ck.train_config.get("test_fraction", 0.05) > 0 else "valid"
    tokens = checkpoint_split_tokens(ck, split)
    ms = gradient_mean_square(ck.model, checkpoint_split_tokens(ck, "train"), num_steps=num_steps)
    print(f"dynamic evaluation (RMS rule, statistics from the training text) of the best checkpoint on the "
          f"{split} split ({tokens.numel():,} tokens, 1 stream, windows of {num_steps}, decay {decay:g}; "
          f"lr 0 = static on the same stream):")
    for lr in [0.0, *lrs]:
        t0 = time.perf_counter()
        s, n = dynamic_evaluate_tokens(ck.model, tokens, lr=lr, decay=decay, mean_square=ms, num_steps=num_steps)
        print(f"  lr {lr:<8g} loss {s / n:.4f} nats, perplexity {math.exp(s / n):.3f} "
              f"({time.perf_counter() - t0:.1f} s)")


# The ablation: each regulariser alone on top of a small baseline, then all together.
ABLATION_BASE = dict(corpus=["timemachine"], normalization="d2l", cell="lstm", num_layers=2, num_hiddens=128,
                     impl="concise", input="embedding", embed_size=128, dropout=0.2, batch_size=32,
                     num_steps=64, optimizer="adam", lr=4e-3, clip=0.25, schedule="cosine", min_lr_ratio=0.05,
                     val_fraction=0.1, test_fraction=0.0, eval_batch_size=64, eval_num_steps=256,
                     sample_every=0, precision="fp32", num_epochs=1000)
ABLATION_ROWS: dict[str, dict] = {
    "baseline (dropout 0.2 between layers and on the output)": {},
    "+ locked dropout (same rates)": dict(locked_dropout=True),
    "+ embedding dropout 0.05": dict(embed_dropout=0.05),
    "+ input dropout 0.1": dict(input_dropout=0.1),
    "+ weight-drop 0.25": dict(weight_drop=0.25),
    "+ AR 2 / TAR 1": dict(ar_alpha=2.0, tar_beta=1.0),
    "+ variable-length BPTT": dict(variable_bptt=True),
    "+ partial shuffle (Press 2019)": dict(partial_shuffle=True),
    "+ weight EMA 0.99 (from 1/3 of the steps)": dict(ema_decay=0.99, ema_start=-1),
    "+ residual connections (3 layers)": dict(residual=True, num_layers=3),
    "3 layers without residual (reference for the row above)": dict(num_layers=3),
    "+ tied embeddings": dict(tie_weights=True),
    "+ forget-gate bias 1": dict(forget_bias=1.0),
    "+ layer-norm LSTM (scratch)": dict(layer_norm=True, impl="scratch"),
    "scratch baseline (reference for the row above)": dict(impl="scratch"),
    "all of locked, embedding, input, weight-drop, AR/TAR, variable BPTT, EMA": dict(
        locked_dropout=True, embed_dropout=0.05, input_dropout=0.1, weight_drop=0.25, ar_alpha=2.0,
        tar_beta=1.0, variable_bptt=True, ema_decay=0.99, ema_start=-1),
    "all of locked, embedding, input, weight-drop, AR/TAR, variable BPTT, EMA, and partial shuffle": dict(
        locked_dropout=True, embed_dropout=0.05, input_dropout=0.1, weight_drop=0.25, ar_alpha=2.0,
        tar_beta=1.0, variable_bptt=True, ema_decay=0.99, ema_start=-1, partial_shuffle=True),
}


def ablation_values(change: dict, seed: int, steps: int) -> dict:
    """The TrainConfig fields of one ablation run: the base, the row's change, the seed and the step budget."""
    values = {**ABLATION_BASE, **change, "seed": seed, "max_steps": steps, "eval_every": max(1, steps // 10)}
    if values.get("ema_start") == -1:
        values["ema_start"] = steps // 3
    return values


def ablation_rows(parser, args) -> dict[str, dict]:
    """The rows ``--only`` selects, every run's config checked: ``parser.error`` on a bad ``--steps``,
    ``--seeds`` or ``--only``, before the first run."""
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    refuse_repeated_seeds(parser, "--seeds", args.seeds)
    unmatched = [o for o in args.only or [] if not any(o in name for name in ABLATION_ROWS)]
    if unmatched:
        parser.error(f"--only {unmatched[0]!r} matches no ablation row; give part of a row's name: "
                     + "; ".join(ABLATION_ROWS))
    rows = {name: change for name, change in ABLATION_ROWS.items()
            if not args.only or any(o in name for o in args.only)}
    for change in rows.values():
        for seed in args.seeds:
            refuse_invalid(parser, ablation_values(change, seed, args.steps))
    return rows


def ablation(args, rows: dict[str, dict]) -> None:
    results: dict[str, list[float]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name, change in rows.items():
            for seed in args.seeds:
                s = run(ablation_values(change, seed, args.steps), run_dir=Path(tmp) / f"r{len(results)}-{seed}")
                ppl = min(r[3] for r in s["curve"])
                results.setdefault(name, []).append(ppl)
                print(json.dumps({"row": name, "seed": seed, "best_val_ppl": round(ppl, 4),
                                  "train_s": s["train_time_s"], "steps": s["steps"]}), flush=True)
    first = next(iter(results))  # the baseline, unless --only leaves it out
    base = statistics.mean(results[first])
    print(f"\n{args.steps} optimiser steps per run, seeds {args.seeds}; {time.time() - t0:.0f} s in all; "
          f"{machine()}; load average {loadavg()} at the end\n")
    vs = "baseline" if first == next(iter(ABLATION_ROWS)) else "the first row"
    print(f"| configuration | best held-out ppl (mean) | per seed | vs {vs} |")
    print("| --- | ---: | --- | ---: |")
    for name, ppls in results.items():
        m = statistics.mean(ppls)
        print(f"| {name} | {m:.3f} | {', '.join(f'{p:.3f}' for p in ppls)} | {m - base:+.3f} |")


def refuse_run_dir(parser, run_dir: str, overwrite: bool) -> None:
    """``parser.error`` for an empty ``--run-dir``, or one that holds a run, unless ``overwrite``: as
    ``deeprnn train``, a run is replaced only when asked to (other folders are train's to refuse)."""
    from deeprnn.rundir import holds_run

    if not run_dir.strip():
        parser.error("--run-dir is empty; name a directory, or drop --run-dir for a temporary one")
    if not overwrite and Path(run_dir).is_dir() and holds_run(Path(run_dir)):
        parser.error(f"--run-dir {run_dir} already holds a run; pass --overwrite to replace it, or choose "
                     "another --run-dir")


def main(argv=None) -> int:
    p = OneLineParser(prog="quality.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tm-cpu", choices=sorted(PRESETS), help="recipe from deeprnn.cli.PRESETS")
    p.add_argument("--minutes", type=float, default=10.0, help="training-time budget in minutes")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    p.add_argument("--run-dir", default=None,
                   help="keep the run here, a new or empty directory (default: a temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --run-dir already holds")
    p.add_argument("--dynamic-lr", type=float, nargs="*", default=None, metavar="LR",
                   help="after training, also score the best checkpoint with dynamic evaluation (RMS rule) at "
                        "each LR (1 stream, windows of 20; reported apart from the static curve)")
    p.add_argument("--dynamic-decay", type=float, default=None, metavar="D",
                   help="dynamic evaluation decay, in [0, 1] (default 0)")
    p.add_argument("--ablation", action="store_true", help="run the regulariser ablation instead")
    p.add_argument("--steps", type=int, default=600, help="ablation: optimiser steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="ablation: seeds")
    p.add_argument("--only", nargs="*", default=None, help="ablation: rows whose name contains one of these")
    args = p.parse_args(argv)
    # Bad input is refused here, in one line, before anything trains.
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.dynamic_lr == []:
        p.error("--dynamic-lr needs at least one learning rate")
    bad_lr = [lr for lr in args.dynamic_lr or [] if not 0 <= lr <= 3e38]  # 3e38: what float32 weights can take
    if bad_lr:
        p.error(f"--dynamic-lr must be in [0, 3e38], got {bad_lr[0]}")
    if args.dynamic_decay is not None and args.dynamic_lr is None:
        p.error("--dynamic-decay needs --dynamic-lr: the learning rates to evaluate with")
    if args.dynamic_decay is not None and not 0 <= args.dynamic_decay <= 1:
        p.error(f"--dynamic-decay must be in [0, 1], got {args.dynamic_decay}")
    if args.ablation:  # its runs live in temporary directories, scored statically
        unused = [flag for flag, value in (("--run-dir", args.run_dir), ("--overwrite", args.overwrite),
                                           ("--dynamic-lr", args.dynamic_lr)) if value not in (None, False)]
        if unused:
            p.error(f"--ablation does not use {unused[0]}; drop it, or drop --ablation")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ablation:
        ablation(args, ablation_rows(p, args))
        return 0
    sets = parse_sets(args.set)
    values = {**PRESETS[args.preset], "seed": args.seed, "time_budget": args.minutes, **sets}
    if args.eval_every is not None:
        values["eval_every"] = args.eval_every
    refuse_invalid(p, values)
    try:  # as deeprnn train refuses them
        refuse_unused_sets(TrainConfig(**values), sets)
    except DeepRNNError as e:
        p.error(str(e))
    if args.run_dir is not None:
        refuse_run_dir(p, args.run_dir, args.overwrite)
    print(f"preset {args.preset}, {args.minutes} min: "
          + json.dumps({k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}))
    note = preset_note(args.preset, TrainConfig(**values))
    if note:
        print(note)
    # Without --run-dir the run lives in a temporary directory, removed on the way out, except after an
    # interruption: then its checkpoint is kept, so the run can still be resumed and no work is lost.
    tmp = None if args.run_dir else Path(tempfile.mkdtemp(prefix="deeprnn-quality-"))
    run_dir = Path(args.run_dir) if args.run_dir else tmp / "run"
    try:
        summary = run(values, run_dir=run_dir, log=print, overwrite=args.overwrite)
        print_curve(summary)
        if args.dynamic_lr:
            print_dynamic(run_dir / "best", args.dynamic_lr, args.dynamic_decay or 0.0)
    except TrainingInterrupted as e:
        print(f"quality.py: {e}" + ("" if tmp is None else " (kept in a temporary directory; pass --run-dir DIR "
                                    "to choose where)"), file=sys.stderr)
        tmp = None
        return 128 + e.signum
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"machine: {machine()}; load average {loadavg()} at the end")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DeepRNNError as err:  # bad input: one line, as the CLI does
        sys.exit(f"quality.py: error: {err}")
