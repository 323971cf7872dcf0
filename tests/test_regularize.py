"""AWD-LSTM regularisers and deep-RNN variants: locked/embedding dropout, weight-drop, AR/TAR,
residual and layer-normalised layers, variable-length BPTT (exact resume), averaged weights."""

import csv

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from deeprnn.averaging import WeightAverage
from deeprnn.checkpoint import load_checkpoint
from deeprnn.models import ModelConfig, build_model, concise_to_scratch, scratch_to_concise, state_dict_to_concise
from deeprnn.models.scratch import zoneout_masks
from deeprnn.regularize import VariableLengthLoader, activation_penalty, drop_connect, keep_mask, locked_dropout
from deeprnn.train import TrainConfig, train

V, H, B, T = 9, 6, 4, 7


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(impl="concise", cell="lstm", **kw):
    base = dict(vocab_size=V, cell=cell, num_layers=2, num_hiddens=H, impl=impl)
    base.update(kw)
    return build_model(ModelConfig(**base))


def _tokens(seed=0, b=B, t=T):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# -- dropout kinds -------------------------------------------------------------------------------


def test_locked_dropout_function_shares_one_mask_across_time():
    torch.manual_seed(0)
    y = locked_dropout(torch.ones(50, 8, 16), 0.5)
    assert torch.equal(y, y[:1].expand_as(y))  # the same mask at every step
    assert set(y.unique().tolist()) == {0.0, 2.0}  # kept entries scaled by 1/(1-p)
    assert torch.equal(locked_dropout(torch.ones(3, 2, 4), 0.5, training=False), torch.ones(3, 2, 4))


