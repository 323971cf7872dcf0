"""A 2-step, 2-layer tanh RNN on tiny matrices, worked out by hand from eq. (9.3.1)/(9.3.2).

    H_t^(l) = tanh(H_t^(l-1) W_xh^(l) + H_{t-1}^(l) W_hh^(l) + b_h^(l)),   H_t^(0) = one_hot(x_t)
    O_t     = H_t^(2) W_hq + b_q

vocab 3, h = 2, batch 1, tokens [0, 2], non-zero initial state. The arithmetic is spelled out below;
the literals next to it are its values to 12 decimals (same expressions evaluated with math.tanh).
"""

from math import tanh

import torch
from torch.testing import assert_close

from deeprnn.models import ModelConfig, ScratchModel, scratch_to_concise

W_xh1 = [[0.5, -0.3], [0.2, 0.1], [-0.4, 0.6]]  # (3, 2): rows are one-hot inputs
W_hh1 = [[0.1, 0.2], [-0.3, 0.4]]
b_h1 = [0.05, -0.1]
W_xh2 = [[0.3, -0.2], [0.7, 0.5]]
W_hh2 = [[-0.5, 0.25], [0.2, 0.1]]
b_h2 = [0.0, 0.2]
W_hq = [[1.0, -1.0, 0.5], [0.5, 2.0, -1.5]]  # (2, 3)
b_q = [0.1, 0.0, -0.1]
H0_1, H0_2 = [0.2, -0.1], [-0.3, 0.4]

# t = 1, x = one_hot(0) = [1, 0, 0]: x W_xh1 is row 0 of W_xh1.
H1_1 = [tanh(0.5 + (0.2 * 0.1 + -0.1 * -0.3) + 0.05), tanh(-0.3 + (0.2 * 0.2 + -0.1 * 0.4) - 0.1)]
H1_2 = [
    tanh(H1_1[0] * 0.3 + H1_1[1] * 0.7 + (-0.3 * -0.5 + 0.4 * 0.2) + 0.0),
    tanh(H1_1[0] * -0.2 + H1_1[1] * 0.5 + (-0.3 * 0.25 + 0.4 * 0.1) + 0.2),
]
O_1 = [
    H1_2[0] * 1.0 + H1_2[1] * 0.5 + 0.1,
    H1_2[0] * -1.0 + H1_2[1] * 2.0 + 0.0,
    H1_2[0] * 0.5 + H1_2[1] * -1.5 - 0.1,
]
# t = 2, x = one_hot(2) = [0, 0, 1]: row 2 of W_xh1; each layer also reads its own state at t = 1.
H2_1 = [
    tanh(-0.4 + (H1_1[0] * 0.1 + H1_1[1] * -0.3) + 0.05),
    tanh(0.6 + (H1_1[0] * 0.2 + H1_1[1] * 0.4) - 0.1),
]
H2_2 = [
    tanh(H2_1[0] * 0.3 + H2_1[1] * 0.7 + (H1_2[0] * -0.5 + H1_2[1] * 0.2) + 0.0),
    tanh(H2_1[0] * -0.2 + H2_1[1] * 0.5 + (H1_2[0] * 0.25 + H1_2[1] * 0.1) + 0.2),
]
O_2 = [
    H2_2[0] * 1.0 + H2_2[1] * 0.5 + 0.1,
    H2_2[0] * -1.0 + H2_2[1] * 2.0 + 0.0,
    H2_2[0] * 0.5 + H2_2[1] * -1.5 - 0.1,
]

