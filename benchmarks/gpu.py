"""The GPU figures of issue 7, measured in one run (``bash benchmarks/gpu.sh`` runs this).

    python -m benchmarks.gpu [--tiny] [--seconds 4] [--no-graphs] [--no-save]

1. bf16 matrix throughput: ``torch.mm`` of 8192^3 bf16 (1024^3 on a CPU), best of 5, GFLOP/s.
2. The book config (2-layer 256-hidden LSTM, one-hot, vocabulary 28, batch 32 x 35, SGD, clip 1):
   tokens/s of (a) the book's loop as d2l 0.17 writes it (``RNNModel(nn.LSTM)``, its ``grad_clipping``
   with ``if norm > theta`` and ``float(l * numel)`` per batch: two host syncs per step), and of
   deeprnn's step on the same model (cuDNN ``nn.LSTM``, ``clip_grad_norm_`` and loss accumulation on the
   device, pinned batches copied ``non_blocking``, no host sync in the loop) in fp32, in bf16 autocast,
   and in bf16 with the whole step captured as one CUDA graph (reported only where capture works; the
   best of the three is what deeprnn can deliver).
3. A large-batch config (2 x 1024 LSTM, embedding input, batch 1024 x 35, bf16 autocast): tokens/s and
   the fraction of the bf16 matrix throughput of item 1 (training FLOPs = 3 x the forward products).

Targets: >= 1M tokens/s at the book config; >= 25% of the measured bf16 matrix throughput at large
batch. Without CUDA it says that it fell back to CPU and runs tiny sizes, so the script stays testable.
The whole run takes well under 5 minutes on one H100.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_d2l import book_grad_clipping  # noqa: E402
from benchmarks.bench_generate import BookRNNModel  # noqa: E402
from benchmarks.common import loadavg, machine  # noqa: E402
from deeprnn.models import ModelConfig, build_model, detach_state  # noqa: E402
from deeprnn.precision import native_bf16  # noqa: E402
from deeprnn.train import sequence_loss  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bf16_gflops(dev, n: int) -> float:
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(dev)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(dev)
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * n**3 / best / 1e9


def train_flops_per_token(cfg: ModelConfig) -> float:
    """3 x the forward's multiply-adds x 2 (input, recurrent and output products; one-hot input free)."""
    G, H, V, L = cfg.num_gates, cfg.num_hiddens, cfg.vocab_size, cfg.num_layers
    first_in = 0 if cfg.input == "one_hot" else cfg.input_size  # a one-hot product is a row lookup
    fwd = G * H * (first_in + H) + (L - 1) * G * H * 2 * H + H * V
    return 3 * 2 * fwd


def timed(step, dev, seconds: float, warmup: int = 5) -> float:
    """Steps per second of ``step()`` over about ``seconds`` (synchronised only at both ends)."""
    for _ in range(warmup):
        step()
    sync(dev)
    t = time.perf_counter()
    step()
    sync(dev)
    n = max(3, int(seconds / max(time.perf_counter() - t, 1e-6)))
    sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync(dev)
    return n / (time.perf_counter() - t)


def batches(dev, B, T, V, k=8):
    """``k`` pinned (X, Y) batches on the host (pinned only where there is a GPU to copy to)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        X, Y = torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen)
        if dev.type == "cuda":
            X, Y = X.pin_memory(), Y.pin_memory()
        out.append((X, Y))
    return out


def book_loop(dev, B, T, V, H):
    """d2l 0.17's ``train_epoch_ch8`` step on ``RNNModel(nn.LSTM)``: blocking copies, two host syncs."""
    net = BookRNNModel(nn.LSTM(V, H, 2), V).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    loss = nn.CrossEntropyLoss()
    data = [(X.clone(), Y.clone()) for X, Y in batches(torch.device("cpu"), B, T, V)]  # pageable, as the book
    box = {"i": 0, "state": None}

    def step():
        X, Y = data[box["i"] % len(data)]
        box["i"] += 1
        state = box["state"]
        if state is None:
            state = net.begin_state(batch_size=B, device=dev)
        else:
            for s in state:
                s.detach_()
        y = Y.T.reshape(-1)
        X, y = X.to(dev), y.to(dev)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()
        opt.zero_grad()
        l.backward()
        book_grad_clipping(net, 1)  # `if norm > theta`: a host sync
        opt.step()
        float(l.detach() * y.numel())  # the book's metric: a host sync
        box["state"] = state

    return step


def ours_loop(dev, cfg: ModelConfig, B, T, precision: str, graph: bool):
    """deeprnn's step: pinned non-blocking copies, metrics and clipping on the device, no host sync.

    ``graph=True`` captures forward, backward, clipping and the SGD update as one CUDA graph replayed
    on static input buffers (the state is carried inside the graph's own buffers).
    """
    model = build_model(cfg).to(dev)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1.0)
    data = batches(dev, B, T, cfg.vocab_size)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    box = {"i": 0, "state": model.begin_state(B, device=dev)}

    def body(X, Y, state):
        with amp:
            logits, new_state = model(X, detach_state(state))  # (T, B, V)
        loss = sequence_loss(logits, Y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=False)  # graphs need the .grad buffers to stay put
        return loss, new_state

    if not graph:
        def step():
            X, Y = data[box["i"] % len(data)]
            box["i"] += 1
            X, Y = X.to(dev, non_blocking=True), Y.to(dev, non_blocking=True)
            loss, box["state"] = body(X, Y, box["state"])
            total.add_(loss.detach())
        return step

    sX = torch.zeros(B, T, dtype=torch.long, device=dev)
    sY = torch.zeros(B, T, dtype=torch.long, device=dev)
    state_in = box["state"]
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(3):
            body(sX, sY, state_in)
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        s_loss, s_state = body(sX, sY, state_in)

    def step():
        X, Y = data[box["i"] % len(data)]
        box["i"] += 1
        sX.copy_(X, non_blocking=True)
        sY.copy_(Y, non_blocking=True)
        g.replay()
        for dst, src in zip(state_in if isinstance(state_in, tuple) else (state_in,),
                            s_state if isinstance(s_state, tuple) else (s_state,)):
            dst.copy_(src)  # carry the state into the next replay
        total.add_(s_loss.detach())

    return step


