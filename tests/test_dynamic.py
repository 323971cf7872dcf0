"""Dynamic evaluation: scores each window before adapting to it, equals static scoring at lr 0,
matches a hand-written two-window reference, and leaves the caller's model as it was."""

import copy
import json
import re

import pytest
import torch
from torch.testing import assert_close

from deeprnn.cli import main
from deeprnn.dynamic import dynamic_evaluate_tokens, gradient_mean_square
from deeprnn.errors import ConfigError
from deeprnn.models import ModelConfig, build_model
from deeprnn.train import evaluate_tokens, sequence_loss

from test_cli import TINY, one_error_line


def model64(impl="concise", cell="lstm", V=7, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, cell=cell, num_layers=2, num_hiddens=8, impl=impl, input="embedding",
                      embed_size=5, dropout=0.3)
    return build_model(cfg).double()


def tokens(n=61, V=7, seed=1):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl,cell", [("concise", "lstm"), ("scratch", "lstm"), ("scratch", "gru"),
                                       ("concise", "rnn_tanh")])
@pytest.mark.parametrize("B,T", [(1, 7), (3, 5)])
def test_lr_zero_is_static_evaluation(impl, cell, B, T):
    m, x = model64(impl, cell), tokens()
    static = evaluate_tokens(m, x, batch_size=B, num_steps=T)
    dyn = dynamic_evaluate_tokens(m, x, lr=0.0, batch_size=B, num_steps=T)
    assert dyn[1] == static[1] == B * ((x.numel() - 1) // B)
    assert dyn[0] == pytest.approx(static[0], rel=1e-13)


@pytest.mark.parametrize("impl", ["concise", "scratch"])
def test_matches_hand_written_sgd_with_decay(impl):
    """Window 1 scored with θ0; θ1 = θ0 − lr·∇mean-loss₁ + d(θ0 − (θ0 − lr·∇)); window 2 scored with θ1,
    from window 1's final state; window 3 with θ2."""
    m, x = model64(impl), tokens(22)
    lr, d, T = 0.7, 0.25, 7
    ref = copy.deepcopy(m).eval()
    params = list(ref.parameters())
    theta0 = [p.detach().clone() for p in params]
    total, state = 0.0, None
    for s in range(0, 21, T):
        X, Y = x[s : s + T].view(1, -1), x[s + 1 : s + T + 1].view(1, -1)
        logits, state = ref(X, state)
        loss = sequence_loss(logits, Y, reduction="sum")
        total += loss.item()
        grads = torch.autograd.grad(loss / Y.numel(), params)
        state = tuple(t.detach() for t in state)
        with torch.no_grad():
            for p, g, p0 in zip(params, grads, theta0):
                p.copy_(p - lr * g + d * (p0 - (p - lr * g)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got, n = dynamic_evaluate_tokens(m, x, lr=lr, decay=d, batch_size=1, num_steps=T)
    assert n == 21
    assert got == pytest.approx(total, rel=1e-12)
    static = evaluate_tokens(m, x, batch_size=1, num_steps=T)[0]
    assert abs(got - static) > 1e-3  # the steps did change the later windows' scores
    for k, v in m.state_dict().items():  # the caller's model is back to θ0, and in train mode again
        assert torch.equal(v, before[k]), k
    assert m.training


def test_rms_rule_matches_hand_written_reference():
    """θ ← θ − lr·g/(√MS+ε) + d·(θ0 − θ)·min(√MS/mean√MS, 1/d), MS from windows of the training text."""
    m, x, train = model64("scratch"), tokens(22), tokens(64, seed=5)
    lr, d, T, eps = 0.05, 0.3, 7, 1e-5
    ref = copy.deepcopy(m).eval()
    params = list(ref.parameters())
    # the statistics by hand: windows of 7 starting at 0, 19, 37, 56 (spread evenly over 63 predictions)
    ms, state = [torch.zeros_like(p) for p in params], None
    for s in (0, 19, 37, 56):
        logits, state = ref(train[s : s + T].view(1, -1), state)
        grads = torch.autograd.grad(sequence_loss(logits, train[s + 1 : s + T + 1].view(1, -1)), params)
        state = tuple(t.detach() for t in state)
        for a, g in zip(ms, grads):
            a += g * g / 4
    got_ms = gradient_mean_square(m, train, num_steps=T, max_windows=4)
    for a, b in zip(got_ms, ms):
        assert_close(a, b, rtol=1e-12, atol=1e-300)
    rms = [a.sqrt() for a in ms]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean()
    theta0 = [p.detach().clone() for p in params]
    total, state = 0.0, None
    for s in range(0, 21, T):
        logits, state = ref(x[s : s + T].view(1, -1), state)
        loss = sequence_loss(logits, x[s + 1 : s + T + 1].view(1, -1), reduction="sum")
        total += loss.item()
        grads = torch.autograd.grad(loss / T, params)
        state = tuple(t.detach() for t in state)
        with torch.no_grad():
            for p, g, p0, r in zip(params, grads, theta0, rms):
                q = p - lr * g / (r + eps)
                p.copy_(q + (p0 - q) * torch.clamp(r / mean_rms, max=1 / d) * d)
    got, n = dynamic_evaluate_tokens(m, x, lr=lr, decay=d, mean_square=got_ms, num_steps=T)
    assert n == 21 and got == pytest.approx(total, rel=1e-12)
    assert abs(got - evaluate_tokens(m, x, batch_size=1, num_steps=T)[0]) > 1e-3
    with pytest.raises(ConfigError, match="^mean_square must hold one tensor per trainable parameter, shaped like it$"):
        dynamic_evaluate_tokens(m, x, lr=lr, mean_square=got_ms[:-1])


def test_each_window_is_scored_before_the_step_on_it():
    """Changing the text after window k leaves the score of windows 1..k unchanged."""
    m, x = model64(), tokens(36)
    y = x.clone()
    y[22:] = (y[22:] + 1) % 7  # the targets of window 4 onwards (windows of 7: 0..6, 7..13, 14..20, 21..27)
    a = dynamic_evaluate_tokens(m, x[:22], lr=1.0, num_steps=7)
    b = dynamic_evaluate_tokens(m, y[:22], lr=1.0, num_steps=7)
    assert a == b
    full_x = dynamic_evaluate_tokens(m, x, lr=1.0, num_steps=7)
    full_y = dynamic_evaluate_tokens(m, y, lr=1.0, num_steps=7)
    assert full_x[0] != pytest.approx(full_y[0], rel=1e-6)


def test_full_decay_is_static_and_adaptation_helps_on_repeated_text():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=7, cell="lstm", num_layers=1, num_hiddens=16, impl="concise", input="embedding",
                      embed_size=8)
    m = build_model(cfg).double()
    text = torch.tensor([0, 3, 1, 4, 2, 5, 6] * 30)  # a fixed cycle: what came before predicts what follows
    static = evaluate_tokens(m, text, batch_size=1, num_steps=10)[0]
    assert dynamic_evaluate_tokens(m, text, lr=2.0, decay=1.0, num_steps=10)[0] == pytest.approx(static, rel=1e-13)
    assert dynamic_evaluate_tokens(m, text, lr=2.0, num_steps=10)[0] < 0.6 * static  # measured: 0.49


def test_bad_settings_are_config_errors():
    m, x = model64(), tokens()
    with pytest.raises(ConfigError, match=r"^dynamic evaluation learning rate must be >= 0, got -1.0$"):
        dynamic_evaluate_tokens(m, x, lr=-1.0)
    with pytest.raises(ConfigError, match=r"^dynamic evaluation decay must be in \[0, 1\], got 1.5$"):
        dynamic_evaluate_tokens(m, x, lr=0.1, decay=1.5)
    for lr in (float("inf"), 1e39):  # 1e39 used to fail converting to float32; inf scored nan
        with pytest.raises(ConfigError, match=r"^dynamic evaluation learning rate must be <= 3e38 \(what float32 "
                                              rf"weights can take\), got {re.escape(str(lr))}$"):
            dynamic_evaluate_tokens(m, x, lr=lr)


@pytest.fixture
def trained(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    capsys.readouterr()
    return run


def test_cli_dynamic_evaluation(trained, capsys):
    assert main(["evaluate", str(trained), "--split", "valid", "--dynamic-lr", "0", "--json"]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert (zero["evaluation"], zero["dynamic_rule"], zero["batch_size"], zero["num_steps"]) == ("dynamic", "rms", 1, 20)
    assert main(["evaluate", str(trained), "--split", "valid", "--batch-size", "1", "--num-steps", "20",
                 "--json"]) == 0
    static = json.loads(capsys.readouterr().out)
    assert static["evaluation"] == "static" and static["tokens"] == zero["tokens"]
    assert zero["loss_nats"] == pytest.approx(static["loss_nats"], rel=1e-6)

    assert main(["evaluate", str(trained), "--split", "valid", "--dynamic-lr", "0.5", "--dynamic-rule", "sgd",
                 "--dynamic-decay", "0.1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("valid (dynamic evaluation, sgd lr 0.5, decay 0.1): perplexity ")

    assert main(["evaluate", str(trained), "--split", "valid", "--dynamic-decay", "0.1", "--dynamic-rule", "sgd"]) == 0
    out, err = capsys.readouterr()
    assert err == ("deeprnn: warning: --dynamic-rule and --dynamic-decay apply only with --dynamic-lr; they are "
                   "ignored\n")
    assert out.startswith("valid: perplexity ")

    # A finite but enormous step size: the score is nan (reported as is, null in JSON), and a warning says why.
    assert main(["evaluate", str(trained), "--split", "valid", "--dynamic-lr", "1e30", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ("deeprnn: warning: dynamic evaluation diverged at --dynamic-lr 1e+30 (the updated weights gave a "
                   "non-finite loss); use a smaller --dynamic-lr\n")
    assert json.loads(out)["loss_nats"] is None

    line = one_error_line(capsys, 2, ["evaluate", str(trained), "--dynamic-lr", "-1"])
    assert line == "deeprnn: error: dynamic evaluation learning rate must be >= 0, got -1.0"
    line = one_error_line(capsys, 2, ["evaluate", str(trained), "--split", "valid", "--dynamic-lr", "1e-4",
                                      "--num-steps", "1000000"])
    assert line == ("deeprnn: error: the RMS rule's gradient statistics need at least 1000001 training tokens, "
                    "got 2000; pass a smaller --num-steps or --dynamic-rule sgd")
    line = one_error_line(capsys, 2, ["evaluate", str(trained), "--num-steps", "-3"])
    assert line == "deeprnn: error: --num-steps must be >= 1, got -3"


def test_rms_rule_says_why_it_needs_the_runs_training_text(tmp_path, capsys):
    """The rms rule reads the run's own training text, even with --corpus: once that file had moved the line was
    a bare "no such file: …", about a file the command never named."""
    book = tmp_path / "book.txt"
    book.write_text("the time traveller for so it will be convenient to speak of him " * 40)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--corpus", str(book), "--max-tokens", "2000", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    other = tmp_path / "other.txt"
    book.rename(other)
    line = one_error_line(capsys, 2, ["evaluate", str(run), "--corpus", str(other), "--dynamic-lr", "1e-3"])
    assert line == (f"deeprnn: error: --dynamic-rule rms reads the run's training text for its gradient statistics: "
                    f"no such file: {str(book)!r}; check the path; restore it, or use --dynamic-rule sgd")
    assert main(["evaluate", str(run), "--corpus", str(other), "--dynamic-lr", "1e-3", "--dynamic-rule", "sgd"]) == 0