LITERALS = {
    "H1_1": [0.537049566998, -0.379948962255],
    "H1_2": [0.124501266740, -0.131616404667],
    "O_1": [0.158693064407, -0.387734076073, 0.159675240370],
    "H2_1": [-0.180317030934, 0.426352495007],
    "H2_2": [0.154529764685, 0.435936890828],
    "O_2": [0.472498210099, 0.717344016970, -0.676640453899],
}


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _model():
    cfg = ModelConfig(vocab_size=3, cell="rnn_tanh", num_layers=2, num_hiddens=2, impl="scratch")
    model = ScratchModel(cfg).double()
    model.load_state_dict({
        "layers.0.W_xh": _t(W_xh1), "layers.0.W_hh": _t(W_hh1), "layers.0.b_h": _t(b_h1),
        "layers.1.W_xh": _t(W_xh2), "layers.1.W_hh": _t(W_hh2), "layers.1.b_h": _t(b_h2),
        "output.weight": _t(W_hq).T, "output.bias": _t(b_q),  # nn.Linear stores W_hq^T
    })
    return model


X = torch.tensor([[0, 2]])  # (B=1, T=2)
STATE = _t([[H0_1], [H0_2]])  # (L=2, B=1, h=2)


def test_scratch_one_step_at_a_time_matches_each_steps_arithmetic():
    """Fed one token per call, the scratch model gives the spelled-out arithmetic at t = 1 (logits and both
    layers' states) and at t = 2 from its own t = 1 state; the literals are that arithmetic's values."""
    values = {"H1_1": H1_1, "H1_2": H1_2, "O_1": O_1, "H2_1": H2_1, "H2_2": H2_2, "O_2": O_2}
    for name, value in values.items():
        assert_close(_t(value), _t(LITERALS[name]), rtol=0, atol=1e-12)
    model = _model()
    o1, s1 = model(X[:, :1], STATE)  # (1, 1, 3), (2, 1, 2)
    o2, s2 = model(X[:, 1:], s1)
    assert_close(o1[0, 0], _t(O_1), rtol=0, atol=1e-12)
    assert_close(s1[:, 0], _t([H1_1, H1_2]), rtol=0, atol=1e-12)
    assert_close(o2[0, 0], _t(O_2), rtol=0, atol=1e-12)
    assert_close(s2[:, 0], _t([H2_1, H2_2]), rtol=0, atol=1e-12)


def test_scratch_matches_hand_computation():
    logits, state = _model()(X, STATE)
    assert logits.shape == (2, 1, 3)  # (T, B, V)
    assert_close(logits[:, 0], _t([LITERALS["O_1"], LITERALS["O_2"]]), rtol=0, atol=1e-11)
    assert_close(state[:, 0], _t([LITERALS["H2_1"], LITERALS["H2_2"]]), rtol=0, atol=1e-11)


def test_concise_matches_hand_computation():
    logits, state = scratch_to_concise(_model())(X, STATE)
    assert_close(logits[:, 0], _t([LITERALS["O_1"], LITERALS["O_2"]]), rtol=0, atol=1e-11)
    assert_close(state[:, 0], _t([LITERALS["H2_1"], LITERALS["H2_2"]]), rtol=0, atol=1e-11)


def test_dropping_the_upper_recurrent_term_is_caught_by_the_hand_computation():
    """The seed's slip (layer 2 without H_{t-1}^(2) W_hh^(2)) is the scratch model with W_hh^(2) = 0: its
    layer-2 state at t = 2 is then tanh(H_2^(1) W_xh^(2) + b_h^(2)), worked out here, and misses the literals
    by far more than test_scratch_matches_hand_computation's tolerance."""
    slip = [tanh(H2_1[0] * 0.3 + H2_1[1] * 0.7 + 0.0), tanh(H2_1[0] * -0.2 + H2_1[1] * 0.5 + 0.2)]
    model = _model()
    with torch.no_grad():
        model.layers[1].W_hh.zero_()
        logits, state = model(X, STATE)
    assert_close(state[0, 0], _t(LITERALS["H2_1"]), rtol=0, atol=1e-11)  # layer 1 is untouched
    assert_close(state[1, 0], _t(slip), rtol=0, atol=1e-12)
    assert float((state[1, 0] - _t(LITERALS["H2_2"])).abs().max()) > 1e-2
    assert float((logits[:, 0] - _t([LITERALS["O_1"], LITERALS["O_2"]])).abs().max()) > 1e-2
