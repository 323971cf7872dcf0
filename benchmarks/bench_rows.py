"""float32 windows split by rows against per-step products: a recipe's training step and sampling, both ways.

    python benchmarks/bench_rows.py [--preset tm-cpu] [--rounds 8] [--steps 4] [--streams 64] [--set KEY=VALUE ...]

The scratch layers' C++ window kernels run a float32 window in one of two ways (``docs/ARCHITECTURE.md``):
split by rows, each thread carrying its rows through every step with the hand-written row product kernel
(AVX-512, or AVX2 with FMA), or step by step, each step's product ``h_{t-1} W_hh`` one call of oneDNN's
prepacked linear on all of torch's threads. ``set_row_products`` switches between them. This script times
the preset's training step on the CPU (``benchmarks.common.preset_step``: forward, loss, backward, the
preset's optimiser; random tokens, vocabulary 28) both ways, alternating for ``--rounds`` rounds of
``--steps`` steps, so drift in the machine's load hits both alike, and prints each round's milliseconds
per step and the ratio of the best rounds, per-step / rows (> 1: the row split is faster). It also times
one layer's forward window alone, the same way, and sampling: ``deeprnn.generate`` drawing 100 characters
for each of ``--streams`` streams from a model of the preset's shape (cell, layers, width, input, residual;
no regularisers), whose several-stream step runs in the C++ row stepper (``RowStepper``) or, with the row
split off, as ``generate`` runs it without one: torch ops on oneDNN's products on a CPU with AVX-512,
``torch.*_cell`` without (before 2026-11-28's ``_onednn_steps``, oneDNN's products there too). The preset
must train scratch layers in float32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import alternating_rounds, loadavg, machine, parse_sets, preset_step  # noqa: E402
from deeprnn.cli import PRESETS  # noqa: E402
from deeprnn.errors import ConfigError  # noqa: E402
from deeprnn.generate import generate  # noqa: E402
from deeprnn.models import ModelConfig, build_model, native  # noqa: E402
from deeprnn.precision import resolve_precision  # noqa: E402
from deeprnn.train import TrainConfig  # noqa: E402
from deeprnn.vocab import Vocab  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

VOCAB = 28


def forward_window(cfg: TrainConfig):
    """One LSTM/GRU/RNN forward window of ``cfg``'s width, ``cfg.batch_size`` rows and ``cfg.num_steps``
    steps, straight into the C++ kernel (random input projection, zero state)."""
    ext = native.load()
    torch.manual_seed(cfg.seed)
    T, B, H = cfg.num_steps, cfg.batch_size, cfg.num_hiddens
    gates = {"lstm": 4, "gru": 3}.get(cfg.cell, 1)
    xproj = torch.randn(T, B, gates * H)
    W = torch.randn(H, gates * H) / H**0.5
    h0 = torch.zeros(B, H)
    if cfg.cell == "lstm":
        return lambda: ext.lstm_forward(xproj, h0, h0, W)
    if cfg.cell == "gru":
        b_hn = torch.zeros(H)
        return lambda: ext.gru_forward(xproj, h0, W, b_hn, None)
    return lambda: ext.rnn_forward(xproj, h0, W, cfg.cell == "rnn_relu", None)


def sampling(cfg: TrainConfig, streams: int):
    """``generate`` sampling 100 characters for each of ``streams`` streams, from a model of ``cfg``'s
    shape without regularisers (so generation takes the fused cell path), vocabulary of 28 tokens."""
    vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")
    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(vocab_size=len(vocab), cell=cfg.cell, num_layers=cfg.num_layers,
                                    num_hiddens=cfg.num_hiddens, input=cfg.input, embed_size=cfg.embed_size,
                                    residual=cfg.residual)).eval()
    return lambda: generate(model, vocab, "time traveller", 100, strategy="sample", num_samples=streams, seed=0)


def main(argv=None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tm-cpu", choices=sorted(PRESETS), help="recipe whose step is timed")
    p.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round and way")
    p.add_argument("--streams", type=int, default=64, help="streams sampled at once")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.streams < 1:
        p.error("--rounds, --steps and --streams must be >= 1")
    # float32 unless --set says otherwise: the presets' "auto" means bf16 on an AVX-512 CPU or a GPU
    cfg = TrainConfig(**{**PRESETS[args.preset], "precision": "fp32", **parse_sets(args.set)})
    cpu = torch.device("cpu")
    if cfg.impl != "scratch" or resolve_precision(cfg.precision, cpu) != "fp32":
        p.error(f"the row split runs scratch layers in float32; this step is impl {cfg.impl!r}, precision "
                f"{resolve_precision(cfg.precision, cpu)!r}: use --set impl=scratch precision=fp32")
    ext = native.load()
    if ext is None or not ext.row_kernel_isa():
        p.error("the C++ window kernels here have no row product kernel (they need AVX-512, or AVX2 with FMA, "
                "and OpenMP): nothing to compare")
    ways = {"per-step": lambda: ext.set_row_products(False), "rows": lambda: ext.set_row_products(True)}
    try:
        step = preset_step(cfg, VOCAB)
    except ConfigError as e:  # e.g. zoneout, which the preset turns on, with a GRU
        p.error(str(e))
    try:
        times = {"step": alternating_rounds(step, ways, args.rounds, args.steps),
                 "window": alternating_rounds(forward_window(cfg), ways, args.rounds, 5),
                 "sampling": alternating_rounds(sampling(cfg, args.streams), ways, args.rounds, 3)}
    finally:
        ext.set_row_products(True)
    for what, label in (("step", "training step"), ("window", "forward window"),
                        ("sampling", f"sampling 100 chars x {args.streams} streams")):
        for name, ms in times[what].items():
            print(f"{label}, {name:>8}: " + " ".join(f"{t:.4g}" for t in ms) + f" ms (best {min(ms):.4g})")
        print(f"ratio per-step / rows, {label} (best rounds): "
              f"{min(times[what]['per-step']) / min(times[what]['rows']):.3f}")
    print(f"{args.preset}: {cfg.cell} {cfg.num_layers}x{cfg.num_hiddens}, batch {cfg.batch_size}x{cfg.num_steps}, "
          f"fp32, {torch.get_num_threads()} threads, {ext.row_kernel_isa()} row kernel; sampling "
          f"{args.streams * 100 / (min(times['sampling']['rows']) / 1e3):,.0f} chars/s with the row stepper, "
          f"{args.streams * 100 / (min(times['sampling']['per-step']) / 1e3):,.0f} without")
    print(f"machine: {machine()}; load average {loadavg()} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
