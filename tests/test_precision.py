"""deeprnn.precision: where bf16 is native, what ``--precision auto`` becomes, and what a run's log says bf16 means.

The tests that train under each precision are in test_train.py; the command lines' refusals in test_bad_input.py.
"""

import pytest
import torch

from deeprnn import precision
from deeprnn.precision import native_bf16, precision_note, resolve_precision


def test_precision_note_says_what_bf16_means_for_cudnn_rnns(monkeypatch):
    """torch's autocast runs cuDNN's RNNs in float16 whatever dtype it was given: a concise bf16 run on a GPU
    says so; a CPU run (with native bf16), an fp32 run and a scratch run (whose own kernels follow bf16) say
    nothing."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    cuda = torch.device("cuda", 0)
    note = precision_note(cuda, "bf16", "concise")
    assert note == ("note: under autocast torch runs cuDNN's LSTM/GRU/RNN layers in float16, not bfloat16, without "
                    "loss scaling (the rest of the step is bfloat16); --precision fp32 keeps them in float32")
    assert precision_note(torch.device("cpu"), "bf16", "concise") is None
    assert precision_note(cuda, "fp32", "concise") is None
    assert precision_note(cuda, "bf16", "scratch") is None


def test_native_bf16_follows_torchs_onednn_check():
    """On a CPU, native bf16 is oneDNN's own test (AVX-512 BW/VL/DQ), the one that decides whether torch's bf16
    products and torch.nn.LSTM's bf16 kernels exist; mps and others never."""
    assert native_bf16(torch.device("cpu")) is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("capability, native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_native_bf16_on_a_gpu_means_ampere_or_later(monkeypatch, capability, native):
    """A V100 or T4 emulates bf16 (torch.cuda.is_bf16_supported() says yes by default): auto is fp32 there."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    cuda1 = torch.device("cuda", 1)
    assert native_bf16(cuda1) is native and asked == [cuda1]  # the device asked about, not the current one
    assert resolve_precision("auto", cuda1) == ("bf16" if native else "fp32")
