"""The CPU benchmark suite of issue 7: deeprnn against faithful book-style baselines, in one run.

    python -m benchmarks [--quick] [--threads N] [--skip-ingest] [--no-save] [--same-malloc]

Every figure is a ratio against a baseline measured in the same run, in interleaved rounds (each
round runs every workload once for about ``--seconds``), so load from other processes hits both sides
alike; a ratio is the median over rounds of (ours / baseline) within a round, a rate the median over
rounds. The book's training steps run in a child process with glibc's default malloc, as the book's
users run them, a fresh process every round (how often default malloc faults differs by process); deeprnn's side runs in this process with the malloc settings every ``deeprnn`` command
and ``train()`` use (``deeprnn.allocator``). The two never run at the same time: each waits on a pipe
while the other runs. ``--same-malloc`` runs the book's steps in this process under deeprnn's settings
instead, and ``benchmarks/bench_allocator.py`` measures what the settings alone are worth. The table
also gives each workload's fraction of the fp32 matrix-product ceiling, measured here (2048^3, the
faster of ``torch.mm`` and oneDNN's matmul, best of 3 at the start and at the end, the higher taken; on
AMD CPUs MKL's sgemm behind ``torch.mm`` runs at about half of oneDNN's rate): FLOPs/token x
tokens/s / GFLOP/s, with the issue's FLOP counts (2-layer 256-hidden LSTM training 4.88 MFLOP/token,
GRU 3.7, tanh RNN 1.3; generation 1.64 MFLOP/char). Above 100% means a workload ran its products in
bf16, whose ceiling is printed too.

Training workloads (book config: 2 layers, 256 hidden, vocabulary 28, one-hot input, batch 32 x 35
steps, SGD, clipping at 1, state carried and detached between windows, random tokens):

* book: d2l's ``RNNModel(nn.LSTM/GRU/RNN)`` with the step of ``train_epoch_ch8`` as d2l 0.17 writes
  it (its ``grad_clipping``, ``torch.optim.SGD``, ``float(l * numel)`` per batch), fp32;
* book-style scratch: d2l 9.1/9.2's scratch LSTM/GRU stacked twice (one product per gate per step,
  autograd through every step, d2l's ``sgd``), fp32;
* ours: ``build_model`` (concise = torch.nn, scratch = deeprnn's window kernels) with the step of
  ``deeprnn.train`` (autocast when bf16, loss on device, ``clip_grad_norm_``, ``torch.optim.SGD``).

Generation: ``predict_ch8`` as the book writes it against ``deeprnn.generate`` on the same weights
(greedy output checked identical), and 64 sampled streams. Ingestion: a 100 MB text file (The Time
Machine repeated) through ``build_corpus`` (char level, d2l normalisation) in a fresh subprocess,
peak RSS (``VmHWM``) above the interpreter's baseline against the file size, with malloc set as
``deeprnn`` commands set it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_d2l import book_grad_clipping, book_sgd
from benchmarks.bench_generate import PREFIX, BookRNNModel, book_predict_ch8
from benchmarks.bench_models import BookStyleLSTM
from benchmarks.common import fp32_ceiling, loadavg, machine, matmul_gflops
from deeprnn.cli import OneLineParser
from deeprnn.generate import generate
from deeprnn.models import ModelConfig, build_model, detach_state
from deeprnn.precision import autocast_context, native_bf16
from deeprnn.train import sequence_loss
from deeprnn.vocab import Vocab

VOCAB, HIDDENS, LAYERS, BATCH, STEPS = 28, 256, 2, 32, 35
MFLOP = {"lstm": 4.88, "gru": 3.7, "rnn_tanh": 1.3, "generate": 1.64}  # per token (training) / per char
RESULTS = Path(__file__).resolve().parent / "results"
# The book's ``float(l * y.numel())`` on a loss that requires grad: torch warns, the book does it anyway.
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")


# -- baselines ------------------------------------------------------------------------------------


class BookStyleGRU(nn.Module):
    """d2l 9.1's scratch GRU stacked twice: per-gate weights, one product per gate and input per step."""

    def __init__(self, vocab_size: int, num_hiddens: int, num_layers: int = 2):
        super().__init__()
        self.vocab_size, self.num_hiddens, self.num_layers = vocab_size, num_hiddens, num_layers

        def normal(*shape):
            return nn.Parameter(torch.randn(*shape) * 0.01)

        self.params = nn.ParameterList()
        for l in range(num_layers):
            num_inputs = vocab_size if l == 0 else num_hiddens
            for _ in "zrh":  # W_x?, W_h?, b_? for the update and reset gates and the candidate
                self.params.extend([normal(num_inputs, num_hiddens), normal(num_hiddens, num_hiddens),
                                    nn.Parameter(torch.zeros(num_hiddens))])
        self.W_hq, self.b_q = normal(num_hiddens, vocab_size), nn.Parameter(torch.zeros(vocab_size))

    def begin_state(self, batch_size):
        return torch.zeros(self.num_layers, batch_size, self.num_hiddens)

    def forward(self, X, state):
        inputs = F.one_hot(X.T, self.vocab_size).float()  # (T, B, V)
        Hs = list(state.unbind(0))
        outputs = []
        for x in inputs:
            for l in range(self.num_layers):
                W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h = self.params[9 * l : 9 * (l + 1)]
                H = Hs[l]
                Z = torch.sigmoid((x @ W_xz) + (H @ W_hz) + b_z)
                R = torch.sigmoid((x @ W_xr) + (H @ W_hr) + b_r)
                H_tilda = torch.tanh((x @ W_xh) + ((R * H) @ W_hh) + b_h)
                H = Z * H + (1 - Z) * H_tilda
                Hs[l], x = H, H
            outputs.append(x @ self.W_hq + self.b_q)
        return torch.cat(outputs, dim=0), torch.stack(Hs)  # (T*B, V), as RNNModelScratch


