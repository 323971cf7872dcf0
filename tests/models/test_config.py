"""ModelConfig validation (exact messages, field name first), build_model, init schemes, helpers."""

import dataclasses
import json

import pytest
import torch

from deeprnn.errors import ConfigError
from deeprnn.models import ConciseModel, ModelConfig, ScratchModel, build_model, detach_state

BASE = dict(vocab_size=7, cell="lstm", num_layers=2, num_hiddens=5)

BAD = [
    (dict(num_layers=0), "num_layers must be >= 1, got 0"),
    (dict(num_layers=2.0), "num_layers must be an integer >= 1, got 2.0"),
    (dict(num_hiddens=0), "num_hiddens must be >= 1, got 0"),
    (dict(num_hiddens=2**20 + 1), "num_hiddens must be <= 1,048,576, got 1,048,577"),
    (dict(num_hiddens=10**20), "num_hiddens must be <= 1,048,576, got 100,000,000,000,000,000,000"),
    (dict(num_layers=1025), "num_layers must be <= 1,024, got 1,025"),
    (dict(input="embedding", embed_size=2**20 + 1), "embed_size must be <= 1,048,576, got 1,048,577"),
    (dict(forget_bias=float("nan")), "forget_bias must be a finite number, got nan"),
    (dict(forget_bias=float("-inf")), "forget_bias must be a finite number, got -inf"),
    (dict(vocab_size=0), "vocab_size must be >= 1, got 0"),
    (dict(dropout=1.0), "dropout must be in [0, 1), got 1.0"),
    (dict(dropout=-0.1), "dropout must be in [0, 1), got -0.1"),
    (dict(dropout="0.5"), "dropout must be a number in [0, 1), got '0.5'"),
    (dict(cell="transformer"), "cell must be one of rnn_tanh, rnn_relu, gru, lstm; got 'transformer'"),
    (dict(impl="jit"), "impl must be one of concise, scratch; got 'jit'"),
    (dict(input="bytes"), "input must be one of one_hot, embedding; got 'bytes'"),
    (dict(init="xavier"), "init must be one of d2l, torch, orthogonal; got 'xavier'"),
    (dict(cell="gru", gru_variant="keras"), "gru_variant must be one of torch, d2l; got 'keras'"),
    (dict(tie_weights=True), "tie_weights needs input='embedding' (a one-hot input has no weight to share)"),
    (
        dict(tie_weights=True, input="embedding", embed_size=4),
        "tie_weights needs embed_size == num_hiddens, got embed_size=4 and num_hiddens=5; set embed_size=5",
    ),
    (dict(input="embedding", embed_size=0), "embed_size must be >= 1, got 0"),
    (
        dict(embed_size=4),
        "embed_size is only used with input='embedding' (input is 'one_hot'); "
        "leave it None or set input='embedding'",
    ),
    (
        dict(cell="gru", gru_variant="d2l", impl="concise"),
        "gru_variant='d2l' has no torch.nn form; use impl='scratch' or gru_variant='torch'",
    ),
    (dict(gru_variant="d2l", impl="scratch"), "gru_variant='d2l' only applies to cell='gru' (cell is 'lstm')"),
    (dict(cell="gru", forget_bias=1.0), "forget_bias only applies to cell='lstm' (cell is 'gru'); set it to 0"),
    (dict(layer_norm=True), "layer_norm has no torch.nn form; use impl='scratch' or layer_norm=False"),
    (dict(layer_norm=True, cell="rnn_tanh", impl="scratch"),
     "layer_norm applies to cell='lstm' or 'gru' (cell is 'rnn_tanh')"),
    (dict(weight_drop=1.0), "weight_drop must be in [0, 1), got 1.0"),
    (dict(embed_dropout=-0.1), "embed_dropout must be in [0, 1), got -0.1"),
    (dict(input_dropout="0.1"), "input_dropout must be a number in [0, 1), got '0.1'"),
    (dict(output_dropout=1.5), "output_dropout must be in [0, 1), got 1.5"),
    (dict(zoneout_cell=1.0, impl="scratch"), "zoneout_cell must be in [0, 1), got 1.0"),
    (dict(zoneout_hidden=-0.1, impl="scratch"), "zoneout_hidden must be in [0, 1), got -0.1"),
    (dict(zoneout_cell=0.5), "zoneout_cell and zoneout_hidden have no torch.nn form; use impl='scratch' or set "
                             "both to 0"),
    (dict(zoneout_hidden=0.1, cell="gru", impl="scratch"),
     "zoneout_cell and zoneout_hidden apply to cell='lstm' (cell is 'gru'); set both to 0"),
    (dict(zoneout_cell=0.5, impl="scratch", layer_norm=True),
     "zoneout_cell and zoneout_hidden do not combine with layer_norm; set both to 0 or layer_norm=False"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m.split()[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_config_names_the_field(changes, message):
    cfg = ModelConfig(**{**BASE, **changes})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)
    field = message.split()[0].split("=")[0]
    assert field in {f.name for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(ConfigError):
        build_model(cfg)


@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_good_configs_build_and_round_trip_json(cell, impl):
    cfg = ModelConfig(vocab_size=7, cell=cell, num_layers=2, num_hiddens=5, impl=impl, dropout=0.2)
    assert cfg.validate() is cfg
    model = build_model(cfg)
    assert isinstance(model, ScratchModel if impl == "scratch" else ConciseModel)
    assert model.config is cfg
    again = ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg


def test_defaults_follow_the_contract():
    cfg = ModelConfig(vocab_size=28, cell="lstm")
    assert (cfg.num_layers, cfg.num_hiddens, cfg.impl, cfg.input, cfg.embed_size) == (2, 256, "concise", "one_hot", None)
    assert (cfg.dropout, cfg.tie_weights, cfg.forget_bias, cfg.gru_variant) == (0.0, False, 0.0, "torch")
    assert (cfg.residual, cfg.layer_norm) == (False, False)
    assert (cfg.zoneout_cell, cfg.zoneout_hidden) == (0.0, 0.0)
    assert ModelConfig(vocab_size=28, cell="lstm", input="embedding").input_size == 256


def test_num_params():
    V, H, L, G = 7, 5, 2, 4
    concise = build_model(ModelConfig(**BASE))
    assert concise.num_params() == sum(p.numel() for p in concise.parameters())
    rnn = L * (2 * G * H * H + 2 * G * H) + G * H * (V - H)  # torch: W_ih, W_hh, b_ih, b_hh per layer
    assert concise.num_params() == rnn + H * V + V
    scratch = build_model(ModelConfig(**BASE, impl="scratch"))
    assert scratch.num_params() == concise.num_params() - L * G * H  # one bias per layer, like the book


def test_tied_weights_share_one_tensor():
    cfg = ModelConfig(**{**BASE, "input": "embedding", "tie_weights": True}, impl="scratch")
    model = build_model(cfg)
    assert model.output.weight is model.embedding.weight
    untied = build_model(dataclasses.replace(cfg, tie_weights=False))
    assert model.num_params() == untied.num_params() - 7 * 5


def test_detach_state():
    h = torch.ones(2, 3, 4, requires_grad=True) * 2
    assert not detach_state(h).requires_grad and torch.equal(detach_state(h), h)
    hc = detach_state((h, h + 1))
    assert isinstance(hc, tuple) and len(hc) == 2 and not any(s.requires_grad for s in hc)


# -- init schemes: the same law in both implementations ---------------------------------------
def _rnn_tensors(model):
    """(input weights, recurrent weights, summed biases) per layer, in scratch layout."""
    out = []
    for l in range(model.config.num_layers):
        if isinstance(model, ScratchModel):
            layer = model.layers[l]
            out.append((layer.W_xh, layer.W_hh, layer.b_h))
        else:
            r = model.rnn
            out.append((
                getattr(r, f"weight_ih_l{l}").T, getattr(r, f"weight_hh_l{l}").T,
                getattr(r, f"bias_ih_l{l}") + getattr(r, f"bias_hh_l{l}"),
            ))
    return out


BIG = dict(vocab_size=30, cell="lstm", num_layers=2, num_hiddens=64)


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_init_d2l(impl):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**BIG, impl=impl, init="d2l", forget_bias=1.0))
    H = 64
    for W_xh, W_hh, b in _rnn_tensors(model):
        for w in (W_xh, W_hh):
            assert abs(w.std().item() - 0.01) < 1e-3 and abs(w.mean().item()) < 1e-3
        expected = torch.zeros(4 * H)
        expected[H : 2 * H] = 1.0  # forget_bias
        assert torch.equal(b.detach(), expected)
    assert abs(model.output.weight.std().item() - 0.01) < 2e-3 and not model.output.bias.any()


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_init_torch(impl):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**BIG, impl=impl, init="torch"))
    k = 1 / 64**0.5
    for W_xh, W_hh, b in _rnn_tensors(model):
        for w in (W_xh, W_hh):
            assert w.abs().max() <= k and abs(w.var().item() - k * k / 3) < 0.1 * k * k / 3
        # the sum of torch's two uniform biases: triangular on [-2k, 2k], variance 2k²/3
        assert b.abs().max() <= 2 * k and abs(b.var().item() - 2 * k * k / 3) < 0.25 * 2 * k * k / 3


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_init_orthogonal(impl):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**BIG, impl=impl, init="orthogonal"))
    H = 64
    for W_xh, W_hh, b in _rnn_tensors(model):
        for g in range(4):
            block = W_hh[:, g * H : (g + 1) * H].detach()
            torch.testing.assert_close(block.T @ block, torch.eye(H), atol=1e-5, rtol=0)
        bound = (6 / (30 + 64)) ** 0.5  # xavier_uniform on a (30, 64) block of layer 0
        if W_xh.shape[0] == 30:
            assert W_xh.abs().max() <= bound
        assert not b.any()