def test_keep_mask_values_rate_and_seed():
    """Entries are 0 or 1/(1-p); the kept fraction is 1-p within 5 standard deviations over 10^6 draws;
    the same seed draws the same mask; weight-drop multiplies a weight by such a mask."""
    p, n = 0.3, 1_000_000
    torch.manual_seed(12)
    m = keep_mask((1000, 1000), p)
    assert set(m.unique().tolist()) == {0.0, torch.tensor(1.0).div(1 - p).item()}
    kept = (m > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * ((p * (1 - p)) / n) ** 0.5
    torch.manual_seed(12)
    assert torch.equal(keep_mask((1000, 1000), p), m)
    assert keep_mask((3, 4), 0.5, dtype=torch.bfloat16).dtype == torch.bfloat16
    w = torch.randn(40, 30)
    torch.manual_seed(13)
    dropped = drop_connect(w, p, True)
    torch.manual_seed(13)
    assert torch.equal(dropped, w * keep_mask(w.shape, p))
    assert drop_connect(w, p, False) is w


@pytest.mark.parametrize("impl", ["concise", "scratch"])
def test_locked_output_dropout_on_a_forward_pass(impl):
    """The dropped top-layer outputs the output layer receives share one zero pattern over time."""
    torch.manual_seed(1)
    model = _model(impl, input="embedding", dropout=0.5, locked_dropout=True)
    seen = []
    model.output.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    _, _, top = model(_tokens(t=20), return_hidden=True)
    dropped = seen[0]  # (T, B, H)
    zero = dropped == 0
    assert zero.any() and not zero.all()
    assert torch.equal(zero, zero[:1].expand_as(zero))  # one mask per sequence, every step
    assert_close(dropped[~zero], 2 * top[~zero])


def test_embedding_dropout_drops_whole_tokens():
    torch.manual_seed(2)
    model = _model("concise", input="embedding", embed_dropout=0.5)
    X = _tokens(t=30)
    x = model._embed(X)  # (T, B, E)
    dropped = (x == 0).all(-1)  # (T, B)
    for v in X.unique():
        where = dropped[X.T == v]
        assert where.all() or not where.any(), int(v)  # a token is dropped everywhere or nowhere
    assert dropped.any() and not dropped.all()
    model.eval()
    assert torch.equal(model._embed(X), model.embedding(X.T))


@pytest.mark.parametrize("impl", ["concise", "scratch"])
def test_one_hot_input_dropout_scales_rows(impl):
    torch.manual_seed(3)
    model = _model(impl, input_dropout=0.5, locked_dropout=True)
    X = _tokens(t=25)
    x = model._embed(X)  # (T, B, V) one-hot times 0 or 2
    assert set(x.sum(-1).unique().tolist()) <= {0.0, 2.0}
    kept = x.sum(-1)  # (T, B): locked, so each (sequence, token) pair is kept or dropped throughout
    for b in range(B):
        for v in X[b].unique():
            k = kept[X[b] == v, b]
            assert (k == k[0]).all()


# -- weight-drop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["concise", "scratch"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_weight_drop_only_in_training(impl, layerwise):
    torch.manual_seed(4)
    model = _model(impl, weight_drop=0.5, residual=layerwise)
    plain = _model(impl, residual=layerwise)
    plain.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = _tokens()
    a, b = model(X)[0], model(X)[0]
    assert not torch.allclose(a, b)  # a new mask each forward in training
    a.sum().backward()
    rec = [p for n, p in model.named_parameters() if "W_hh" in n or "weight_hh" in n]
    assert rec and all(p.grad is not None and p.grad.abs().sum() > 0 for p in rec)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the parameters themselves are never masked
    model.eval()
    plain.eval()
    e1, e2 = model(X)[0], model(X)[0]
    assert torch.equal(e1, e2)  # evaluation is deterministic...
    assert torch.equal(e1, plain(X)[0])  # ...and uses the full recurrent weights


# -- AR / TAR --------------------------------------------------------------------------------------


def test_activation_penalty_equals_hand_computation():
    h = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    alpha, beta = 2.0, 1.5
    ar = sum(float(x) ** 2 for x in h.flatten()) / h.numel()
    tar = sum(float(h[t, b, j] - h[t - 1, b, j]) ** 2
              for t in range(1, 5) for b in range(3) for j in range(4)) / (4 * 3 * 4)
    assert float(activation_penalty(h, alpha, 0)) == pytest.approx(alpha * ar, rel=1e-12)
    assert float(activation_penalty(h, 0, beta)) == pytest.approx(beta * tar, rel=1e-12)
    assert float(activation_penalty(h, alpha, beta)) == pytest.approx(alpha * ar + beta * tar, rel=1e-12)
    assert float(activation_penalty(h[:1], 0, beta)) == 0.0  # one step: no temporal term


@pytest.mark.parametrize("impl", ["concise", "scratch"])
def test_return_hidden_is_the_top_layer_output(impl):
    model = _model(impl, num_layers=3).eval()
    logits, state, top = model(_tokens(), return_hidden=True)
    assert top.shape == (T, B, H)
    assert_close(model.output(top), logits)
    assert_close(top[-1], state[0][-1])  # LSTM: the last step's output is the top layer's final h


# -- residual and layer-norm variants --------------------------------------------------------------


def _run(model, X, state):
    model.zero_grad(set_to_none=True)
    logits, new_state = model(X, state)
    w = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(7))
    hs = new_state if isinstance(new_state, tuple) else (new_state,)
    ((logits * w).sum() + sum((s * s).sum() for s in hs)).backward()
    return logits, new_state, {n: p.grad.clone() for n, p in model.named_parameters()}


def _random_state(model, gen):
    s = model.begin_state(B)
    if isinstance(s, tuple):
        return tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in s)
    return torch.randn(s.shape, generator=gen, dtype=s.dtype)


@pytest.mark.parametrize("cell", ["rnn_tanh", "gru", "lstm"])
@pytest.mark.parametrize("inp", ["one_hot", "embedding"])
def test_residual_scratch_equals_concise(cell, inp):
    torch.manual_seed(8)
    scratch = _model("scratch", cell, num_layers=3, residual=True, input=inp).double()
    concise = scratch_to_concise(scratch)
    assert concise.layerwise
    gen = torch.Generator().manual_seed(9)
    X, state = _tokens(9), _random_state(scratch, gen)
    ls, ss, gs = _run(scratch, X, state)
    lc, sc, gc = _run(concise, X, state)
    assert_close(ls, lc)
    assert_close(ss, sc)
    mapped = state_dict_to_concise(gs, scratch.config)  # scratch gradients in the concise layout
    for k, g in gc.items():
        if k.startswith("rnn.bias_hh"):
            continue  # concise keeps two biases whose gradients both equal the scratch b_h's
        assert_close(g, mapped[k], msg=k)
    back = concise_to_scratch(concise)  # and back: the same weights
    for k, v in scratch.state_dict().items():
        assert_close(back.state_dict()[k], v)
    # residual changes the function: without it the outputs differ
    plain = _model("scratch", cell, num_layers=3, input=inp).double()
    plain.load_state_dict(scratch.state_dict())
    assert not torch.allclose(plain(X, state)[0], ls)


