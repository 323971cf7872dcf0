"""What bf16 costs on this CPU: matrix-product throughput in fp32 and bf16, and what ``--precision auto`` means.

    python benchmarks/precision_probe.py [--threads N]

torch multiplies bf16 through oneDNN only on a CPU with AVX-512 (BW, VL, DQ; ``deeprnn.precision.native_bf16``).
Elsewhere it falls back to a generic kernel, so ``auto`` (deeprnn's default precision) means fp32 there. This
prints, in GFLOP/s: an ``n``^3 product in fp32 (torch.mm and oneDNN) and in bf16, and the product of a training
window's input projection (2560 x 512 by 512 x 2048: batch 32 x 80 tokens into a 512-unit LSTM's four gates)
in both, with the ratio between them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import loadavg, machine, matmul_gflops  # noqa: E402
from deeprnn.precision import native_bf16, resolve_precision  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402


def window_gflops(dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of a (2560, 512) @ (512, 2048) product in ``dtype``, the mean of ``repeats`` after a warm-up."""
    x, w = torch.randn(2560, 512).to(dtype), torch.randn(2048, 512).to(dtype)
    x @ w.t()
    t = time.perf_counter()
    for _ in range(repeats):
        x @ w.t()
    return 2 * 2560 * 512 * 2048 * repeats / (time.perf_counter() - t) / 1e9


def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--size", type=int, default=1024, help="n of the bf16 n^3 product (fp32 uses 2048)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"machine: {machine()}; load average {loadavg()}")
    print(f"native bf16: {'yes' if native_bf16(cpu) else 'no'}; --precision auto means "
          f"{resolve_precision('auto', cpu)} here")
    print(f"fp32 2048^3: torch.mm {matmul_gflops(torch.float32):.1f} GFLOP/s, "
          f"oneDNN {matmul_gflops(torch.float32, library='onednn'):.1f} GFLOP/s")
    print(f"bf16 {args.size}^3: torch.mm {matmul_gflops(torch.bfloat16, n=args.size, repeats=1):.2f} GFLOP/s")
    fp32, bf16 = window_gflops(torch.float32), window_gflops(torch.bfloat16)
    print(f"training window's input projection (2560x512 @ 512x2048): fp32 {fp32:.1f} GFLOP/s, "
          f"bf16 {bf16:.1f} GFLOP/s, bf16/fp32 {bf16 / fp32:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
