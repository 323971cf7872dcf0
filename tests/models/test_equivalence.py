"""Scratch == concise (torch.nn) with converted weights: logits, final states and every gradient.

float64, dropout 0, a window of several steps from a non-zero random initial state, then a second
window from the state the first returned. The book-variant GRU, which has no torch.nn form, is checked
against a plain float64 transcription of the book's equations instead.
"""

import itertools
import types

import pytest
import torch
from torch.testing import assert_close

from deeprnn.models import (
    ConciseModel,
    ModelConfig,
    ScratchModel,
    concise_to_scratch,
    scratch_to_concise,
    state_dict_to_concise,
    state_dict_to_scratch,
)
from deeprnn.models.scratch import _GRUWindow, _LSTMWindow, _RNNWindow

V, H, B, T = 7, 5, 3, 6
CASES = list(itertools.product(["rnn_tanh", "rnn_relu", "gru", "lstm"], [1, 2, 3], ["one_hot", "embedding"]))


def _config(cell, L, inp, impl, **kw):
    return ModelConfig(vocab_size=V, cell=cell, num_layers=L, num_hiddens=H, impl=impl, input=inp,
                       embed_size=4 if inp == "embedding" else None, init="torch", **kw)


def _random_state(model, gen):
    state = model.begin_state(B)
    if isinstance(state, tuple):
        return tuple(torch.randn(s.shape, generator=gen, dtype=s.dtype) for s in state)
    return torch.randn(state.shape, generator=gen, dtype=state.dtype)


def _run(model, windows, state, weights):
    """Loss over several windows carried by the returned state; returns (outputs, grads by name)."""
    model.zero_grad(set_to_none=True)
    outputs, loss = [], 0.0
    for X, w in zip(windows, weights):
        logits, state = model(X, state)  # (T, B, V)
        outputs.append((logits, state))
        loss = loss + (logits * w).sum()
    hs = state if isinstance(state, tuple) else (state,)
    loss = loss + sum((s * s).sum() for s in hs)  # so the final state's gradient is non-trivial
    loss.backward()
    return outputs, {n: p.grad for n, p in model.named_parameters()}


def assert_equivalent(scratch, concise, seed=0):
    """Raise AssertionError unless the two models agree on logits, states and all gradients."""
    gen = torch.Generator().manual_seed(seed)
    windows = [torch.randint(0, V, (B, T), generator=gen) for _ in range(2)]
    weights = [torch.randn(T, B, V, generator=gen, dtype=torch.float64) for _ in range(2)]
    state = _random_state(concise, gen)
    out_s, g_s = _run(scratch, windows, state, weights)
    out_c, g_c = _run(concise, windows, state, weights)
    for (ls, ss), (lc, sc) in zip(out_s, out_c):
        assert_close(ls, lc)
        if isinstance(sc, tuple):
            assert isinstance(ss, tuple) and len(ss) == 2
            assert_close(ss[0], sc[0])  # h
            assert_close(ss[1], sc[1])  # c
        else:
            assert_close(ss, sc)
    # Gradients through the conversion concise -> scratch (b_h = b_ih + b_hh, so each torch bias
    # receives b_h's gradient; for GRU, b_hh's n-block is b_hn).
    cfg = scratch.config
    for name in ("output.weight", "output.bias", "embedding.weight"):
        if name in g_c:
            assert_close(g_s[name], g_c[name])
    for l in range(cfg.num_layers):
        p = f"layers.{l}."
        assert_close(g_s[p + "W_xh"].T, g_c[f"rnn.weight_ih_l{l}"])
        assert_close(g_s[p + "W_hh"].T, g_c[f"rnn.weight_hh_l{l}"])
        assert_close(g_s[p + "b_h"], g_c[f"rnn.bias_ih_l{l}"])
        if cfg.cell == "gru":
            assert_close(g_s[p + "b_h"][: 2 * H], g_c[f"rnn.bias_hh_l{l}"][: 2 * H])
            assert_close(g_s[p + "b_hn"], g_c[f"rnn.bias_hh_l{l}"][2 * H :])
        else:
            assert_close(g_s[p + "b_h"], g_c[f"rnn.bias_hh_l{l}"])
    assert set(g_s) == set(state_dict_to_scratch(dict(g_c), cfg))  # every parameter was compared


@pytest.mark.parametrize("cell,L,inp", CASES)
def test_concise_to_scratch_equal(cell, L, inp):
    torch.manual_seed(0)
    concise = ConciseModel(_config(cell, L, inp, "concise")).double()
    scratch = concise_to_scratch(concise)
    assert isinstance(scratch, ScratchModel) and scratch.output.weight.dtype == torch.float64
    assert_equivalent(scratch, concise)