def _leaf_params(model):
    """Detached copies of the model's parameters that require grad, and ``layer_view(l)``: layer l's copies
    as attributes (``W_xh``, ``W_hh``, ``b_h``, ...), for references written out from the equations."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}

    def layer_view(l):
        return type("L", (), {k.split(".", 2)[2]: v for k, v in params.items() if k.startswith(f"layers.{l}.")})

    return params, layer_view


def _ln(x, gain, bias=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * gain
    return y if bias is None else y + bias


def _ln_lstm_reference(layer, x, h, c):
    """Ba et al. (2016) LN-LSTM written out from the equations, one step at a time."""
    Hh = h.shape[-1]
    outs = []
    for t in range(x.shape[0]):
        a = _ln(x[t] @ layer.W_xh, layer.gain_x) + _ln(h @ layer.W_hh, layer.gain_h) + layer.b_h
        i, f, g, o = a[:, :Hh], a[:, Hh:2 * Hh], a[:, 2 * Hh:3 * Hh], a[:, 3 * Hh:]
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(_ln(c, layer.gain_c, layer.bias_c))
        outs.append(h)
    return torch.stack(outs), h, c


def _ln_gru_reference(layer, x, h):
    Hh = h.shape[-1]
    outs = []
    for t in range(x.shape[0]):
        xa = _ln(x[t] @ layer.W_xh, layer.gain_x) + layer.b_h
        ha = _ln(h @ layer.W_hh, layer.gain_h)
        r = torch.sigmoid(xa[:, :Hh] + ha[:, :Hh])
        z = torch.sigmoid(xa[:, Hh:2 * Hh] + ha[:, Hh:2 * Hh])
        n = torch.tanh(xa[:, 2 * Hh:] + r * (ha[:, 2 * Hh:] + layer.b_hn))
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs), h


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_layer_norm_cells_equal_float64_reference(cell):
    torch.manual_seed(10)
    model = _model("scratch", cell, num_layers=2, layer_norm=True, input="embedding", embed_size=5).double()
    with torch.no_grad():  # move gains and biases off their initial values so they matter
        for n, p in model.named_parameters():
            if "gain" in n or "bias_c" in n or "b_h" in n:
                p.add_(0.3 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(11)
    X, state = _tokens(11), _random_state(model, gen)
    logits, new_state, grads = _run(model, X, state)

    params, layer_view = _leaf_params(model)
    x = F.embedding(X.T, params["embedding.weight"])
    hs, cs = [], []
    for l in range(2):
        lay = layer_view(l)
        if cell == "lstm":
            x, h, c = _ln_lstm_reference(lay, x, state[0][l], state[1][l])
            hs.append(h)
            cs.append(c)
        else:
            x, h = _ln_gru_reference(lay, x, state[l])
            hs.append(h)
    ref_logits = x @ params["output.weight"].T + params["output.bias"]
    ref_state = (torch.stack(hs), torch.stack(cs)) if cell == "lstm" else torch.stack(hs)
    assert_close(logits, ref_logits)
    assert_close(new_state, ref_state)
    w = torch.randn(ref_logits.shape, dtype=ref_logits.dtype, generator=torch.Generator().manual_seed(7))
    rs = ref_state if isinstance(ref_state, tuple) else (ref_state,)
    ((ref_logits * w).sum() + sum((s * s).sum() for s in rs)).backward()
    for n, p in params.items():
        assert_close(grads[n], p.grad, msg=n)


# -- zoneout ----------------------------------------------------------------------------------------


def test_zoneout_masks_values_rate_and_evaluation():
    """Training: 0/1 per unit and step, 1 (keep the previous value) with the rate; evaluation: the rate."""
    like = torch.zeros(1, dtype=torch.float64)
    torch.manual_seed(0)
    zc, zh = zoneout_masks((50, 100, 200), like, 0.3, 0.0, True)
    assert zc.dtype == zh.dtype == torch.float64 and zc.shape == (50, 100, 200)
    assert set(zc.unique().tolist()) == {0.0, 1.0}
    n = zc.numel()
    assert abs(zc.mean().item() - 0.3) < 5 * (0.3 * 0.7 / n) ** 0.5
    assert not zh.any()  # rate 0: every unit moves
    assert not torch.equal(zc[0], zc[1])  # a new draw at every step
    ec, eh = zoneout_masks((2, 3, 4), like, 0.3, 0.05, False)
    assert torch.equal(ec, torch.full((2, 3, 4), 0.3, dtype=torch.float64))
    assert torch.equal(eh, torch.full((2, 3, 4), 0.05, dtype=torch.float64))


def _zoneout_lstm_reference(layer, x, h, c, zc, zh):
    """Zoneout (Krueger et al. 2017, eqs. 5-6) written out: c = zc c_prev + (1 - zc) c̃,
    h = zh h_prev + (1 - zh) o tanh(c̃), with c̃ = f c_prev + i g."""
    Hh = h.shape[-1]
    outs = []
    for t in range(x.shape[0]):
        a = x[t] @ layer.W_xh + layer.b_h + h @ layer.W_hh
        i, f, g, o = a[:, :Hh].sigmoid(), a[:, Hh:2 * Hh].sigmoid(), a[:, 2 * Hh:3 * Hh].tanh(), a[:, 3 * Hh:].sigmoid()
        c_tilde = f * c + i * g
        h = zh[t] * h + (1 - zh[t]) * (o * c_tilde.tanh())
        c = zc[t] * c + (1 - zc[t]) * c_tilde
        outs.append(h)
    return torch.stack(outs), h, c


@pytest.mark.parametrize("training", [True, False])
def test_zoneout_lstm_equals_float64_reference(training):
    """A 2-layer residual scratch LSTM with zoneout against the equations: logits, final state and every
    parameter's gradient. Training draws the masks (replayed from the same seed), evaluation uses the rates."""
    torch.manual_seed(12)
    model = _model("scratch", num_layers=2, residual=True, input="embedding", embed_size=H,
                   zoneout_cell=0.4, zoneout_hidden=0.2).double().train(training)
    gen = torch.Generator().manual_seed(13)
    X, state = _tokens(13), _random_state(model, gen)
    torch.manual_seed(14)
    logits, new_state, grads = _run(model, X, state)
    torch.manual_seed(14)  # the same draws, in the model's order: layer by layer, zc then zh
    w = model.layers[0].W_hh
    masks = [zoneout_masks((T, B, H), w, 0.4, 0.2, training) for _ in range(2)]
    if training:
        assert set(masks[0][0].unique().tolist()) == {0.0, 1.0}

    params, layer_view = _leaf_params(model)
    x = F.embedding(X.T, params["embedding.weight"])
    hs, cs = [], []
    for l in range(2):
        y, h, c = _zoneout_lstm_reference(layer_view(l), x, state[0][l], state[1][l], *masks[l])
        x = y + x if l > 0 else y
        hs.append(h)
        cs.append(c)
    ref_logits = x @ params["output.weight"].T + params["output.bias"]
    ref_state = (torch.stack(hs), torch.stack(cs))
    assert_close(logits, ref_logits)
    assert_close(new_state, ref_state)
    wt = torch.randn(ref_logits.shape, dtype=ref_logits.dtype, generator=torch.Generator().manual_seed(7))
    ((ref_logits * wt).sum() + sum((s * s).sum() for s in ref_state)).backward()
    for n, p in params.items():
        assert_close(grads[n], p.grad, msg=n)


