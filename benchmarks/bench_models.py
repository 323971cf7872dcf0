"""Training-step throughput of the deep RNN models at the book's configuration (d2l section 9.3).

    python benchmarks/bench_models.py [--repeats 5] [--seconds 0.6] [--threads N] [--clock wall|process]

One step = forward, cross-entropy, backward, clip-by-norm 1, SGD, on random tokens (throughput does
not depend on the text), with the state carried across steps and detached, as sequential TBPTT does.
Config: 2 layers, 256 hidden, vocabulary 28, one-hot input, batch 32, 35 steps. Every model is timed
in interleaved rounds after a warm-up; tokens/sec is the median over rounds. Ratios are against
baselines measured in the same run: (c) a book-style scratch 2-layer LSTM (one matrix product per
gate per step, one-hot input, autograd through every step, as d2l 9.2 writes it) and (b) nn.LSTM.
All models share the same optimiser code, so the ratios compare the models only.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import machine  # noqa: E402
from deeprnn.models import ModelConfig, build_model, detach_state  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

VOCAB, HIDDENS, LAYERS, BATCH, STEPS = 28, 256, 2, 32, 35


class BookStyleLSTM(nn.Module):
    """d2l 9.2's scratch LSTM stacked twice: per-gate weights, one product per gate and input per step."""

    def __init__(self, vocab_size: int, num_hiddens: int, num_layers: int = 2):
        super().__init__()
        self.vocab_size, self.num_hiddens, self.num_layers = vocab_size, num_hiddens, num_layers

        def normal(*shape):
            return nn.Parameter(torch.randn(*shape) * 0.01)

        def three(num_inputs):
            return [normal(num_inputs, num_hiddens), normal(num_hiddens, num_hiddens),
                    nn.Parameter(torch.zeros(num_hiddens))]

        self.params = nn.ParameterList()
        for l in range(num_layers):
            num_inputs = vocab_size if l == 0 else num_hiddens
            for _ in "ifoc":  # W_x?, W_h?, b_? for the input, forget, output gates and candidate
                self.params.extend(three(num_inputs))
        self.W_hq, self.b_q = normal(num_hiddens, vocab_size), nn.Parameter(torch.zeros(vocab_size))

    def begin_state(self, batch_size):
        z = torch.zeros(self.num_layers, batch_size, self.num_hiddens)
        return z, z.clone()

    def forward(self, X, state):
        inputs = F.one_hot(X.T, self.vocab_size).float()  # (T, B, V)
        Hs, Cs = list(state[0].unbind(0)), list(state[1].unbind(0))
        outputs = []
        for x in inputs:
            for l in range(self.num_layers):
                (W_xi, W_hi, b_i, W_xf, W_hf, b_f,
                 W_xo, W_ho, b_o, W_xc, W_hc, b_c) = self.params[12 * l : 12 * (l + 1)]
                H, C = Hs[l], Cs[l]
                I = torch.sigmoid((x @ W_xi) + (H @ W_hi) + b_i)
                Fg = torch.sigmoid((x @ W_xf) + (H @ W_hf) + b_f)
                O = torch.sigmoid((x @ W_xo) + (H @ W_ho) + b_o)
                C_tilda = torch.tanh((x @ W_xc) + (H @ W_hc) + b_c)
                C = Fg * C + I * C_tilda
                H = O * torch.tanh(C)
                Hs[l], Cs[l], x = H, C, H
            outputs.append(x @ self.W_hq + self.b_q)
        return torch.stack(outputs), (torch.stack(Hs), torch.stack(Cs))  # (T, B, V)


def make_step(model):
    """A closure running one training step; state carried across calls, detached (TBPTT)."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(0)
    X = torch.randint(0, VOCAB, (BATCH, STEPS), generator=gen)
    Y = torch.randint(0, VOCAB, (BATCH, STEPS), generator=gen)
    box = {"state": model.begin_state(BATCH)}

    def step():
        logits, state = model(X, detach_state(box["state"]))  # (T, B, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), Y.T.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        box["state"] = state

    return step



def main() -> None:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per model (median taken)")
    parser.add_argument("--seconds", type=float, default=0.6, help="target seconds per model per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="'process' times CPU seconds of this process: steadier on a shared machine "
                             "with --threads 1 (with more threads it also counts threads spinning)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {machine()}")
    print(f"load average at start: {' '.join(open('/proc/loadavg').read().split()[:3])}"
          if platform.system() == "Linux" else "")
    print(f"config: {LAYERS} layers, {HIDDENS} hidden, vocab {VOCAB}, one-hot input, batch {BATCH}, "
          f"{STEPS} steps; step = fwd + CE + bwd + clip(1) + SGD; median of {args.repeats} rounds, {args.clock} clock")

    def ours(cell, impl):
        return build_model(ModelConfig(vocab_size=VOCAB, cell=cell, num_layers=LAYERS,
                                       num_hiddens=HIDDENS, impl=impl))

    models = {
        "(c) book-style scratch LSTM": BookStyleLSTM(VOCAB, HIDDENS, LAYERS),
        "(b) concise nn.LSTM": ours("lstm", "concise"),
        "(a) scratch LSTM": ours("lstm", "scratch"),
        "concise nn.GRU": ours("gru", "concise"),
        "scratch GRU": ours("gru", "scratch"),
        "concise nn.RNN tanh": ours("rnn_tanh", "concise"),
        "scratch RNN tanh": ours("rnn_tanh", "scratch"),
    }
    steps, per_step = {}, {}
    for name, model in models.items():  # warm-up, and size each round to about --seconds
        step = steps[name] = make_step(model)
        for _ in range(2):
            step()
        t = time.perf_counter()
        step()
        per_step[name] = max(1, round(args.seconds / (time.perf_counter() - t)))
    rates = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits every model alike
        for name, step in steps.items():
            n = per_step[name]
            t = clock()
            for _ in range(n):
                step()
            rates[name].append(n * BATCH * STEPS / (clock() - t))
    tps = {name: statistics.median(r) for name, r in rates.items()}
    book, lstm = tps["(c) book-style scratch LSTM"], tps["(b) concise nn.LSTM"]
    pairs = {"scratch GRU": "concise nn.GRU", "scratch RNN tanh": "concise nn.RNN tanh"}
    print(f"{'model':<30}{'tokens/s':>10}{'vs (c)':>9}{'vs (b)':>9}{'vs concise':>12}")
    for name, rate in tps.items():
        other = f"{rate / tps[pairs[name]]:.2f}x" if name in pairs else ""
        print(f"{name:<30}{rate:>10,.0f}{rate / book:>8.2f}x{rate / lstm:>8.2f}x{other:>12}")


if __name__ == "__main__":
    main()
