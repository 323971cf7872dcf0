"""What every benchmark script shares: the machine line, the load average, the matmul ceiling, ``--set``.

Importing it sets malloc to keep freed memory (``deeprnn.allocator``), as ``deeprnn`` commands and
``train()`` do, so the benchmarks time what users run; the baselines in the same process get it too.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import platform
import time

import torch

from deeprnn.allocator import keep_freed_memory

keep_freed_memory()


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, or ``n/a``."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def machine() -> str:
    """One line: CPU, logical CPUs, torch and its threads and ISA, Python, OS, and the scratch layers'
    window kernels (C++ or the Python loops)."""
    from deeprnn.models import native, onednn
    from deeprnn.precision import native_bf16

    return (f"{cpu_name()}; {os.cpu_count()} logical CPUs; torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads, {torch.backends.cpu.get_cpu_capability()}); Python {platform.python_version()}; "
            f"{platform.system()} {platform.release()}; scratch layers on CPU: {native.backend()}; "
            f"fp32 window-sized products: {'oneDNN' if onednn.enabled() else 'torch.mm'}; "
            f"bf16: {'native' if native_bf16(torch.device('cpu')) else 'emulated (no AVX-512), so auto means fp32'}; "
            f"{keep_freed_memory()}")


def matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 3,
                  library: str = "torch") -> float:
    """GFLOP/s of an ``n``^3 matrix product on the CPU in ``dtype``, best of ``repeats`` after a warm-up:
    ``torch.mm`` (MKL's sgemm for float32), or with ``library="onednn"`` oneDNN's matmul, the one
    ``deeprnn.models.onednn`` calls (0.0 where this torch build lacks it)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    if library == "onednn":
        from deeprnn.models import onednn

        if onednn._LINEAR is None or not torch.backends.mkldnn.is_available():
            return 0.0
        product = lambda: onednn._LINEAR(a, b.t(), None, "none", [], "")  # noqa: E731
    else:
        product = lambda: a @ b  # noqa: E731
    product()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def fp32_ceiling() -> tuple[float, str]:
    """The fp32 matrix-product ceiling: the faster of ``torch.mm`` and oneDNN at 2048^3 (on AMD CPUs
    MKL's sgemm runs at about half of oneDNN's rate), and a note of both."""
    mm, dnn = matmul_gflops(), matmul_gflops(library="onednn")
    return max(mm, dnn), f"torch.mm {mm:.1f}, oneDNN {dnn:.1f}"


def parse_sets(items: list[str] | None) -> dict:
    """``--set key=value ...`` as TrainConfig overrides: a Python literal (``3``, ``0.1``, ``[2.0, 1.0]``,
    ``["a", "b"]``), ``true``/``yes``/``false``/``no``, else the text itself. Dashes in keys become
    underscores; a key that is not a TrainConfig field ends the script with one line."""
    from deeprnn.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for item in items or []:
        key, _, text = item.partition("=")
        key = key.replace("-", "_")
        if key not in fields:
            raise SystemExit(f"--set: {key!r} is not a TrainConfig field")
        if text.lower() in ("true", "yes", "false", "no"):
            out[key] = text.lower() in ("true", "yes")
            continue
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def refuse_repeated_seeds(parser, flag: str, seeds: list[int]) -> None:
    """``parser.error`` (one line, exit 2) for a seed given twice: it would run twice and count twice in a mean."""
    repeated = [seed for i, seed in enumerate(seeds) if seed in seeds[:i]]
    if repeated:
        parser.error(f"{flag} gives seed {repeated[0]} twice; give each seed once")


def refuse_unrunnable_precision(parser, precision: str, device, cell: str, impl: str, fix: str | None = None):
    """``parser.error`` (one line, exit 2) where ``deeprnn.precision.check_precision`` says the model cannot run
    in ``precision`` here (torch.nn.LSTM in bf16 on a CPU without AVX-512), before any step; ``fix``: what
    to do instead (else check_precision's own advice)."""
    from deeprnn.errors import ConfigError
    from deeprnn.precision import check_precision

    try:
        check_precision(precision, torch.device(device), cell, impl, **({} if fix is None else {"fix": fix}))
    except ConfigError as e:
        parser.error(str(e))


def preset_step(cfg, vocab_size: int = 28):
    """One training step of ``cfg``'s model on the CPU, as a callable: forward, loss, backward and the
    recipe's optimiser (``build_optimizer``), under bf16 autocast where ``cfg.precision`` resolves to it;
    one fixed batch of random tokens, every step from a fresh state (a window of ``cfg.num_steps``)."""
    from deeprnn.models import ModelConfig, build_model
    from deeprnn.precision import autocast_context
    from deeprnn.train import build_optimizer, sequence_loss

    torch.manual_seed(cfg.seed)
    model = build_model(ModelConfig(vocab_size=vocab_size, **cfg.model_fields()))
    model.train()
    optimizer = build_optimizer(cfg, model)
    X = torch.randint(0, vocab_size, (cfg.batch_size, cfg.num_steps))
    Y = torch.randint(0, vocab_size, (cfg.batch_size, cfg.num_steps))
    device = torch.device("cpu")

    def step() -> None:
        with autocast_context(device, cfg.precision):
            logits, _ = model(X, model.begin_state(cfg.batch_size))
        loss = sequence_loss(logits, Y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def alternating_rounds(step, settings: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Milliseconds per ``step()`` under each of ``settings`` (name -> a callable that switches to it), in
    ``rounds`` rounds of ``steps`` timed steps each. Every round runs each setting once, in alternating
    order (forwards, then backwards), so drift in the machine's load hits them alike; the first step after
    a switch is not timed."""
    names = list(settings)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            settings[name]()
            step()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return times
