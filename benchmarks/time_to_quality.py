"""Time to quality: wall time to a held-out perplexity of 5.07 on the main job's task (issue 7).

    python benchmarks/time_to_quality.py [--recipes book default fast] [--threads N] [--eval-every 50]
                                         [--target 5.07] [--max-minutes 15] [--set field=value ...]

Task: the full Time Machine, d2l normalisation, char level; the last 10% held out (validation 5%, then
test 5%); the validation split is scored every ``--eval-every`` optimiser steps with
``deeprnn.train.evaluate_tokens`` (64 contiguous streams, windows of 128, state carried, every token
scored once), the same scorer for every recipe. A recipe stops at the first evaluation at or below
``--target`` (or after ``--max-minutes``: of training for the book, of wall time for deeprnn, whose
schedule a time budget would change).

Recipes:

* ``book``: d2l 0.17's own loop (``train_epoch_ch8`` as written in ``bench_d2l.py``) on
  ``RNNModel(nn.LSTM(28, 256, 2))``, one-hot input, ``torch.optim.SGD`` lr 2, clipping at 1, batch
  32 x 35, sequential partitioning with the book's random offset, fp32. The issue's reference: 154 s.
  It runs in a child process with glibc's default malloc, as the book's users run it; deeprnn's recipes
  run in this process with ``deeprnn.allocator``'s settings, as ``deeprnn train`` does.
* ``default``: ``deeprnn.train`` with ``TrainConfig()``'s defaults (only the evaluation interval, the
  run directory and reporting changed).
* ``fast``: ``deeprnn.train`` with a recipe tuned for time to quality (see ``FAST``); ``--set`` changes
  any ``TrainConfig`` field of it (e.g. ``--set batch_size=128 lr=0.006``).

Reported per recipe: training seconds (the optimiser steps only, evaluation excluded, as the book's
timer and ``deeprnn train``'s ``elapsed_s`` count) and wall seconds (everything from the first step:
evaluations, and for deeprnn its checkpoints), steps, tokens, and the held-out perplexity reached.
The ratio to the book uses training seconds; the book's own figure from this run when ``book`` ran,
else the issue's 154 s reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.bench_d2l import book_grad_clipping, book_seq_data_iter_sequential  # noqa: E402
from benchmarks.bench_generate import BookRNNModel  # noqa: E402
from benchmarks.common import loadavg, machine, parse_sets  # noqa: E402
from deeprnn.corpus import build_corpus  # noqa: E402
from deeprnn.train import TrainConfig, evaluate_tokens, train  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

BOOK_REFERENCE_S = 154.0
# A candidate for wall time to quality: the default's batch (wider batches measured slower to the target
# here: the corpus is small, so steps, not tokens/s, decide), a doubled Adam rate, a cosine schedule over
# a 4-epoch horizon, lighter dropout.
FAST = dict(lr=1e-2, num_epochs=4, dropout=0.0, precision="auto", optimizer="adam", schedule="cosine")


class Reached(Exception):
    """Raised from the evaluation callback once the target is met: the run stops there."""


class _BookAsLM(nn.Module):
    """The book's ``RNNModel`` seen through the ``LanguageModel`` calls ``evaluate_tokens`` makes."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def begin_state(self, batch_size, device=None, dtype=None):
        return self.net_begin(batch_size)

    def net_begin(self, batch_size):
        shape = (self.net.rnn.num_layers, batch_size, self.net.num_hiddens)
        return torch.zeros(shape), torch.zeros(shape)

    def forward(self, X, state):
        y, state = self.net(X, state)  # (T*B, V)
        return y.view(X.shape[1], X.shape[0], -1), state  # (T, B, V)


def run_book(splits, vocab_size, *, target, eval_every, max_s, log) -> dict:
    random.seed(0)
    torch.manual_seed(0)
    net = BookRNNModel(nn.LSTM(vocab_size, 256, 2), vocab_size)
    lm = _BookAsLM(net)
    updater = torch.optim.SGD(net.parameters(), lr=2.0)
    loss = nn.CrossEntropyLoss()
    corpus = splits.train.tolist()
    step, tokens, train_s, best = 0, 0, 0.0, math.inf
    wall0 = time.perf_counter()
    while True:
        state = None
        for X, Y in book_seq_data_iter_sequential(corpus, 32, 35):
            t0 = time.perf_counter()
            if state is None:
                state = lm.net_begin(X.shape[0])
            else:
                for s in state:
                    s.detach_()
            y = Y.T.reshape(-1)
            y_hat, state = net(X, state)
            l = loss(y_hat, y.long()).mean()
            updater.zero_grad()
            l.backward()
            book_grad_clipping(net, 1)
            updater.step()
            float(l.detach() * y.numel())  # the book's per-batch metric (a host sync)
            train_s += time.perf_counter() - t0
            step += 1
            tokens += y.numel()
            if step % eval_every == 0:
                total, n = evaluate_tokens(lm, splits.valid, batch_size=64, num_steps=128)
                net.train()
                ppl = math.exp(total / n)
                best = min(best, ppl)
                log(f"  book    step {step:5d}  train {train_s:7.1f} s  valid ppl {ppl:.3f}")
                if ppl <= target or train_s > max_s:
                    return {"train_s": train_s, "wall_s": time.perf_counter() - wall0, "steps": step,
                            "tokens": tokens, "ppl": best, "reached": ppl <= target}


