"""Where one training step's time goes: ``torch.profiler`` over the suite's step at the book config.

    python benchmarks/profile_step.py [--cell lstm|gru|rnn_tanh] [--impl scratch|concise]
                                      [--precision fp32|bf16] [--steps 30] [--rows 12]

The step is ``benchmarks.suite.ours_step`` (2 layers, 256 hidden, vocabulary 28, one-hot, batch 32 x 35,
SGD, clipping), the one ``python -m benchmarks`` times. It prints the step time untimed by the profiler,
then the ops by self time, the share of the time in matrix products outside the window kernels (oneDNN's
``_linear_pointwise``, ``aten::mm``/``addmm``) and in the window
kernels (which run the recurrent products themselves when float32 windows are split by rows), and the
lowest rate the products can run at, counting the issue's FLOPs per token (all of a step's products)
over both shares, against the fp32 2048^3 ceiling measured here. The profiler adds its own overhead, so
the shares are the thing to read, not the absolute times.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import fp32_ceiling, loadavg, machine, refuse_unrunnable_precision  # noqa: E402
from benchmarks.suite import BATCH, MFLOP, STEPS, ours_step  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

PRODUCTS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")
WINDOWS = tuple(f"_{cell}Window{part}" for cell in ("LSTM", "GRU", "RNN") for part in ("", "Backward"))


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=["lstm", "gru", "rnn_tanh"], default="lstm")
    parser.add_argument("--impl", choices=["scratch", "concise"], default="scratch")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=30, help="profiled steps (after 20 warm-up steps)")
    parser.add_argument("--rows", type=int, default=12, help="ops to list")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rows < 1:
        parser.error("--steps and --rows must be >= 1")
    refuse_unrunnable_precision(parser, args.precision, "cpu", args.cell, args.impl, fix="use --precision fp32")

    print(f"machine: {machine()}; load average {loadavg()}")
    step = ours_step(args.cell, args.impl, args.precision)
    for _ in range(20):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - started) / args.steps
    tokens = BATCH * STEPS
    print(f"{args.impl} {args.cell} {args.precision}, book config: {seconds * 1e3:.2f} ms/step, "
          f"{tokens / seconds:,.0f} tokens/s (without the profiler)")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n{'op':<52}{'share':>7}{'ms/step':>9}{'calls/step':>12}")
    for e in events[: args.rows]:
        print(f"{e.key[:51]:<52}{e.self_cpu_time_total / total:>7.1%}"
              f"{e.self_cpu_time_total / 1e3 / args.steps:>9.2f}{e.count / args.steps:>12.1f}")
    in_products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS)
    in_windows = sum(e.self_cpu_time_total for e in events if e.key in WINDOWS)
    ceiling, _ = fp32_ceiling()
    print(f"\nmatrix products outside the window kernels: {in_products / total:.0%} of the profiled time; the window "
          f"kernels (the recurrent products, when float32 windows run split by rows, and the pointwise passes): "
          f"{in_windows / total:.0%}")
    share = (in_products + in_windows) / total
    if share > 0:
        gflops = MFLOP[args.cell] * 1e6 * tokens / (share * seconds) / 1e9
        print(f"both together: at that share of the unprofiled step the step's products run at >= {gflops:.0f} "
              f"GFLOP/s ({MFLOP[args.cell]} MFLOP/token), >= {gflops / ceiling:.0%} of the fp32 2048^3 ceiling "
              f"measured now ({ceiling:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