def test_zoneout_evaluation_is_deterministic_and_differs_from_plain():
    torch.manual_seed(15)
    model = _model("scratch", zoneout_cell=0.5, zoneout_hidden=0.05)
    plain = _model("scratch")
    plain.load_state_dict(model.state_dict())
    X = _tokens(15)
    assert not torch.equal(model(X)[0], model(X)[0])  # training: new masks each forward
    model.eval()
    plain.eval()
    e1, e2 = model(X)[0], model(X)[0]
    assert torch.equal(e1, e2)
    assert not torch.allclose(e1, plain(X)[0])  # the expected update, not the plain LSTM's


def test_zoneout_of_zero_is_the_plain_lstm_bit_for_bit():
    """Masks of zeros (a rate of 0 for c and h in evaluation) through the kernels equal no zoneout at all."""
    torch.manual_seed(16)
    layer = _model("scratch").layers[0]
    xproj = torch.randn(T, B, 4 * H)
    state = (torch.randn(B, H), torch.randn(B, H))
    zeros = zoneout_masks((T, B, H), layer.W_hh, 0.0, 0.0, False)
    a, (ha, ca) = layer(xproj, state)
    b, (hb, cb) = layer(xproj, state, zeros)
    assert torch.equal(a, b) and torch.equal(ha, hb) and torch.equal(ca, cb)
    ones = tuple(torch.ones_like(m) for m in zeros)  # every unit zoned out: the state never moves
    y, (h, c) = layer(xproj, state, ones)
    assert torch.equal(h, state[0]) and torch.equal(c, state[1]) and torch.equal(y, state[0].expand(T, B, H))


