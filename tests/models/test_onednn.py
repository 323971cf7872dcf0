"""The float32 products through oneDNN (``deeprnn.models.onednn``) equal torch's, values and gradients,
and are taken exactly where they should be: float32 CPU tensors outside autocast, never float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deeprnn.models import ModelConfig, build_model, onednn

pytestmark = pytest.mark.skipif(not onednn.enabled(), reason="this torch build has no oneDNN matmul")


@pytest.fixture
def calls(monkeypatch):
    """Counts the oneDNN calls (and still makes them); the size gate is off, so small test shapes count."""
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    count = {"n": 0}
    real = onednn._LINEAR

    def counting(*args):
        count["n"] += 1
        return real(*args)

    monkeypatch.setattr(onednn, "_LINEAR", counting)
    return count


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_mm_equals_torch_for_views(calls, transpose_a, transpose_b):
    a = _rand(70, 33, seed=1).t() if transpose_a else _rand(33, 70, seed=1)
    b = _rand(50, 70, seed=2).t() if transpose_b else _rand(70, 50, seed=2)
    out = onednn.mm(a, b)
    assert calls["n"] == 1
    assert out.shape == (33, 50)
    assert_close(out, (a.double() @ b.double()).float(), atol=1e-4, rtol=1e-5)


# (ours, torch's, argument shapes in call order, upstream gradient's shape): addmm's (K, N) weight, and
# linear's (N, K) weight on a 3-D input, the output layer's case.
PRODUCTS = [
    pytest.param(onednn.addmm, torch.addmm, [(48,), (1120, 64), (64, 48)], (1120, 48), id="addmm"),
    pytest.param(onednn.linear, F.linear, [(35, 32, 64), (28, 64), (28,)], (35, 32, 28), id="linear"),
]


@pytest.mark.parametrize("ours, theirs, shapes, dy_shape", PRODUCTS)
def test_product_forward_and_gradients_equal_torch(calls, ours, theirs, shapes, dy_shape):
    args = [_rand(*shape, seed=i).requires_grad_() for i, shape in enumerate(shapes)]
    dy = _rand(*dy_shape, seed=9)
    out = ours(*args)
    out.backward(dy)
    assert calls["n"] == 3 and out.shape == dy_shape  # forward, and both gradient products
    ref = [t.detach().double().requires_grad_() for t in args]
    ref_out = theirs(*ref)
    ref_out.backward(dy.double())
    assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-5)
    for got, want in zip(args, ref):
        assert_close(got.grad.double(), want.grad, atol=1e-3, rtol=1e-5)


def test_float64_autocast_and_disabled_take_torch_exactly(calls):
    bias, x, W = _rand(8, dtype=torch.float64), _rand(5, 4, dtype=torch.float64), _rand(4, 8, dtype=torch.float64)
    assert torch.equal(onednn.addmm(bias, x, W), torch.addmm(bias, x, W))
    assert torch.equal(onednn.mm(x, W), x @ W)
    assert torch.equal(onednn.linear(x, W.t(), bias), F.linear(x, W.t(), bias))
    xf, Wf = x.float(), W.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(onednn.mm(xf, Wf), xf @ Wf)  # bf16, as autocast's own mm
    previous = onednn.set_enabled(False)
    try:
        assert not onednn.enabled()
        assert torch.equal(onednn.mm(xf, Wf), xf @ Wf)
    finally:
        onednn.set_enabled(previous)
    assert calls["n"] == 0


def test_small_products_and_odd_biases_stay_with_torch(monkeypatch):
    """Below MIN_MACS a product is torch's; so is one with a bias oneDNN would misread (strided, 0-d,
    2-D), which torch.addmm broadcasts. oneDNN stays on for the next caller."""
    count = {"n": 0}
    real = onednn._LINEAR
    monkeypatch.setattr(onednn, "_LINEAR", lambda *a: count.__setitem__("n", count["n"] + 1) or real(*a))
    x, W = _rand(64, 128, seed=1), _rand(128, 128, seed=2)  # exactly MIN_MACS = 2^20 multiply-adds
    small = _rand(63, 128, seed=3)
    assert torch.equal(onednn.mm(small, W), small @ W) and count["n"] == 0
    for bias in (_rand(256, seed=4)[::2], torch.tensor(1.5), _rand(1, 128, seed=5), _rand(64, 128, seed=6)):
        assert torch.equal(onednn.addmm(bias, x, W), torch.addmm(bias, x, W))
    assert count["n"] == 0
    onednn.addmm(_rand(128, seed=7), x, W)
    assert count["n"] == 1 and onednn.enabled()


def test_a_failing_op_warns_once_and_falls_back(monkeypatch):
    def broken(*args):
        raise RuntimeError("no primitive")

    monkeypatch.setattr(onednn, "_LINEAR", broken)
    monkeypatch.setattr(onednn, "MIN_MACS", 0)
    monkeypatch.setitem(onednn._state, "on", True)
    a, b = _rand(3, 4), _rand(4, 5)
    with pytest.warns(RuntimeWarning, match=r"oneDNN float32 products failed \(no primitive\); using torch.mm"):
        assert torch.equal(onednn.mm(a, b), a @ b)
    assert not onednn.enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(onednn.mm(a, b), a @ b)  # off now: no second warning


def test_environment_turns_it_off(monkeypatch):
    import importlib

    monkeypatch.setenv("DEEPRNN_ONEDNN", "0")
    try:
        assert not importlib.reload(onednn).enabled()
    finally:
        monkeypatch.delenv("DEEPRNN_ONEDNN")
        importlib.reload(onednn)
    assert onednn.enabled()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_scratch_training_step_equals_the_torch_products(calls, cell):
    """A 2-layer scratch model (embedding input, so layer 1 projects through a product too): loss and
    every parameter's gradient with the oneDNN products equal those with torch's, in float32."""
    cfg = ModelConfig(vocab_size=11, cell=cell, num_layers=2, num_hiddens=24, impl="scratch", input="embedding",
                      embed_size=16)
    X = torch.randint(0, 11, (6, 9), generator=torch.Generator().manual_seed(3))
    Y = torch.randint(0, 11, (6, 9), generator=torch.Generator().manual_seed(4))

    def step(on):
        torch.manual_seed(0)
        model = build_model(cfg)
        previous = onednn.set_enabled(on)
        try:
            logits, _ = model(X)
            loss = F.cross_entropy(logits.reshape(-1, 11), Y.T.reshape(-1))
            loss.backward()
        finally:
            onednn.set_enabled(previous)
        return loss, {n: p.grad for n, p in model.named_parameters()}

    loss_torch, grads_torch = step(False)
    assert calls["n"] == 0
    loss_dnn, grads_dnn = step(True)
    assert calls["n"] == 2 * 3 + 2 + 3  # per layer: projection, d_x, d_W_xh; each d_W_hh; the output layer
    assert_close(loss_dnn, loss_torch, atol=1e-6, rtol=1e-6)
    assert grads_dnn.keys() == grads_torch.keys()
    for name in grads_torch:
        assert_close(grads_dnn[name], grads_torch[name], atol=2e-6, rtol=1e-4, msg=name)
