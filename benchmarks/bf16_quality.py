"""bf16 autocast against fp32 after the same number of steps: held-out perplexity (issue 7).

    python benchmarks/bf16_quality.py [--steps 1776] [--seeds 0 1 2] [--set field=value ...]

Issue 7 asks the concise LSTM under bf16 autocast to train >= 1.7x faster than the book (``python -m
benchmarks``) *and* to land within 2% of fp32's held-out perplexity after the same number of steps. This
script checks the second half. For each seed it trains the main job (``deeprnn train``'s defaults: a
concise 2 x 256 LSTM on the full Time Machine, Adam, batch 32 x 64) for ``--steps`` optimiser steps (by
default 1,776, the main job's 24 epochs) twice,
in fp32 and in bf16, with the same seed and so the same initial weights, batches and dropout masks. Both
final models (``last/``) are then scored the same way, in fp32, on the validation split (the
``evaluate_tokens`` scorer of training: 64 streams, windows of 128, state carried). It prints both
perplexities per seed, the relative difference, and their mean, against the 2% target, and the tokens/s
each precision trained at.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import loadavg, machine, parse_sets, refuse_unrunnable_precision  # noqa: E402
from deeprnn.checkpoint import load_checkpoint  # noqa: E402
from deeprnn.cli import checkpoint_split_tokens  # noqa: E402
from deeprnn.train import TrainConfig, evaluate_tokens, resolve_device, train  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

TARGET = 0.02


def run(cfg: TrainConfig) -> tuple[float, float]:
    """(validation perplexity of the final weights scored in fp32, training tokens/s) of one run."""
    summary = train(cfg, progress=False, log=lambda _msg: None)
    ck = load_checkpoint(Path(cfg.run_dir) / "last")
    valid = checkpoint_split_tokens(ck, "valid")
    total, n = evaluate_tokens(ck.model, valid, batch_size=cfg.eval_batch_size, num_steps=cfg.eval_num_steps,
                               precision="fp32")
    return math.exp(total / n), summary["tokens_per_s"]


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1776, help="optimiser steps per run (default 1776: the main job)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    overrides = parse_sets(args.set)
    for key in ("precision", "seed", "max_steps", "run_dir"):
        if key in overrides:
            parser.error(f"--set {key}=... is set by this script; use --steps/--seeds")

    base = dataclasses.replace(TrainConfig(), eval_every=args.steps, sample_every=0, patience=0, **overrides)
    # torch.nn.LSTM has no bf16 on a CPU without AVX-512: say so in one line, before any training
    refuse_unrunnable_precision(parser, "bf16", resolve_device(base.device), base.cell, base.impl)
    print(f"machine: {machine()}; load average {loadavg()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"config: deeprnn train's defaults, {base.impl} {base.cell} {base.num_layers}x{base.num_hiddens}, "
              f"{base.optimizer} lr {base.lr}, batch {base.batch_size}x{base.num_steps}, {args.steps} steps"
              + (f"; --set {' '.join(args.set)}" if args.set else ""))
        print(f"{'seed':>4}  {'fp32 ppl':>9}  {'bf16 ppl':>9}  {'bf16 vs fp32':>12}  {'fp32 tok/s':>10}  {'bf16 tok/s':>10}")
        for seed in args.seeds:
            result = {}
            for precision in ("fp32", "bf16"):
                cfg = dataclasses.replace(base, precision=precision, seed=seed, max_steps=args.steps,
                                          run_dir=str(Path(tmp) / f"{precision}-{seed}"))
                result[precision] = run(cfg)
            (f_ppl, f_tps), (b_ppl, b_tps) = result["fp32"], result["bf16"]
            rel = b_ppl / f_ppl - 1
            rows.append(rel)
            print(f"{seed:>4}  {f_ppl:>9.3f}  {b_ppl:>9.3f}  {rel:>+12.2%}  {f_tps:>10,.0f}  {b_tps:>10,.0f}")
    mean = statistics.mean(rows)
    met = all(abs(r) <= TARGET for r in rows)
    print(f"mean difference {mean:+.2%}; target: every seed within {TARGET:.0%} of fp32: {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
