"""Generation throughput against the book's ``predict_ch8``, measured side by side in one run.

    python benchmarks/bench_generate.py [--threads N] [--repeats 5] [--seconds 0.4]

Workloads, all on the book's model (2-layer LSTM, 256 hidden, one-hot input, vocabulary of 28) with the
same weights, so greedy outputs must be identical (checked):

    (a) book        a faithful re-implementation of d2l's ``RNNModel(nn.LSTM)`` + ``predict_ch8`` (8.5/9.3):
                    one forward per character, ``reshape``, ``int(y.argmax(dim=1).reshape(1))``
    (b) greedy      ``deeprnn.generate(strategy="greedy")``, one stream: the compiled loop (``csrc/greedy.cpp``,
                    up to ``--threads`` threads, each with a slice of the weights in its own cache)
    (b'') greedy/py the same on the cell stepper in a Python loop (what generate did before the compiled
                    loop, and still does where it cannot load), to show what the compiled loop buys
    (b') greedy/fwd the same through ``model.forward`` (the generic stepper), to show what the stepper buys
    (c) sample x64  ``strategy="sample"``, 64 streams in one batch, temperature 1: each step one call of the
                    C++ row stepper (``RowStepper``) where the kernels have a row product kernel
    (c'') the same  with the cells as torch ops on oneDNN's products (what (c) does without a row stepper
                    on a CPU with AVX-512; without AVX-512 it takes (c')), to show what the row stepper buys
    (c') the same   with the stepper on ``torch.*_cell`` (as below ``ONEDNN_MIN_STREAMS`` streams), to show
                    what its oneDNN products buy
    (d) beam x4     ``strategy="beam"``, width 4 (characters of the returned beam per second)

Each figure is the best of ``--repeats`` rounds; a round runs every workload once for about ``--seconds``,
so load from other processes hits all of them alike, and the best round is the least disturbed. The whole
script takes about 20 s on an idle machine and stops adding rounds after 40 s on a busy one. Ratios are to (a)
from the same run; "of peak" is FLOPs/char x chars/s over an fp32 2048^3 matmul measured here (the faster of
torch.mm and oneDNN).
Targets (issue 7): greedy >= 8x the book, 64-stream sampling >= 50k chars/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import fp32_ceiling, loadavg, machine  # noqa: E402
from deeprnn.generate import _ModelStepper, generate  # noqa: E402
from deeprnn.models import ModelConfig, build_model  # noqa: E402
from deeprnn.vocab import Vocab  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

PREFIX = "time traveller "


# -- (a) the book, as written in d2l 0.17 (sections 8.5 and 9.3) --------------------------------------


class BookRNNModel(nn.Module):
    """d2l's ``RNNModel``: one-hot input, ``rnn_layer``, ``nn.Linear`` on ``(T*B, H)``."""

    def __init__(self, rnn_layer, vocab_size):
        super().__init__()
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.linear = nn.Linear(self.num_hiddens, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size)
        X = X.to(torch.float32)
        Y, state = self.rnn(X, state)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))  # (T*B, V)
        return output, state

    def begin_state(self, device, batch_size=1):
        shape = (self.rnn.num_layers, batch_size, self.num_hiddens)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


def book_predict_ch8(prefix, num_preds, net, vocab, device):
    """d2l's ``predict_ch8``: warm up one character at a time, then feed back the argmax."""
    state = net.begin_state(batch_size=1, device=device)
    outputs = [vocab[prefix[0]]]
    get_input = lambda: torch.reshape(torch.tensor([outputs[-1]], device=device), (1, 1))  # noqa: E731
    for y in prefix[1:]:  # warm-up period
        _, state = net(get_input(), state)
        outputs.append(vocab[y])
    for _ in range(num_preds):  # predict num_preds steps
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join([vocab.idx_to_token[i] for i in outputs])


# -- measurement --------------------------------------------------------------------------------




def calibrate(fn, seconds: float) -> int:
    """The ``n`` for which one run of ``fn(n)`` takes about ``seconds`` (after a warm-up run)."""
    n = 20
    fn(n)
    while True:
        t = time.perf_counter()
        fn(n)
        elapsed = time.perf_counter() - t
        if elapsed > 0.05 or n >= 100_000:
            return max(20, int(n * seconds / elapsed))
        n *= 4


def measure(workloads, repeats: int, seconds: float, budget: float) -> list[float]:
    """Chars/s of each ``(fn, per_unit)`` (``fn(n)`` makes ``n * per_unit`` characters), best of rounds.

    Every round times each workload once, so a burst of load from other processes hits them all alike;
    the best round of each is reported. Rounds stop after ``repeats`` or when ``budget`` seconds are spent.
    """
    start = time.perf_counter()
    sizes = [calibrate(fn, seconds) for fn, _ in workloads]
    best = [float("inf")] * len(workloads)
    for r in range(repeats):
        for i, (fn, _) in enumerate(workloads):
            t = time.perf_counter()
            fn(sizes[i])
            best[i] = min(best[i], time.perf_counter() - t)
        if time.perf_counter() - start > budget:
            break
    return [n * per / b for n, (_, per), b in zip(sizes, workloads, best)]


