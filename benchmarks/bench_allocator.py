"""What ``deeprnn.allocator`` (malloc keeps freed memory) does to a training step, measured both ways.

    python benchmarks/bench_allocator.py [--rounds 5] [--seconds 3]

malloc's settings belong to a process, so each measurement is a child process: one with
``DEEPRNN_MALLOC=0`` (glibc's defaults), one with deeprnn's settings, alternating for ``--rounds``
rounds, so drift in the machine's load hits both alike. Each child times training steps at the book's
configuration (2 x 256, vocab 28, one-hot, batch 32 x 35, SGD, clip 1; ``bench_models``' step) for
``--seconds`` after a warm-up and counts the page faults per step (``ru_minflt``). The ratio is the
median over rounds of tuned / default tokens/s within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from deeprnn.cli import OneLineParser  # noqa: E402

MODELS = [("lstm", "scratch"), ("lstm", "concise"), ("gru", "scratch")]


def child(seconds: float) -> None:
    import torch

    from deeprnn.allocator import keep_freed_memory
    from deeprnn.models import ModelConfig, build_model

    note = keep_freed_memory()
    from benchmarks.bench_models import BATCH, HIDDENS, LAYERS, STEPS, VOCAB, make_step

    out = {"allocator": note}
    for cell, impl in MODELS:
        torch.manual_seed(0)
        step = make_step(build_model(ModelConfig(vocab_size=VOCAB, cell=cell, num_layers=LAYERS,
                                                 num_hiddens=HIDDENS, impl=impl)))
        for _ in range(3):
            step()
        faults, n, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            step()
            n += 1
        elapsed = time.perf_counter() - t
        out[f"{impl} {cell}"] = {"tok_s": n * BATCH * STEPS / elapsed,
                                 "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n}
    print(json.dumps(out))


def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per model per child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.seconds)
    from benchmarks.common import loadavg, machine

    print(f"machine: {machine()}")
    print(f"load average at start: {loadavg()}; {args.rounds} rounds, each a default and a tuned child process; "
          f"{args.seconds:g} s per model per child")
    runs = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for kind in runs:
            env = dict(os.environ, DEEPRNN_MALLOC="0" if kind == "default" else "1")
            done = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(args.seconds)],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"bench_allocator: a child process failed:\n{done.stderr[-2000:]}")
            runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"default: {runs['default'][0]['allocator']}; tuned: {runs['tuned'][0]['allocator']}")
    print(f"{'training step':<18}{'default tok/s':>15}{'tuned tok/s':>13}{'ratio':>8}{'faults/step default':>21}"
          f"{'tuned':>7}")
    for cell, impl in MODELS:
        key = f"{impl} {cell}"
        d = [r[key] for r in runs["default"]]
        t = [r[key] for r in runs["tuned"]]
        ratio = statistics.median(b["tok_s"] / a["tok_s"] for a, b in zip(d, t))
        print(f"{key:<18}{statistics.median(x['tok_s'] for x in d):>15,.0f}{statistics.median(x['tok_s'] for x in t):>13,.0f}"
              f"{ratio:>7.2f}x{statistics.median(x['faults_per_step'] for x in d):>21,.0f}"
              f"{statistics.median(x['faults_per_step'] for x in t):>7,.0f}")
    print(f"load average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
