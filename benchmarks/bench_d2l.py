"""``d2l.train_ch8`` on deeprnn against the book's own training loop, at the book's configuration.

    python benchmarks/bench_d2l.py [--seconds 18] [--threads 1] [--device cpu]

Config (d2l section 9.3): The Time Machine, first 10,000 characters (``load_data_time_machine``'s
default), batch 32, 35 steps, sequential partitioning, SGD with the book's learning rates, gradients
clipped at 1. Models: ``RNNModel(nn.LSTM(28, 256, 2))``, ``RNNModel(nn.GRU(28, 256, 2))`` and the seed
note's exercise-1 two-layer scratch RNN (``RNNModelScratch`` on user-written functions); and the
section 8.6 model ``RNNModel(nn.RNN(28, 256))``, the one ``train_ch8`` runs on deeprnn's scratch kernel.

"book" is a faithful re-implementation, in this file, of the loop ``d2l`` 0.17 ships (``train_epoch_ch8``
with its ``grad_clipping``, ``sgd``, list-based ``seq_data_iter_sequential``); "ours" is
``deeprnn.d2l.train_epoch_ch8`` with the updater ``deeprnn.d2l.train_ch8`` builds. Both train their
own copy of the same initial model, one epoch each in turn (interleaved, so load on a shared machine
hits both alike), until ``--seconds`` per model have passed (at least 4 rounds). Tokens/sec is
tokens of an epoch / its wall time, as the book prints it; the ratio is the median over rounds of
ours / book within a round. For nn.RNN, "ours, torch path" is our loop with the scratch-kernel
engine switched off, to show what each part gives.
"""

from __future__ import annotations

import copy
import math
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import loadavg, machine  # noqa: E402
from deeprnn import d2l  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402

BATCH, STEPS, HIDDENS, LAYERS = 32, 35, 256, 2


# --- the book's loop (d2l 0.17, sections 8.3 and 8.5), written from its documented algorithm ----------
def book_seq_data_iter_sequential(corpus, batch_size, num_steps):
    offset = random.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = torch.tensor(corpus[offset: offset + num_tokens])
    Ys = torch.tensor(corpus[offset + 1: offset + 1 + num_tokens])
    Xs, Ys = Xs.reshape(batch_size, -1), Ys.reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i: i + num_steps], Ys[:, i: i + num_steps]


def book_grad_clipping(net, theta):
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def book_sgd(params, lr, batch_size):
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def book_train_epoch_ch8(net, train_iter, loss, updater, device, use_random_iter):
    state, t0 = None, time.perf_counter()
    metric = [0.0, 0.0]
    for X, Y in train_iter:
        if state is None or use_random_iter:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            if isinstance(net, nn.Module) and not isinstance(state, tuple):
                state.detach_()
            else:
                for s in state:
                    s.detach_()
        y = Y.T.reshape(-1)
        X, y = X.to(device), y.to(device)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            l.backward()
            book_grad_clipping(net, 1)
            updater.step()
        else:
            l.backward()
            book_grad_clipping(net, 1)
            updater(batch_size=1)
        with warnings.catch_warnings():  # torch warns on float() of a tensor that requires grad
            warnings.simplefilter("ignore")
            metric[0] += float(l * y.numel())
        metric[1] += float(y.numel())
    return math.exp(metric[0] / metric[1]), metric[1] / (time.perf_counter() - t0)


class BookDataLoader:
    def __init__(self, corpus):
        self.corpus = corpus

    def __iter__(self):
        return book_seq_data_iter_sequential(self.corpus, BATCH, STEPS)


# --- the seed note's exercise-1 model (two-layer scratch RNN, as its author wrote it) -----------------
def get_params_2(vocab_size, num_hiddens, device):
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape, device=device) * 0.01

    W_xh = normal((num_inputs, num_hiddens))
    W_hh1 = normal((num_hiddens, num_hiddens))
    b_h1 = torch.zeros(num_hiddens, device=device)
    W_hh2 = normal((num_hiddens, num_hiddens))
    b_h2 = torch.zeros(num_hiddens, device=device)
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xh, W_hh1, b_h1, W_hh2, b_h2, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_rnn_state_2(batch_size, num_hiddens, device):
    return (torch.zeros((batch_size, num_hiddens), device=device),
            torch.zeros((batch_size, num_hiddens), device=device),)


def rnn_2(inputs, state, params):
    W_xh, W_hh1, b_h1, W_hh2, b_h2, W_hq, b_q = params
    H1, H2, = state
    outputs = []
    for X in inputs:
        H1 = torch.tanh(torch.mm(X, W_xh) + torch.mm(H1, W_hh1) + b_h1)
        H2 = torch.tanh(torch.mm(H1, W_hh2) + b_h2)
        Y = torch.mm(H2, W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H1, H2,)


def scratch_copy(net):
    twin = copy.copy(net)
    twin.params = [p.detach().clone().requires_grad_(True) for p in net.params]
    return twin