def main(argv=None) -> str:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (what a CPU fallback runs anyway)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per configuration")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph variant")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    tiny = args.tiny or not cuda
    seconds = 0.3 if tiny else args.seconds
    lines = []

    def log(msg=""):
        print(msg, flush=True)
        lines.append(msg)

    log(f"deeprnn GPU benchmark, {time.strftime('%Y-%m-%d %H:%M')}")
    log(f"host: {machine()}; load average {loadavg()}")
    if cuda:
        p = torch.cuda.get_device_properties(dev)
        log(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()} (enabled: {torch.backends.cudnn.enabled})")
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)  # tiny steps: extra threads only add synchronisation on a shared CPU
        log("CUDA is not available: fell back to CPU with tiny sizes and 1 thread "
            "(these numbers say nothing about a GPU)")
    if tiny and cuda:
        log("--tiny: tiny sizes")

    V = 28
    H_book, B_book, T = (32, 4, 8) if tiny else (256, 32, 35)
    H_big, B_big = (64, 16) if tiny else (1024, 1024)
    peak = bf16_gflops(dev, 256 if tiny else 8192)
    log(f"bf16 matmul {'256' if tiny else '8192'}^3: {peak:,.0f} GFLOP/s")

    book_cfg = ModelConfig(vocab_size=V, cell="lstm", num_layers=2, num_hiddens=H_book, impl="concise",
                           input="one_hot", init="torch")
    rows = []
    book_tps = timed(book_loop(dev, B_book, T, V, H_book), dev, seconds) * B_book * T
    rows.append(("book loop, RNNModel(nn.LSTM), fp32", book_tps))
    # bf16 where the device multiplies it natively; a CPU fallback without AVX-512 runs the rows in fp32
    # (torch.nn.LSTM has no bf16 there: deeprnn.precision.check_precision).
    lp = "bf16" if native_bf16(dev) else "fp32"
    if lp != "bf16":
        log("no native bf16 on this device: the bf16 rows run in fp32")
    for precision in dict.fromkeys(("fp32", lp)):
        tps = timed(ours_loop(dev, book_cfg, B_book, T, precision, graph=False), dev, seconds) * B_book * T
        rows.append((f"deeprnn step, {precision}", tps))
    big_cfg = ModelConfig(vocab_size=V, cell="lstm", num_layers=2, num_hiddens=H_big, impl="concise",
                          input="embedding", init="torch")
    big_tps = timed(ours_loop(dev, big_cfg, B_big, T, lp, graph=False), dev, seconds) * B_big * T
    if cuda and not args.no_graphs:  # last: a failed capture may leave the device unusable for the rest
        try:
            tps = timed(ours_loop(dev, book_cfg, B_book, T, lp, graph=True), dev, seconds) * B_book * T
            rows.append((f"deeprnn step, {lp}, CUDA graph", tps))
        except Exception as e:  # capture is not supported by every cuDNN/torch pairing: say so, go on
            log(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); skipped")
    log(f"\nbook config: 2 x {H_book} LSTM, one-hot, vocab {V}, batch {B_book} x {T}, SGD, clip 1")
    log(f"{'loop':<36}{'tokens/s':>14}{'vs book':>9}")
    for name, tps in rows:
        log(f"{name:<36}{tps:>14,.0f}{tps / book_tps:>8.2f}x")
    best = max(tps for _, tps in rows[1:])
    log(f"target >= 1,000,000 tokens/s: best deeprnn {best:,.0f} -> {'met' if best >= 1e6 else 'MISSED'}"
        + ("" if cuda else " (CPU fallback)"))

    fpt = train_flops_per_token(big_cfg)
    big = [(lp, big_tps)]
    log(f"\nlarge batch: 2 x {H_big} LSTM, embedding, vocab {V}, batch {B_big} x {T}, {lp}; "
        f"{fpt / 1e6:.1f} MFLOP/token (training)")
    for name, tps in big:
        frac = fpt * tps / (peak * 1e9)
        log(f"deeprnn step, {name:<22}{tps:>14,.0f} tokens/s  {frac:6.1%} of the bf16 matmul throughput "
            f"(target >= 25%: {'met' if frac >= 0.25 else 'MISSED'}{'' if cuda else ', CPU fallback'})")
    out = "\n".join(lines)
    if not args.no_save and not tiny:
        path = Path(__file__).resolve().parent / "results" / f"gpu-{time.strftime('%Y-%m-%d')}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(out + "\n")
        log(f"written to {path}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