@pytest.mark.parametrize("cell,L,inp", CASES)
def test_scratch_to_concise_equal(cell, L, inp):
    torch.manual_seed(1)
    scratch = ScratchModel(_config(cell, L, inp, "scratch")).double()
    concise = scratch_to_concise(scratch)
    assert isinstance(concise, ConciseModel)
    assert_equivalent(scratch, concise, seed=1)
    # and back: the round trip returns the same scratch weights
    back = concise_to_scratch(concise).state_dict()
    for name, value in scratch.state_dict().items():
        assert_close(back[name], value, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_state_dict_round_trip_concise(cell):
    cfg = _config(cell, 2, "one_hot", "concise")
    sd = ConciseModel(cfg).state_dict()
    again = state_dict_to_concise(state_dict_to_scratch(sd, cfg), cfg)
    # torch's two biases collapse to one sum, so compare the function-relevant combination
    for name, value in sd.items():
        if "bias" not in name:
            assert_close(again[name], value)
    for l in range(2):
        total = sd[f"rnn.bias_ih_l{l}"] + sd[f"rnn.bias_hh_l{l}"]
        assert_close(again[f"rnn.bias_ih_l{l}"] + again[f"rnn.bias_hh_l{l}"], total)


def _seed_slip_forward(self, xproj, h):
    """The seed note's exercise-1 slip: H2 = tanh(H1 W_xh2 + b_h2), no H_{t-1}^(2) W_hh^(2) term."""
    outputs = [torch.tanh(x) for x in xproj.unbind(0)]
    return torch.stack(outputs), outputs[-1]


@pytest.mark.parametrize("L", [2, 3])
def test_seed_slip_fails_the_equivalence_check(L):
    """Test of the test: an upper layer without its recurrent term must be caught."""
    torch.manual_seed(2)
    concise = ConciseModel(_config("rnn_tanh", L, "one_hot", "concise")).double()
    scratch = concise_to_scratch(concise)
    assert_equivalent(scratch, concise)  # the correct model passes
    for layer in scratch.layers[1:]:
        layer.forward = types.MethodType(_seed_slip_forward, layer)
    with pytest.raises(AssertionError):
        assert_equivalent(scratch, concise)


# -- the book's GRU (gru_variant="d2l"): reference written out from d2l section 9.1 ---------------
def _book_gru_reference(model, X, state):
    """float64 transcription of the book's GRU, stacked as in eq. (9.3.1), output as eq. (9.3.2)."""
    inputs = torch.nn.functional.one_hot(X.T, V).double() if model.embedding is None else model.embedding(X.T)
    finals = []
    for l, layer in enumerate(model.layers):
        W_xr, W_xz, W_xh = layer.W_xh[:, :H], layer.W_xh[:, H : 2 * H], layer.W_xh[:, 2 * H :]
        W_hr, W_hz, W_hh = layer.W_hh[:, :H], layer.W_hh[:, H : 2 * H], layer.W_hh[:, 2 * H :]
        b_r, b_z, b_h = layer.b_h[:H], layer.b_h[H : 2 * H], layer.b_h[2 * H :]
        Hs, outputs = state[l], []
        for Xt in inputs:
            Z = torch.sigmoid((Xt @ W_xz) + (Hs @ W_hz) + b_z)
            R = torch.sigmoid((Xt @ W_xr) + (Hs @ W_hr) + b_r)
            H_tilda = torch.tanh((Xt @ W_xh) + ((R * Hs) @ W_hh) + b_h)
            Hs = Z * Hs + (1 - Z) * H_tilda
            outputs.append(Hs)
        inputs = outputs
        finals.append(Hs)
    logits = torch.stack([Ht @ model.output.weight.T + model.output.bias for Ht in inputs])
    return logits, torch.stack(finals)


@pytest.mark.parametrize("L,inp", list(itertools.product([1, 2, 3], ["one_hot", "embedding"])))
def test_d2l_gru_matches_book_equations(L, inp):
    torch.manual_seed(3)
    model = ScratchModel(_config("gru", L, inp, "scratch", gru_variant="d2l")).double()
    gen = torch.Generator().manual_seed(3)
    X = torch.randint(0, V, (B, T), generator=gen)
    state = _random_state(model, gen)
    w = torch.randn(T, B, V, generator=gen, dtype=torch.float64)
    params = list(model.parameters())
    logits, final = model(X, state)
    ref_logits, ref_final = _book_gru_reference(model, X, state)
    assert_close(logits, ref_logits)
    assert_close(final, ref_final)
    grads = torch.autograd.grad((logits * w).sum() + (final * final).sum(), params)
    ref_grads = torch.autograd.grad((ref_logits * w).sum() + (ref_final * ref_final).sum(), params)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


def test_d2l_gru_differs_from_torch_gru():
    """The two GRU variants are different functions on the same weights (r before/after W_hn)."""
    torch.manual_seed(4)
    d2l = ScratchModel(_config("gru", 1, "one_hot", "scratch", gru_variant="d2l")).double()
    tor = ScratchModel(_config("gru", 1, "one_hot", "scratch")).double()
    tor.load_state_dict({**d2l.state_dict(), "layers.0.b_hn": torch.zeros(H, dtype=torch.float64)})
    X = torch.randint(0, V, (B, T))
    state = torch.randn(1, B, H, dtype=torch.float64)
    assert not torch.allclose(d2l(X, state)[0], tor(X, state)[0])


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_window_function_gradcheck(cell):
    """The hand-written backward sweeps of the scratch layers against finite differences."""
    gen = torch.Generator().manual_seed(5)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    if cell == "lstm":
        fn, args = _LSTMWindow.apply, (leaf(4, 2, 4 * 3), leaf(2, 3), leaf(2, 3), leaf(3, 4 * 3))
    elif cell == "gru":
        fn, args = _GRUWindow.apply, (leaf(4, 2, 3 * 3), leaf(2, 3), leaf(3, 3 * 3), leaf(3))
    else:
        relu = cell == "rnn_relu"  # finite differences are safe: no pre-activation lands near 0
        fn, args = (lambda x, h, W: _RNNWindow.apply(x, h, W, relu)), (leaf(4, 2, 3), leaf(2, 3), leaf(3, 3))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru", "lstm-zoneout"])
def test_fast_path_equals_autograd_reference(cell):
    torch.manual_seed(6)
    cell, zoneout = cell.removesuffix("-zoneout"), cell.endswith("-zoneout")
    layer = ScratchModel(_config(cell, 1, "one_hot", "scratch")).double().layers[0]
    G = {"rnn_tanh": 1, "rnn_relu": 1, "gru": 3, "lstm": 4}[cell]
    xproj = torch.randn(T, B, G * H, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=torch.float64)
    state = (h0, torch.randn(B, H, dtype=torch.float64)) if cell == "lstm" else h0
    kw = {}
    if zoneout:  # one drawn 0/1 mask and one at a rate, as in training and in evaluation
        kw["zoneout"] = ((torch.rand(T, B, H) < 0.5).double(), torch.full((T, B, H), 0.2, dtype=torch.float64))
    fast, ref = layer(xproj, state, **kw), layer.forward_reference(xproj, state, **kw)
    assert_close(fast[0], ref[0])
    for f, r in zip(fast[1] if cell == "lstm" else (fast[1],), ref[1] if cell == "lstm" else (ref[1],)):
        assert_close(f, r)
    params = [xproj, layer.W_hh] + ([layer.b_hn] if cell == "gru" else [])  # W_xh, b_h act via xproj

    def loss(out):
        final = out[1][1] if cell == "lstm" else out[1]
        return (out[0] * out[0]).sum() + final.sum()

    for a, b in zip(torch.autograd.grad(loss(fast), params), torch.autograd.grad(loss(ref), params)):
        assert_close(a, b)


# -- state conventions -------------------------------------------------------------------------
@pytest.mark.parametrize("cell,impl", list(itertools.product(["rnn_tanh", "gru", "lstm"], ["scratch", "concise"])))
def test_state_shapes_dtypes_devices_match_torch_nn(cell, impl):
    torch.manual_seed(7)
    model = (ScratchModel if impl == "scratch" else ConciseModel)(_config(cell, 2, "one_hot", impl))
    state = model.begin_state(B)
    states = state if cell == "lstm" else (state,)
    assert isinstance(state, tuple) == (cell == "lstm")
    for s in states:
        assert s.shape == (2, B, H) and s.dtype == torch.float32 and s.device.type == "cpu"
        assert not s.any()
    X = torch.randint(0, V, (B, T))
    logits, final = model(X)  # state=None means zeros
    assert logits.shape == (T, B, V)
    ref_rnn = {"rnn_tanh": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](V, H, 2)
    _, ref_final = ref_rnn(torch.zeros(T, B, V), state)
    finals, ref_finals = (final, ref_final) if cell == "lstm" else ((final,), (ref_final,))
    for f, r in zip(finals, ref_finals):
        assert f.shape == r.shape and f.dtype == r.dtype
    model.double()
    assert all(s.dtype == torch.float64 for s in (model.begin_state(2) if cell == "lstm" else (model.begin_state(2),)))
    meta = model.begin_state(2, device="meta", dtype=torch.float16)
    for s in meta if cell == "lstm" else (meta,):
        assert s.device.type == "meta" and s.dtype == torch.float16