def run_book_child(args, log) -> dict:
    """``run_book`` in a child process with glibc's default malloc (``DEEPRNN_MALLOC=0``), while deeprnn's
    recipes run here with ``deeprnn.allocator``'s settings, as each side's users run it."""
    cmd = [sys.executable, __file__, "--book-child", "--target", str(args.target), "--eval-every",
           str(args.eval_every), "--max-minutes", str(args.max_minutes), "--threads", str(torch.get_num_threads())]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, DEEPRNN_MALLOC="0"))
    result = None
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        else:
            log(line.rstrip("\n"))
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"time_to_quality: the book's child process failed (exit {proc.returncode}; its error is above)")
    return result


def run_deeprnn(name, cfg: TrainConfig, *, target, max_s, log) -> dict:
    seen = {}
    wall0 = time.perf_counter()

    def watch(msg: str) -> None:
        if "valid ppl" not in msg:
            return
        ppl = float(msg.split("valid ppl ")[1].split()[0])
        step = int(msg.split(" step ")[1].split(":")[0])
        seen.update(ppl=min(ppl, seen.get("ppl", math.inf)), step=step, last=ppl)
        log(f"  {name:<7} step {step:5d}  wall {time.perf_counter() - wall0:7.1f} s  valid ppl {ppl:.3f}")
        if ppl <= target or time.perf_counter() - wall0 > max_s:
            raise Reached

    # No time_budget: it would also stretch the cosine schedule over the budget, changing the recipe.

    try:
        train(cfg, progress=False, log=watch, overwrite=True)
    except Reached:
        pass
    wall = time.perf_counter() - wall0
    import csv

    with open(Path(cfg.run_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    return {"train_s": float(last["elapsed_s"]), "wall_s": wall, "steps": int(last["step"]),
            "tokens": int(last["tokens"]), "ppl": seen.get("ppl", math.nan),
            "reached": seen.get("last", math.inf) <= target}


def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["book", "default", "fast"],
                        choices=["book", "default", "fast"], help="which recipes to run, in order")
    parser.add_argument("--target", type=float, default=5.07, help="held-out perplexity to reach")
    parser.add_argument("--eval-every", type=int, default=50, help="optimiser steps between evaluations")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="cap per recipe (book: training time; deeprnn: wall time)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--set", nargs="*", metavar="FIELD=VALUE", help="TrainConfig overrides of 'fast'")
    parser.add_argument("--book-seconds", type=float, default=None,
                        help="the book's training seconds from an earlier run on this machine (when "
                             "'book' is not among --recipes; default: the issue's 154 s)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    parser.add_argument("--book-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.book_child:  # the book's recipe alone, in the child process run_book_child starts
        corpus = build_corpus(["timemachine"], token="char", normalization="d2l")
        result = run_book(corpus.split((0.9, 0.05, 0.05)), len(corpus.vocab), target=args.target,
                          eval_every=args.eval_every, max_s=args.max_minutes * 60, log=lambda m: print(m, flush=True))
        print("RESULT " + json.dumps(result), flush=True)
        return
    os.environ.setdefault("MPLBACKEND", "Agg")
    lines = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    log(f"time to quality, {time.strftime('%Y-%m-%d %H:%M')}: held-out (validation) perplexity <= {args.target}, "
        f"evaluated every {args.eval_every} steps")
    log(f"machine: {machine()}")
    log(f"load average at start: {loadavg()}")
    corpus = build_corpus(["timemachine"], token="char", normalization="d2l")
    splits = corpus.split((0.9, 0.05, 0.05))
    log(f"task: The Time Machine, {corpus.tokens.numel():,} chars, vocab {len(corpus.vocab)}; train "
        f"{splits.train.numel():,} / valid {splits.valid.numel():,} / test {splits.test.numel():,}")
    results = {}
    max_s = args.max_minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            if recipe == "book":
                log("book: RNNModel(nn.LSTM(28, 256, 2)), one-hot, SGD lr 2, clip 1, batch 32x35, fp32, d2l's loop; "
                    "in a child process with glibc's default malloc, as the book's users run it")
                results[recipe] = run_book_child(args, log)
            else:
                over = {} if recipe == "default" else {**FAST, **parse_sets(args.set)}
                cfg = TrainConfig(**over, eval_every=args.eval_every, sample_every=0,
                                  run_dir=str(Path(tmp) / recipe), val_fraction=0.05, test_fraction=0.05)
                changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                           if getattr(cfg, f.name) != getattr(TrainConfig(), f.name)
                           and f.name not in ("run_dir", "eval_every", "sample_every")}
                log(f"{recipe}: deeprnn train, TrainConfig() defaults" + (f" with {changed}" if changed else ""))
                results[recipe] = run_deeprnn(recipe, cfg, target=args.target, max_s=max_s, log=log)
    if "book" in results and results["book"]["reached"]:
        book_s, source = results["book"]["train_s"], "this run"
    elif args.book_seconds:
        book_s, source = args.book_seconds, "--book-seconds"
    else:
        book_s, source = BOOK_REFERENCE_S, "the issue's reference"
    log("")
    log(f"{'recipe':<9}{'reached':>8}{'best ppl':>10}{'steps':>7}{'tokens':>11}{'train s':>9}{'wall s':>8}"
        f"{'vs book':>9}  (book {book_s:.1f} s, {source}; target <= 1/10)")
    for recipe, r in results.items():
        ratio = f"{r['train_s'] / book_s:.3f}" if r["reached"] else "-"
        log(f"{recipe:<9}{'yes' if r['reached'] else 'NO':>8}{r['ppl']:>10.3f}{r['steps']:>7}{r['tokens']:>11,}"
            f"{r['train_s']:>9.1f}{r['wall_s']:>8.1f}{ratio:>9}")
    log(f"load average at end: {loadavg()}")
    if not args.no_save:
        out = Path(__file__).resolve().parent / "results" / f"time-to-quality-{time.strftime('%Y-%m-%d')}.txt"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")


if __name__ == "__main__":
    main()