# -- variable-length BPTT, averaged weights, exact resume -------------------------------------------


def test_variable_length_windows_are_reproducible_and_cover_the_streams():
    tokens = torch.arange(5000) % 50
    loader = VariableLengthLoader(tokens, 4, 20, seed=1)
    offset, lengths = loader.window_lengths(0)
    assert sum(lengths) == (5000 - offset - 1) // 4
    assert len(set(lengths)) > 5 and min(lengths[:-1]) >= 5 and max(lengths) <= 60
    batches = list(loader)
    assert [x.shape[1] for x, _ in batches] == lengths
    assert torch.equal(torch.cat([x for x, _ in batches], 1)[:, :100], tokens[offset:][: 4 * ((5000 - offset - 1) // 4)].view(4, -1)[:, :100])
    again = VariableLengthLoader(tokens, 4, 20, seed=1)
    again.load_state_dict({"epoch": 0, "batch": 3})
    assert torch.equal(next(iter(again))[0], batches[3][0])
    assert loader.state_dict() == {"epoch": 1, "batch": 0}


def test_weight_average_is_an_ema_from_the_start_step():
    model = torch.nn.Linear(2, 1)
    avg = WeightAverage(model, decay=0.5, start=2)
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(float(step))
        avg.update(step)
    # starts at step 2 with the weights (2), then 0.5*2 + 0.5*3 = 2.5, then 0.5*2.5 + 0.5*4 = 3.25
    with avg.swapped(model):
        assert torch.all(model.weight == 3.25)
    assert torch.all(model.weight == 4.0)
    copy = WeightAverage(model, decay=0.5, start=2)
    copy.load_tensors(avg.tensors())
    assert torch.equal(copy.avg["weight"], avg.avg["weight"])


def _rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("extra", [{}, dict(impl="scratch", zoneout_cell=0.3, zoneout_hidden=0.1, partial_shuffle=True)],
                         ids=["concise", "scratch-zoneout-shuffled"])
def test_resume_is_exact_with_every_regulariser(tmp_path, extra):
    """N steps in one go == N/2, pause, resume, N/2: variable windows, EMA, AR/TAR, weight-drop, locked
    (and zoneout, whose masks come from the same generator as the others, with partially shuffled streams)."""
    kw = dict(**extra, corpus=["timemachine"], num_layers=2, num_hiddens=16, batch_size=8, num_steps=10,
              max_tokens=4000, val_fraction=0.02, test_fraction=0.02, num_epochs=3, lr=1e-2, eval_every=5,
              eval_batch_size=8, eval_num_steps=50, sample_every=0, num_preds=5, precision="fp32", seed=3,
              input="embedding", dropout=0.2, locked_dropout=True, embed_dropout=0.1, input_dropout=0.1,
              weight_drop=0.3, residual=True, ar_alpha=1.0, tar_beta=1.0, variable_bptt=True,
              ema_decay=0.9, ema_start=4)
    full = TrainConfig(**kw, run_dir=str(tmp_path / "a"))
    train(full, progress=False, log=lambda *_: None)
    part = TrainConfig(**kw, run_dir=str(tmp_path / "b"))
    s1 = train(part, progress=False, log=lambda *_: None, stop_after_steps=15)
    assert s1["stop_reason"] == "paused"
    train(part, resume=True, progress=False, log=lambda *_: None)
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(a) >= 6 and [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert (ra["train_loss"], ra["val_loss"], ra["lr"]) == (rb["train_loss"], rb["val_loss"], rb["lr"]), ra["step"]
    assert len({r["lr"] for r in a}) > 2  # the learning rate follows the window length
    for name in ("last", "best"):
        wa = load_checkpoint(tmp_path / "a" / name).model.state_dict()
        wb = load_checkpoint(tmp_path / "b" / name).model.state_dict()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    # best/ holds the averaged weights, last/ the raw ones
    last = load_checkpoint(tmp_path / "a" / "last")
    assert any(k.startswith("avg.") for k in last.train_tensors)
    avg_w = last.train_tensors["avg.output.weight"]
    assert not torch.equal(avg_w, last.model.state_dict()["output.weight"])
