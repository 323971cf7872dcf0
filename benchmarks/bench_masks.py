"""Dropout masks from ``torch.rand >= p`` against ``bernoulli_``: the training step of a recipe, both ways.

    python benchmarks/bench_masks.py [--preset tm-cpu] [--rounds 8] [--steps 10] [--set KEY=VALUE ...]
    python benchmarks/bench_masks.py --set impl=concise weight_drop=0.35 zoneout_cell=0 zoneout_hidden=0

(the second: the ``tm-cpu`` step as it was when README's figure was measured, before zoneout replaced its
weight-drop). Every dropout mask deeprnn draws (locked and embedding dropout, weight-drop) comes from
``deeprnn.regularize.keep_mask``; zoneout's 0/1 masks (``scratch.zoneout_masks``, also ``torch.rand``) are
not swapped. This script times the preset's training step on the CPU (forward, loss,
backward, the preset's optimiser from ``build_optimizer``; bf16 autocast if the preset says so; random
tokens, vocabulary 28) with ``keep_mask`` as it is and with a ``bernoulli_`` draw in its place, alternating
for ``--rounds`` rounds of ``--steps`` steps, so drift in the machine's load hits both alike. It prints each
round's milliseconds per step and the ratio of the best rounds, bernoulli_ / rand (> 1: the rand masks are
faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import (alternating_rounds, loadavg, machine, parse_sets, preset_step,  # noqa: E402
                               refuse_unrunnable_precision)
from deeprnn import regularize  # noqa: E402
from deeprnn.cli import PRESETS  # noqa: E402
from deeprnn.precision import resolve_precision  # noqa: E402
from deeprnn.train import TrainConfig  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

VOCAB = 28


def bernoulli_mask(shape, p: float, *, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The draw ``keep_mask`` replaced: one ``bernoulli_`` per entry, scaled by 1/(1-p)."""
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p).div_(1 - p)


def measure(cfg: TrainConfig, rounds: int, steps: int) -> dict[str, list[float]]:
    """Milliseconds per training step in each round, for the ``bernoulli`` masks and the ``rand`` ones."""
    ours = regularize.keep_mask
    step = preset_step(cfg, VOCAB)
    try:
        return alternating_rounds(step, {"bernoulli": lambda: setattr(regularize, "keep_mask", bernoulli_mask),
                                         "rand": lambda: setattr(regularize, "keep_mask", ours)}, rounds, steps)
    finally:
        regularize.keep_mask = ours


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tm-cpu", choices=sorted(PRESETS), help="recipe whose step is timed")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round and kind")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    cfg = TrainConfig(**{**PRESETS[args.preset], **parse_sets(args.set)})
    refuse_unrunnable_precision(p, cfg.precision, "cpu", cfg.cell, cfg.impl, fix="use --set precision=auto")
    times = measure(cfg, args.rounds, args.steps)
    for name, ms in times.items():
        print(f"{name:>9}: " + " ".join(f"{t:.1f}" for t in ms) + f" ms/step (best {min(ms):.1f})")
    print(f"ratio bernoulli_ / rand masks (best rounds): {min(times['bernoulli']) / min(times['rand']):.3f}; "
          f"{args.preset} step, batch {cfg.batch_size}x{cfg.num_steps}, "
          f"{resolve_precision(cfg.precision, torch.device('cpu'))}, "
          f"{torch.get_num_threads()} threads")
    print(f"machine: {machine()}; load average {loadavg()} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