def flops_per_char(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of one step: the input and recurrent products of every layer and the output."""
    G, H, V, L = cfg.num_gates, cfg.num_hiddens, cfg.vocab_size, cfg.num_layers
    return 2 * (G * H * (cfg.input_size + H) + (L - 1) * G * H * 2 * H + H * V)


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (at most 40 s); the best is reported")
    parser.add_argument("--seconds", type=float, default=0.4, help="target duration of one timed run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")  # <unk>, 26 letters, space: the book's 28 tokens
    cfg = ModelConfig(vocab_size=len(vocab), cell="lstm", num_layers=2, num_hiddens=256)
    book = BookRNNModel(nn.LSTM(len(vocab), 256, 2), len(vocab))
    ours = build_model(cfg)
    with torch.no_grad():  # the same weights in both
        ours.rnn.load_state_dict(book.rnn.state_dict())
        ours.output.load_state_dict(book.linear.state_dict())
    ours.eval()

    print(f"machine: {machine()}; load average {loadavg()}")
    peak, both = fp32_ceiling()
    print(f"fp32 matmul 2048^3: {peak:.1f} GFLOP/s ({both}); LSTM 2x256 step: {flops_per_char(cfg) / 1e6:.2f} MFLOP/char")

    check = 600
    with torch.no_grad():
        book_text = book_predict_ch8(PREFIX, check, book, vocab, "cpu")
    same = generate(ours, vocab, PREFIX, check) == [book_text]

    def greedy_forward(n):
        # The generic stepper: what generate does for a model it has no fast path for.
        import deeprnn.generate as g

        make = g.make_stepper
        g.make_stepper = lambda model, device: _ModelStepper(model, device)
        try:
            generate(ours, vocab, PREFIX, n)
        finally:
            g.make_stepper = make

    def greedy_stepper(n):
        # (b'') the cell stepper's Python loop: generate without its compiled greedy loop.
        import deeprnn.generate as g

        real = g._NativeGreedy.__dict__["for_stepper"]  # the classmethod itself, restored as it was
        g._NativeGreedy.for_stepper = staticmethod(lambda stepper, threads, num_preds: None)
        try:
            generate(ours, vocab, PREFIX, n)
        finally:
            g._NativeGreedy.for_stepper = real

    def sample_torch_cells(n):
        # (c) with the stepper on torch.*_cell for any number of streams: what oneDNN's products buy.
        import deeprnn.generate as g

        least = g.ONEDNN_MIN_STREAMS
        g.ONEDNN_MIN_STREAMS = 10**9
        try:
            generate(ours, vocab, PREFIX, n, strategy="sample", num_samples=64, seed=0)
        finally:
            g.ONEDNN_MIN_STREAMS = least

    def sample_onednn_ops(n):
        # (c'') without the row stepper: the cells as torch ops on oneDNN's products.
        import deeprnn.generate as g

        real, steps = g._CellStepper._row_stepper, g._onednn_steps
        g._CellStepper._row_stepper, g._onednn_steps = (lambda self: None), (lambda: True)
        try:
            generate(ours, vocab, PREFIX, n, strategy="sample", num_samples=64, seed=0)
        finally:
            g._CellStepper._row_stepper, g._onednn_steps = real, steps

    def run_book(n):
        with torch.no_grad():
            book_predict_ch8(PREFIX, n, book, vocab, "cpu")

    workloads = [
        ("(a) book predict_ch8", run_book, 1),
        ("(b) greedy", lambda n: generate(ours, vocab, PREFIX, n), 1),
        ("(b'') greedy, Python loop", greedy_stepper, 1),
        ("(b') greedy via forward", greedy_forward, 1),
        ("(c) sample x64 streams",
         lambda n: generate(ours, vocab, PREFIX, n, strategy="sample", num_samples=64, seed=0), 64),
        ("(c'') sample x64, oneDNN ops", sample_onednn_ops, 64),
        ("(c') sample x64, torch cells", sample_torch_cells, 64),
        ("(d) beam width 4", lambda n: generate(ours, vocab, PREFIX, n, strategy="beam", beam_width=4), 1),
    ]
    t0 = time.perf_counter()
    rates = measure([(fn, per) for _, fn, per in workloads], args.repeats, args.seconds, budget=40.0)
    rows = [(name, rate) for (name, _, _), rate in zip(workloads, rates)]
    base = rows[0][1]
    fpc = flops_per_char(cfg)
    print(f"greedy output identical to the book's ({check} chars, same weights): {'yes' if same else 'NO'}")
    print(f"{'workload':<30}{'chars/s':>12}{'vs book':>10}{'of peak':>10}")
    for name, rate in rows:
        print(f"{name:<30}{rate:>12,.0f}{rate / base:>9.1f}x{fpc * rate / (peak * 1e9):>9.1%}")
    greedy, sample = rows[1][1], rows[4][1]
    print(f"targets: greedy >= 8x book: {greedy / base:.1f}x {'met' if greedy >= 8 * base else 'MISSED'}; "
          f"64-stream sampling >= 50,000 chars/s: {sample:,.0f} {'met' if sample >= 50_000 else 'MISSED'}")
    weight_mb = sum(p.numel() * 4 for p in ours.parameters()) / 1e6
    print(f"greedy: compiled loop vs the Python stepper loop: {greedy / rows[2][1]:.2f}x; weights read: "
          f"{weight_mb:.1f} MB/char, {greedy * weight_mb / 1e3:.0f} GB/s")
    print(f"64-stream sampling, the row stepper vs the cells as torch ops on oneDNN's products: "
          f"{sample / rows[5][1]:.2f}x; those vs the stepper on torch.*_cell: {rows[5][1] / rows[6][1]:.2f}x")
    print(f"timed section: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