class BookRNNModelTrain(BookRNNModel):
    """d2l's ``RNNModel`` with its ``begin_state`` for any torch.nn layer (LSTM: an (h, c) pair)."""

    def begin_state(self, device="cpu", batch_size=1):
        shape = (self.rnn.num_layers, batch_size, self.num_hiddens)
        if isinstance(self.rnn, nn.LSTM):
            return torch.zeros(shape), torch.zeros(shape)
        return torch.zeros(shape)


def _batch():
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(0, VOCAB, (BATCH, STEPS), generator=gen),
            torch.randint(0, VOCAB, (BATCH, STEPS), generator=gen))


def book_step(net, *, scratch: bool):
    """One step of d2l 0.17's ``train_epoch_ch8`` (sequential partitioning: state detached in place)."""
    X, Y = _batch()
    loss = nn.CrossEntropyLoss()
    if scratch:
        params = list(net.parameters())
        update = lambda: book_sgd(params, 1.0, 1)  # noqa: E731  (d2l.sgd, batch_size=1 as train_ch8)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
    box = {"state": net.begin_state(batch_size=BATCH)}

    def step():
        state = box["state"]
        for s in state if isinstance(state, tuple) else (state,):
            s.detach_()
        y = Y.T.reshape(-1)
        y_hat, state = net(X, state)
        l = loss(y_hat.reshape(-1, VOCAB), y.long()).mean()
        if scratch:
            l.backward()
            book_grad_clipping(net, 1)
            update()
        else:
            opt.zero_grad()
            l.backward()
            book_grad_clipping(net, 1)
            opt.step()
        box["metric"] = float(l * y.numel())  # the book's per-batch host sync
        box["state"] = state

    return step