# --- the comparison -------------------------------------------------------------------------------------

def compare(name, contestants, device, seconds):
    """``contestants``: (label, net, epoch_fn(net) -> (ppl, tokens/sec)), the first being "book".

    Rounds of one epoch each, in alternating order (ABC, CBA, ...) so that neither side always runs
    first; the ratio is the median over rounds of ours / book within the round, which cancels most of
    the drift in a shared machine's load.
    """
    for _, net, epoch in contestants:  # warm-up epoch each (allocator, oneDNN primitives)
        epoch(net)
    speeds = {label: [] for label, _, _ in contestants}
    ppls = {}
    start, rounds = time.perf_counter(), 0
    while rounds < 4 or time.perf_counter() - start < seconds:
        order = contestants if rounds % 2 == 0 else contestants[::-1]
        for label, net, epoch in order:
            ppl, speed = epoch(net)
            speeds[label].append(speed)
            ppls[label] = ppl
        rounds += 1
    book = speeds["book"]
    print(f"{name}  ({rounds} epochs each, device {device})")
    ratios = {}
    for label, _, _ in contestants:
        ratios[label] = statistics.median(s / b for s, b in zip(speeds[label], book))
        print(f"  {label:<18} {statistics.median(speeds[label]):>10.1f} tokens/sec (median epoch)   "
              f"x{ratios[label]:.2f} vs book   (last epoch perplexity {ppls[label]:.1f})")
    return ratios


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=18.0, help="minimum timed seconds per model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine oversubscribed OpenMP threads "
                             "make timings meaningless; 0 keeps torch's default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: d2l.try_gpu())")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else d2l.try_gpu()
    print(f"machine: {machine()}; load average {loadavg()}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    random.seed(0)
    torch.manual_seed(0)
    ours_iter, vocab = d2l.load_data_time_machine(BATCH, STEPS)
    book_iter = BookDataLoader(list(ours_iter.corpus))
    V = len(vocab)
    loss = nn.CrossEntropyLoss()

    def ours_epoch(lr):
        def run(net):
            updater = run.updaters.setdefault(id(net), d2l._optimizer(net, lr) if isinstance(net, nn.Module)
                                              else (lambda batch_size: d2l.sgd(net.params, lr, batch_size)))
            return d2l.train_epoch_ch8(net, ours_iter, loss, updater, device, False)
        run.updaters = {}
        return run

    def book_epoch(lr):
        def run(net):
            updater = run.updaters.setdefault(id(net), torch.optim.SGD(net.parameters(), lr)
                                              if isinstance(net, nn.Module)
                                              else (lambda batch_size: book_sgd(net.params, lr, batch_size)))
            return book_train_epoch_ch8(net, book_iter, loss, updater, device, False)
        run.updaters = {}
        return run

    def torch_path(epoch):
        def run(net):
            engine, d2l._scratch_engine = d2l._scratch_engine, lambda net, device: None
            try:
                return epoch(net)
            finally:
                d2l._scratch_engine = engine
        return run

    ratios = {}
    lstm = d2l.RNNModel(nn.LSTM(V, HIDDENS, LAYERS), V).to(device)
    ratios["LSTM"] = compare("RNNModel(nn.LSTM(28, 256, 2)), lr 2", [
        ("book", lstm, book_epoch(2.0)),
        ("ours", copy.deepcopy(lstm), ours_epoch(2.0)),
    ], device, args.seconds)
    gru = d2l.RNNModel(nn.GRU(V, HIDDENS, LAYERS), V).to(device)
    ratios["GRU"] = compare("RNNModel(nn.GRU(28, 256, 2)), lr 2", [
        ("book", gru, book_epoch(2.0)),
        ("ours", copy.deepcopy(gru), ours_epoch(2.0)),
    ], device, args.seconds)
    rnn = d2l.RNNModel(nn.RNN(V, HIDDENS), V).to(device)
    ratios["RNN (8.6)"] = compare("RNNModel(nn.RNN(28, 256)) of section 8.6, lr 1", [
        ("book", rnn, book_epoch(1.0)),
        ("ours", copy.deepcopy(rnn), ours_epoch(1.0)),
        ("ours, torch path", copy.deepcopy(rnn), torch_path(ours_epoch(1.0))),
    ], device, args.seconds)
    net = d2l.RNNModelScratch(V, HIDDENS, device, get_params_2, init_rnn_state_2, rnn_2)
    ratios["exercise-1 scratch RNN"] = compare("RNNModelScratch(exercise 1: two-layer RNN), lr 1", [
        ("book", net, book_epoch(1.0)),
        ("ours", scratch_copy(net), ours_epoch(1.0)),
    ], device, args.seconds)
    summary = ", ".join(f"{name} x{r['ours']:.2f}" for name, r in ratios.items())
    print(f"ours / book tokens/sec (median epochs, same run): {summary}")


if __name__ == "__main__":
    main()