def test_reset_parameters_is_seeded():
    cfg = ModelConfig(**BASE, impl="scratch")
    torch.manual_seed(5)
    a = build_model(cfg).state_dict()
    torch.manual_seed(5)
    b = build_model(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_forward_refuses_a_state_that_begin_state_would_not_give(impl):
    """A wrong state is one line naming the shapes; the scratch model used to take some silently."""
    lstm = build_model(ModelConfig(**BASE, impl=impl))
    gru = build_model(ModelConfig(**{**BASE, "cell": "gru"}, impl=impl))
    X = torch.zeros(3, 4, dtype=torch.long)
    h, c = lstm.begin_state(3)
    want_lstm = ("state must be (h, c), each of shape (2, 3, 5) (num_layers, batch, num_hiddens) for X of batch 3, "
                 "as begin_state(3) gives; got ")
    want_gru = ("state must be a tensor of shape (2, 3, 5) (num_layers, batch, num_hiddens) for X of batch 3, "
                "as begin_state(3) gives; got ")
    for model, state, got in [
        (lstm, lstm.begin_state(4), "a tuple of 2: shape (2, 4, 5), shape (2, 4, 5)"),
        (lstm, (h[:1], c[:1]), "a tuple of 2: shape (1, 3, 5), shape (1, 3, 5)"),
        (lstm, h, "a tensor of shape (2, 3, 5)"),  # scratch ran this as if h were (h, c)
        (lstm, h[0], "a tensor of shape (3, 5)"),
        (lstm, (h, c, h), "a tuple of 3: shape (2, 3, 5), shape (2, 3, 5), shape (2, 3, 5)"),
        (lstm, (h, None), "a tuple of 2: shape (2, 3, 5), NoneType"),
        (gru, gru.begin_state(4), "a tensor of shape (2, 4, 5)"),
        (gru, h[0], "a tensor of shape (3, 5)"),  # scratch broadcast this over the layers
        (gru, (h, c), "a tuple of 2: shape (2, 3, 5), shape (2, 3, 5)"),
        (gru, [h], "a list of 1: shape (2, 3, 5)"),
    ]:
        with pytest.raises(ConfigError) as err:
            model(X, state)
        assert str(err.value) == (want_lstm if model is lstm else want_gru) + got
    logits, (h2, c2) = lstm(X, [h, c])  # a list of two is accepted like the tuple
    assert logits.shape == (4, 3, 7) and h2.shape == c2.shape == (2, 3, 5)


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_forward_refuses_tokens_that_are_not_a_batch_of_indices(impl):
    model = build_model(ModelConfig(**BASE, impl=impl))
    want = "X must be a (batch, num_steps) tensor of integer token indices, got "
    for X, got in [
        (torch.zeros(4, dtype=torch.long), "a tensor of shape (4,) and dtype torch.int64"),
        (torch.zeros(2, 4, 1, dtype=torch.long), "a tensor of shape (2, 4, 1) and dtype torch.int64"),
        (torch.zeros(2, 4), "a tensor of shape (2, 4) and dtype torch.float32"),
        (torch.zeros(2, 4, dtype=torch.bool), "a tensor of shape (2, 4) and dtype torch.bool"),
        ([[0, 1]], "list"),
    ]:
        with pytest.raises(ConfigError) as err:
            model(X)
        assert str(err.value) == want + got
    for bad in (7, -1):
        X = torch.zeros(2, 4, dtype=torch.long)
        X[1, 2] = bad
        with pytest.raises(ConfigError) as err:
            model(X)
        assert str(err.value) == f"X holds token index {bad}, outside this model's vocabulary of 7 (indices 0..6)"
    logits, _ = model(torch.full((2, 4), 6, dtype=torch.int32))  # other integer dtypes are taken as int64
    assert logits.shape == (4, 2, 7)


@pytest.mark.parametrize("impl", ["scratch", "concise"])
def test_forward_refuses_a_state_of_another_dtype_and_an_empty_window(impl):
    """A float64 or integer state was cast silently by the scratch model and an oneDNN error in the concise one;
    an empty window was a reshape error in one and a result in the other."""
    model = build_model(ModelConfig(**BASE, impl=impl))
    X = torch.zeros(3, 4, dtype=torch.long)
    for state, got in [(model.begin_state(3, dtype=torch.float64), "torch.float64"),
                       (tuple(s.long() for s in model.begin_state(3)), "torch.int64")]:
        with pytest.raises(ConfigError) as err:
            model(X, state)
        assert str(err.value) == (f"state must be torch.float32 on cpu, like the model's parameters; got {got} on cpu: "
                                  "use begin_state(3) or move it with .to()")
    gru = build_model(ModelConfig(**{**BASE, "cell": "gru"}, impl=impl))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a carried state may come out in the autocast dtype
        carried = gru(X, gru.begin_state(3).bfloat16())[1]
        gru(X, carried)
    with pytest.raises(ConfigError) as err:  # outside autocast the layers would fail on it
        gru(X, gru.begin_state(3).bfloat16())
    assert str(err.value).startswith("state must be torch.float32 on cpu, like the model's parameters; got "
                                     "torch.bfloat16 on cpu")
    for shape in [(3, 0), (0, 4)]:
        with pytest.raises(ConfigError) as err:
            model(torch.zeros(shape, dtype=torch.long))
        assert str(err.value) == f"X must hold at least one row and one step, got shape {shape}"
    for bad in (-1, "3", True, 2.0):
        with pytest.raises(ConfigError) as err:
            model.begin_state(bad)
        assert str(err.value) == f"batch_size must be an integer >= 0, got {bad!r}"
    assert model.begin_state(torch.tensor(2))[0].shape == (2, 2, 5)  # an integer tensor is an integer
    for dtype in (torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32):  # taken as int64
        assert torch.equal(model(X.to(dtype))[0], model(X)[0])


def test_conversion_of_a_model_that_is_already_converted_is_one_line():
    from deeprnn.models import concise_to_scratch, scratch_to_concise

    scratch = build_model(ModelConfig(**BASE, impl="scratch"))
    concise = scratch_to_concise(scratch)
    with pytest.raises(ConfigError) as err:  # was KeyError 'layers.0.b_h'
        scratch_to_concise(concise)
    assert str(err.value) == ("scratch_to_concise takes a ScratchModel, got a model with impl='concise'; it is "
                              "already what you asked for")
    with pytest.raises(ConfigError) as err:
        concise_to_scratch(torch.nn.Linear(2, 2))
    assert str(err.value) == "concise_to_scratch takes a ConciseModel, got Linear"


@pytest.mark.parametrize("options,message", [
    (dict(cell="lstm", layer_norm=True),
     "layer_norm has no torch.nn form, so it cannot be converted; keep the model impl='scratch'"),
    (dict(cell="lstm", zoneout_cell=0.5, zoneout_hidden=0.3),
     "zoneout_cell and zoneout_hidden have no torch.nn form, so the model cannot be converted; keep it "
     "impl='scratch'"),
    (dict(cell="gru", gru_variant="d2l"),
     "gru_variant='d2l' has no torch.nn form, so it cannot be converted; use gru_variant='torch'"),
])
def test_a_model_without_a_torch_nn_form_is_not_converted(options, message):
    """state_dict_to_concise dropped a layer-norm model's gains and biases, and a zoneout model's expected
    update, without a word: the weights it returned loaded into a plain nn.LSTM that computed another function
    (logits 0.64 apart). Both directions, and the model-level converter, refuse them."""
    from deeprnn.models import scratch_to_concise, state_dict_to_concise, state_dict_to_scratch

    scratch = build_model(ModelConfig(**{**BASE, **options}, impl="scratch"))
    for convert in (state_dict_to_concise, state_dict_to_scratch):
        with pytest.raises(ConfigError) as err:
            convert(scratch.state_dict(), scratch.config)
        assert str(err.value) == message
    with pytest.raises(ConfigError) as err:
        scratch_to_concise(scratch)
    assert str(err.value) == message