def ours_step(cell: str, impl: str, precision: str):
    """One step of ``deeprnn.train``'s loop on ``build_model`` at the book config."""
    model = build_model(ModelConfig(vocab_size=VOCAB, cell=cell, num_layers=LAYERS, num_hiddens=HIDDENS,
                                    impl=impl, input="one_hot"))
    X, Y = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dev = torch.device("cpu")
    box = {"state": model.begin_state(BATCH), "loss": torch.zeros((), dtype=torch.float64)}

    def step():
        with autocast_context(dev, precision):
            logits, state = model(X, detach_state(box["state"]))  # (T, B, V)
        loss = sequence_loss(logits, Y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        box["loss"] += loss.detach().double()  # accumulated on the device, as the loop does
        box["state"] = state

    return step


# -- measurement ----------------------------------------------------------------------------------


def interleaved(workloads: dict, rounds: int, seconds: float, before_round=None) -> dict[str, list[float]]:
    """Units/s of every ``name -> (fn(n), units per n)`` in each of ``rounds`` interleaved rounds.

    Each workload is warmed up and sized so that ``fn(n)`` takes about ``seconds``; a round runs every
    workload once, in alternating order (forwards, then backwards), so neither side always runs first.
    A ``fn`` that returns a float (a workload in the baseline process) reports its own seconds.
    ``before_round(r)``, if given, runs before each round.
    """
    sizes = {}
    for name, (fn, _) in workloads.items():
        fn(1)
        fn(1)
        t = time.perf_counter()
        fn(1)
        sizes[name] = max(1, round(seconds / max(time.perf_counter() - t, 1e-6)))
    rates = {name: [] for name in workloads}
    names = list(workloads)
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        for name in names if r % 2 == 0 else names[::-1]:
            fn, units = workloads[name]
            n = sizes[name]
            t = time.perf_counter()
            own = fn(n)
            rates[name].append(n * units / (own if isinstance(own, float) else time.perf_counter() - t))
    return rates


BOOK_ROWS = ("book LSTM", "book GRU", "book RNN", "book-style scratch LSTM", "book-style scratch GRU")


def book_training_workloads() -> dict:
    """The book's training steps (fp32), the baselines of every training row, named as BOOK_ROWS."""
    return dict(zip(BOOK_ROWS, [
        book_step(BookRNNModelTrain(nn.LSTM(VOCAB, HIDDENS, LAYERS), VOCAB), scratch=False),
        book_step(BookRNNModelTrain(nn.GRU(VOCAB, HIDDENS, LAYERS), VOCAB), scratch=False),
        book_step(BookRNNModelTrain(nn.RNN(VOCAB, HIDDENS, LAYERS), VOCAB), scratch=False),
        book_step(BookStyleLSTM(VOCAB, HIDDENS, LAYERS), scratch=True),
        book_step(BookStyleGRU(VOCAB, HIDDENS, LAYERS), scratch=True),
    ], strict=True))


def serve_baselines() -> None:
    """The baseline process: runs ``name<TAB>n`` requests from stdin, answers each with its seconds."""
    torch.manual_seed(0)
    steps = book_training_workloads()
    for step in steps.values():  # warm-up, so a fresh process's first round is not its slowest
        step()
        step()
    print("ready", flush=True)
    for line in sys.stdin:
        name, n = line.rstrip("\n").split("\t")
        t = time.perf_counter()
        for _ in range(int(n)):
            steps[name]()
        print(repr(time.perf_counter() - t), flush=True)


class BaselineProcess:
    """The book's training steps in a child process with glibc's default malloc (``DEEPRNN_MALLOC=0``),
    as the book's users run them, while deeprnn's side runs here with ``deeprnn.allocator``'s settings.
    Only one process runs at a time: the other waits on the pipe. ``restart()`` starts a fresh process:
    the suite takes a new one every round, since how often default malloc faults in fresh pages differs
    from process to process (170 to 6,700 page faults per ``nn.LSTM`` step), and a median over rounds
    should not rest on one process's luck."""

    def __init__(self, threads: int):
        self.threads = threads
        self._start()

    def restart(self) -> None:
        self.close()
        self._start()

    def _start(self) -> None:
        threads = self.threads
        env = dict(os.environ, DEEPRNN_MALLOC="0")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks", "--serve-baselines", "--threads",
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env, cwd=Path(__file__).resolve().parents[1])
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the baseline process did not start (its error is above)")

    def workload(self, name: str):
        def run(n: int) -> float:
            self.proc.stdin.write(f"{name}\t{n}\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
            if not answer:
                raise RuntimeError(f"the baseline process died running {name!r} (its error is above)")
            return float(answer)
        return run

    def close(self, failed: bool = False) -> None:
        if failed:  # mid-request: do not wait for an answer nobody reads
            self.proc.kill()
        else:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def repeat(step):
    def run(n):
        for _ in range(n):
            step()
    return run


def ratio(rates, ours: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(rates[ours], rates[base]))


# Peak RSS in bytes: this process's VmHWM on Linux. Not ru_maxrss there: Linux carries the parent's RSS at
# fork into the child's ru_maxrss across exec, so a child of a big process would report the parent's size.
INGEST_CODE = r"""
import resource, sys, time
from deeprnn.allocator import keep_freed_memory
from deeprnn.corpus import build_corpus

keep_freed_memory()  # as `deeprnn train` reads a corpus (DEEPRNN_MALLOC=0: glibc's defaults)

def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

base = peak_rss()
t = time.perf_counter()
c = build_corpus([sys.argv[1]], token="char", normalization="d2l")
dt = time.perf_counter() - t
peak = peak_rss()
print(dt, base, peak, c.tokens.numel(), len(c.vocab), str(c.tokens.dtype).removeprefix("torch."))
"""


def ingest(size_mb: int = 100, one_line: bool = False) -> dict:
    """Time and peak RSS of ``build_corpus`` on a ``size_mb`` MB file, in a fresh subprocess: The Time
    Machine repeated, as is or (``one_line``) with its line breaks made spaces, one line like text8. The
    subprocess sets malloc as ``deeprnn`` commands do."""
    from deeprnn.corpus import _read_bundled

    text = _read_bundled("timemachine.txt")
    if one_line:
        text = text.replace(b"\r", b"").replace(b"\n", b" ")
    size = size_mb * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        with open(path, "wb") as f:
            written = 0
            while written < size:
                chunk = text[: size - written]
                f.write(chunk)
                written += len(chunk)
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        proc = subprocess.run([sys.executable, "-c", INGEST_CODE, str(path)], capture_output=True, text=True,
                              env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"ingestion subprocess failed: {proc.stderr.strip()[-500:]}")
    dt, base, peak, ntok, nvocab, dtype = proc.stdout.split()
    return {"seconds": float(dt), "rss_over": (int(peak) - int(base)) / size, "rss_total": int(peak) / size,
            "tokens": int(ntok), "vocab": int(nvocab), "dtype": dtype, "size": size}


# -- the suite ------------------------------------------------------------------------------------


def main(argv=None) -> str:
    parser = OneLineParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (about 2-3 minutes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, printed)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3 quick, 7 full)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per workload per round (default 0.25 quick, 0.6 full)")
    parser.add_argument("--skip-ingest", action="store_true", help="leave out the 100 MB ingestion run")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    parser.add_argument("--same-malloc", action="store_true",
                        help="run the book's training steps in this process, under deeprnn's malloc settings, "
                             "instead of a child process with glibc's defaults")
    parser.add_argument("--serve-baselines", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Checked before any warm-up, so a bad value costs nothing.
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.seconds is not None and not 0 < args.seconds < float("inf"):  # nan too
        parser.error(f"--seconds must be a finite number > 0, got {args.seconds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.serve_baselines:
        return serve_baselines()
    rounds = args.rounds if args.rounds is not None else 3 if args.quick else 7
    seconds = args.seconds if args.seconds is not None else 0.25 if args.quick else 0.6
    torch.manual_seed(0)
    started = datetime.datetime.now()
    load_start = loadavg()
    t_start = time.perf_counter()
    # bf16 rows only where the CPU multiplies bf16 natively (AVX-512): elsewhere torch emulates it, several
    # times slower than fp32, and torch.nn.LSTM has no bf16 at all (deeprnn.precision.check_precision).
    precisions = ("fp32", "bf16") if native_bf16(torch.device("cpu")) else ("fp32",)
    peak_start, peak_note_start = fp32_ceiling()
    bf16_peak = matmul_gflops(torch.bfloat16) if "bf16" in precisions else None

    # training steps
    unit = BATCH * STEPS
    baselines = None if args.same_malloc else BaselineProcess(torch.get_num_threads())
    if baselines is None:
        train = {k: repeat(s) for k, s in book_training_workloads().items()}
    else:
        train = {k: baselines.workload(k) for k in BOOK_ROWS}
    for cell, impl in (("lstm", "concise"), ("lstm", "scratch"), ("gru", "scratch"), ("rnn_tanh", "scratch")):
        for prec in precisions:
            train[f"{impl} {cell} {prec}"] = repeat(ours_step(cell, impl, prec))
    try:
        fresh = None if baselines is None else (lambda r: baselines.restart() if r > 0 else None)
        rates = interleaved({k: (fn, unit) for k, fn in train.items()}, rounds, seconds, before_round=fresh)
    except BaseException:
        if baselines is not None:
            baselines.close(failed=True)
        raise
    if baselines is not None:
        baselines.close()

    # generation
    vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")  # <unk>, 26 letters, space: the book's 28 tokens
    book = BookRNNModel(nn.LSTM(len(vocab), HIDDENS, LAYERS), len(vocab))
    ours = build_model(ModelConfig(vocab_size=len(vocab), cell="lstm", num_layers=LAYERS, num_hiddens=HIDDENS))
    with torch.no_grad():
        ours.rnn.load_state_dict(book.rnn.state_dict())
        ours.output.load_state_dict(book.linear.state_dict())
    with torch.no_grad():
        same = generate(ours, vocab, PREFIX, 300) == [book_predict_ch8(PREFIX, 300, book, vocab, "cpu")]

    def run_book(n):
        with torch.no_grad():
            book_predict_ch8(PREFIX, 100 * n, book, vocab, "cpu")

    # What one greedy step's matrix-vector products cost through torch alone (MKL, one thread), reading
    # every weight matrix once per character, with no gates, state or argmax: the floor of any loop that
    # calls torch per step, which generate's compiled loop (several threads, weights in their caches) is not.
    weights = [getattr(ours.rnn, f"weight_{k}_l{l}") for l in range(LAYERS) for k in ("ih", "hh")]
    weights.append(ours.output.weight)
    mats = [w.detach().t().contiguous() for w in weights]  # (in, out): x (1, in) @ W
    vecs = [torch.randn(1, w.shape[0]) for w in mats]
    outs = [torch.empty(1, w.shape[1]) for w in mats]

    def products_only(n):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(100 * n):
                for x, w, o in zip(vecs, mats, outs):
                    torch.mm(x, w, out=o)
        finally:
            torch.set_num_threads(threads)

    weight_mb = sum(w.numel() * w.element_size() for w in mats) / 1e6
    gen = interleaved({
        "products only": (products_only, 100),
        "predict_ch8": (run_book, 100),
        "greedy": (lambda n: generate(ours, vocab, PREFIX, 100 * n), 100),
        "sample x64": (lambda n: generate(ours, vocab, PREFIX, 100 * n, strategy="sample", num_samples=64,
                                          seed=0), 6400),
    }, rounds, seconds)

    ing = None if args.skip_ingest else ingest()
    ing_line = None if args.skip_ingest else ingest(one_line=True)
    peak_end, peak_note_end = fp32_ceiling()
    peak = max(peak_start, peak_end)
    load_end = loadavg()
    elapsed = time.perf_counter() - t_start

    def med(d, k):
        return statistics.median(d[k])

    def frac(mflop, rate):
        return f"{mflop * 1e6 * rate / (peak * 1e9):.0%}"

    rows = []  # (workload, measured, baseline, ratio, target, met, of peak)

    def add(name, rate, unit_name, base_name, base_rate, r, target, mflop, compute_bound=True):
        # The ratio a workload would reach running its products at the matrix-product ceiling of its
        # precision (fp32, or bf16 under autocast), against the baseline as measured: the hardware's limit.
        ceiling = bf16_peak if "bf16" in name else peak
        limit = f"{ceiling * 1e9 / (mflop * 1e6) / base_rate:.1f}x" if compute_bound else "-"
        rows.append((name, f"{rate:,.0f} {unit_name}", f"{base_name} {base_rate:,.0f}", f"{r:.2f}x",
                     f">= {target:g}x", "yes" if r >= target else "NO", frac(mflop, rate), limit))

    bl = med(rates, "book LSTM")
    for prec in precisions:
        target = {"fp32": 1.0, "bf16": 1.7}[prec]
        k = f"concise lstm {prec}"
        add(f"concise LSTM {prec} vs book nn.LSTM", med(rates, k), "tok/s", "book", bl,
            ratio(rates, k, "book LSTM"), target, MFLOP["lstm"])
    for cell, base, bname, mf in (("gru", "book GRU", "book nn.GRU", "gru"), ("rnn_tanh", "book RNN", "book nn.RNN", "rnn_tanh")):
        for prec in precisions:
            k = f"scratch {cell} {prec}"
            add(f"scratch {cell.replace('rnn_tanh', 'RNN tanh').replace('gru', 'GRU')} {prec} vs {bname}",
                med(rates, k), "tok/s", "book", med(rates, base), ratio(rates, k, base), 1.6, MFLOP[mf])
    for cell, base, bname, mf in (("lstm", "book-style scratch LSTM", "book-style scratch", "lstm"),
                                  ("gru", "book-style scratch GRU", "book-style scratch", "gru")):
        for prec in precisions:
            k = f"scratch {cell} {prec}"
            add(f"scratch {cell.upper()} {prec} vs {bname}", med(rates, k), "tok/s", "book-style",
                med(rates, base), ratio(rates, k, base), 3.5, MFLOP[mf])
    for cell in ("lstm", "gru"):
        for prec in precisions:
            k = f"scratch {cell} {prec}"
            add(f"scratch {cell.upper()} {prec} vs nn.LSTM (book)", med(rates, k), "tok/s", "book nn.LSTM", bl,
                ratio(rates, k, "book LSTM"), 0.9, MFLOP[cell])
    gb = med(gen, "predict_ch8")
    add("generation greedy, 1 stream vs predict_ch8", med(gen, "greedy"), "ch/s", "predict_ch8", gb,
        ratio(gen, "greedy", "predict_ch8"), 8.0, MFLOP["generate"], compute_bound=False)  # torch alone: next row
    floor = med(gen, "products only")
    rows.append((f"  torch's step products alone ({weight_mb:.1f} MB fp32 read/char)", f"{floor:,.0f} ch/s",
                 f"predict_ch8 {gb:,.0f}", f"{ratio(gen, 'products only', 'predict_ch8'):.2f}x", "-", "-",
                 f"greedy {med(gen, 'greedy') / floor:.1f}x", "-"))
    s64 = med(gen, "sample x64")
    rows.append(("generation sampling, 64 streams", f"{s64:,.0f} ch/s", "-", "-", ">= 50,000 ch/s",
                 "yes" if s64 >= 50_000 else "NO", frac(MFLOP["generate"], s64), "-"))
    if ing is not None:
        rows.append((f"ingestion {ing['size'] // 2**20} MB file, char/d2l: time", f"{ing['seconds']:.1f} s", "-",
                     "-", "<= 10 s", "yes" if ing["seconds"] <= 10 else "NO", "-", "-"))
        rows.append(("ingestion: peak RSS above interpreter / file size", f"{ing['rss_over']:.2f}x",
                     f"total {ing['rss_total']:.2f}x", "-", "<= 2x", "yes" if ing["rss_over"] <= 2 else "NO", "-", "-"))
        rows.append((f"  the same as one {ing_line['size'] // 2**20} MB line (text8-like): time, RSS",
                     f"{ing_line['seconds']:.1f} s, {ing_line['rss_over']:.2f}x", "-", "-", "<= 10 s, <= 2x",
                     "yes" if ing_line["seconds"] <= 10 and ing_line["rss_over"] <= 2 else "NO", "-", "-"))

    header = ("workload", "measured", "baseline (same run)", "ratio", "target", "met", "of fp32 peak",
              "ratio at ceiling")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines = [
        f"deeprnn benchmark suite ({'--quick' if args.quick else 'full'}), {started:%Y-%m-%d %H:%M}, "
        f"{elapsed:.0f} s",
        f"machine: {machine()}",
        f"load average (1/5/15 min): start {load_start}; end {load_end}",
        f"fp32 matmul 2048^3: {peak:.1f} GFLOP/s (the ceiling below, the best of two libraries at the start "
        f"and the end: start {peak_note_start}; end {peak_note_end}); "
        + (f"bf16 matmul 2048^3: {bf16_peak:.1f} GFLOP/s" if bf16_peak is not None else
           "no bf16 rows: this CPU has no AVX-512, so torch emulates bf16 (slower than fp32) and torch.nn.LSTM "
           "has none"),
        f"training: {LAYERS} layers, {HIDDENS} hidden, vocab {VOCAB}, one-hot, batch {BATCH} x {STEPS} steps, "
        f"SGD, clip 1; {rounds} interleaved rounds of ~{seconds:g} s per workload; ratio = median over rounds "
        "of ours/baseline in the round; bf16 = torch.autocast (the book's side is fp32)",
        ("book's training steps: this process, under deeprnn's malloc settings (--same-malloc)" if args.same_malloc
         else "book's training steps: a child process with glibc's default malloc, as the book's users run them, "
              "a fresh one every round "
              "(deeprnn's side: its malloc settings; benchmarks/bench_allocator.py measures their share)"),
        f"generation: same weights in both; greedy output identical to predict_ch8: {'yes' if same else 'NO'}",
        "",
        fmt(header),
        fmt(tuple("-" * w for w in widths)),
        *(fmt(r) for r in rows),
        "",
        "tokens/s, median over rounds: " + ", ".join(f"{k} {med(rates, k):,.0f}" for k in rates),
    ]
    if ing is not None:
        lines.append(f"ingestion: {ing['tokens']:,} tokens, vocabulary {ing['vocab']}; tokens are {ing['dtype']}, "
                     "the smallest integer dtype that holds the vocabulary (the Corpus contract); batches are int64")
    out = "\n".join(lines)
    print(out)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stem = f"cpu-{started:%Y-%m-%d}{'-quick' if args.quick else ''}"
        path = RESULTS / f"{stem}.txt"
        n = 1
        while path.exists():  # an earlier run of the day stays: the next free -2, -3, ...
            n += 1
            path = RESULTS / f"{stem}-{n}.txt"
        path.write_text(out + "\n")
        print(f"written to {path.relative_to(RESULTS.parent.parent)}")
    return out


if __name__ == "__main__":
    main()
