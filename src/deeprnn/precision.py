"""Which precision a run trains in: ``--precision auto`` resolved for the device, where bf16 is native,
emulated or cannot run at all, the autocast context, and the note a log prints about what bf16 means there.
"""

from __future__ import annotations

import torch

from deeprnn.errors import ConfigError


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices at full speed: a CUDA GPU from Ampere on, or a CPU
    with AVX-512 (BW, VL, DQ), which oneDNN's bf16 kernels need. Elsewhere (an AVX2-only x86 CPU, say)
    torch falls back to generic bf16 products, several times slower than float32 (on one such 2-core
    machine: 16 against 127 GFLOP/s for a 2560x512x2048 product; benchmarks/precision_probe.py)."""
    if device.type == "cuda":  # bf16 tensor cores from Ampere (8.0) on; is_bf16_supported() counts emulation
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` becomes ``bf16`` where :func:`native_bf16` holds and ``fp32`` elsewhere; the others stay."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def _emulated_bf16(precision: str, device: torch.device) -> bool:
    """Whether bf16 was asked for where the CPU only emulates it (``auto`` never is: it is fp32 there)."""
    return precision == "bf16" and device.type == "cpu" and not native_bf16(device)


def check_precision(precision: str, device: torch.device, cell: str, impl: str, *,
                    fix: str = "use precision auto or fp32, or impl 'scratch'") -> None:
    """ConfigError where bf16 cannot run at all: torch.nn.LSTM under bf16 autocast on a CPU without native
    bf16 (oneDNN builds no bf16 LSTM there: "could not create a primitive descriptor"). The GRU, the RNN and
    every scratch layer run there, only slower than fp32 (:func:`precision_note`). ``fix``: what to do."""
    if _emulated_bf16(precision, device) and cell == "lstm" and impl == "concise":
        raise ConfigError(f"precision 'bf16' with torch.nn.LSTM (impl 'concise') needs a CPU with AVX-512, which "
                          f"this one lacks; {fix}")


def autocast_context(device: torch.device, precision: str):
    enabled = resolve_precision(precision, device) == "bf16" and device.type in ("cpu", "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def precision_note(device: torch.device, precision: str, impl: str) -> str | None:
    """What bf16 really means here, or None where it means what it says.

    On a CPU without native bf16 (:func:`native_bf16`) it is emulated, and slower than fp32. On a GPU,
    torch's autocast has its own rule for cuDNN's RNNs (``aten/src/ATen/cudnn/AutocastRNN.cpp``): it casts
    their weights, input and state to float16, whatever dtype autocast was given, and deeprnn uses no loss
    scaler. The embedding, output layer and loss still follow bf16/fp32."""
    if _emulated_bf16(precision, device):
        return ("note: this CPU has no AVX-512, so torch emulates bfloat16 products, several times slower than "
                "float32; --precision auto (or fp32) trains faster here")
    if device.type != "cuda" or precision != "bf16" or impl != "concise":
        return None
    return ("note: under autocast torch runs cuDNN's LSTM/GRU/RNN layers in float16, not bfloat16, without "
            "loss scaling (the rest of the step is bfloat16); --precision fp32 keeps them in float32")
