"""NaN/Inf loss or gradients: detected from an on-device flag; --on-nan stop | rollback."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch

import deeprnn.train as train_mod
from deeprnn.checkpoint import load_checkpoint
from deeprnn.train import MAX_NAN_ROLLBACKS, NonFiniteLoss, nan_check_interval, train


@pytest.fixture
def poison(monkeypatch):
    """``poison(calls)``: the training loss of those 1-based training steps (calls) becomes NaN.

    The NaN flows through backward into the gradients and the weights, as a real blow-up does.
    Evaluation calls (``reduction="sum"``) are left alone.
    """
    real = train_mod.sequence_loss
    seen = {"n": 0}

    def install(calls):
        def fake(logits, Y, reduction="mean"):
            loss = real(logits, Y, reduction=reduction)
            if reduction == "mean":
                seen["n"] += 1
                if seen["n"] in calls:
                    loss = loss * float("nan")
            return loss

        monkeypatch.setattr(train_mod, "sequence_loss", fake)
        return seen

    return install


def rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_stop_raises_at_the_bad_step_and_keeps_the_good_checkpoint(tiny_cfg, poison, tmp_path):
    poison({5})
    cfg = tiny_cfg(max_steps=8, eval_every=3, schedule="constant")
    with pytest.raises(NonFiniteLoss) as err:
        train(cfg, progress=False, log=lambda *_: None)
    msg = str(err.value)
    assert msg.startswith("loss or gradients became non-finite at step 5; lower --lr or --clip")
    assert f"deeprnn train --resume {tmp_path / 'run'} --on-nan rollback" in msg and "\n" not in msg
    ck = load_checkpoint(tmp_path / "run", prefer="last")
    assert ck.meta["position"]["step"] == 3 and all_finite(ck.model)  # NaN weights were never saved


def test_stop_from_the_command_line_is_one_line(small_corpus, tmp_path, cli_error, flags):
    # A learning rate of 1e30 without clipping blows a ReLU RNN up for real (no monkeypatching).
    line = cli_error(["train", "--corpus", str(small_corpus), "--run-dir", str(tmp_path / "r"),
                      *flags(cell="rnn_relu", optimizer="sgd", lr=1e30, clip=0, max_steps=6,
                                   schedule="constant")])
    assert line.startswith("deeprnn: error: loss or gradients became non-finite at step ")
    assert line.endswith("lower --lr or --clip, or use --on-nan rollback")


def test_rollback_restores_halves_lr_continues_and_says_so(tiny_cfg, poison, tmp_path):
    poison({5})
    logs: list[str] = []
    cfg = tiny_cfg(max_steps=10, eval_every=3, schedule="constant", lr=0.01, on_nan="rollback")
    summary = train(cfg, progress=False, log=logs.append)
    assert summary["steps"] == 10 and summary["stop_reason"] == "max_steps"
    said = [m for m in logs if "rolled back" in m]
    assert said == [f"loss or gradients became non-finite at step 5: rolled back to step 3 "
                    f"({tmp_path / 'run' / 'last'}), learning rate halved to 0.5 x schedule "
                    f"(rollback 1 of {MAX_NAN_ROLLBACKS})"]
    r = rows(tmp_path / "run")
    assert [int(x["step"]) for x in r] == [3, 6, 9, 10]
    assert [float(x["lr"]) for x in r] == [0.01, 0.005, 0.005, 0.005]
    assert all(math.isfinite(float(x["train_loss"])) for x in r)
    ck = load_checkpoint(tmp_path / "run", prefer="last")
    assert all_finite(ck.model)
    assert ck.meta["lr_scale"] == 0.5 and ck.meta["nan_rollbacks"] == 0  # a good evaluation since
    # The halved rate survives a resume.
    train(dataclasses.replace(cfg, max_steps=12), resume=True, progress=False, log=lambda *_: None)
    assert [float(x["lr"]) for x in rows(tmp_path / "run")][-1] == 0.005


def test_rollback_to_step_zero_before_the_first_evaluation(tiny_cfg, poison):
    poison({2})
    logs: list[str] = []
    summary = train(tiny_cfg(max_steps=4, eval_every=4, on_nan="rollback"), progress=False, log=logs.append)
    assert summary["steps"] == 4
    assert any("at step 2: rolled back to step 0" in m for m in logs)


def test_rollback_gives_up_after_a_few_in_a_row(tiny_cfg, poison, tmp_path):
    poison(set(range(4, 1000)))  # every step from the 4th on: lowering the lr cannot help
    logs: list[str] = []
    with pytest.raises(NonFiniteLoss) as err:
        train(tiny_cfg(max_steps=30, eval_every=3, on_nan="rollback"), progress=False, log=logs.append)
    assert sum("rolled back to step 3" in m for m in logs) == MAX_NAN_ROLLBACKS
    assert str(err.value) == (f"loss or gradients became non-finite at step 4 after {MAX_NAN_ROLLBACKS} "
                              f"rollbacks in a row; lower --lr or --clip and resume {tmp_path / 'run'}")
    assert all_finite(load_checkpoint(tmp_path / "run", prefer="last").model)


def test_flag_read_only_at_intervals_still_catches_it_at_evaluation(tiny_cfg, poison, monkeypatch):
    """On a GPU the flag is read every NAN_CHECK_EVERY steps, not per step: an evaluation still finds
    a NaN from any step since the last check, and rolls back before anything is saved."""
    assert nan_check_interval(torch.device("cuda")) == train_mod.NAN_CHECK_EVERY > 1
    assert nan_check_interval(torch.device("cpu"), world_size=2) == train_mod.NAN_CHECK_EVERY
    monkeypatch.setattr(train_mod, "nan_check_interval", lambda device, world_size=1: 10**9)
    poison({4})
    logs: list[str] = []
    summary = train(tiny_cfg(max_steps=9, eval_every=3, on_nan="rollback"), progress=False, log=logs.append)
    assert summary["steps"] == 9
    assert any(m.startswith("loss became nan at step 6: rolled back to step 3") for m in logs), logs


def test_huge_but_finite_losses_do_not_crash_the_summary(tiny_cfg):
    """An lr that makes losses huge but finite: perplexities overflow to inf instead of crashing. lr 1e8 gives
    losses of ~1e7 nats; 1e22 and above reached NaN by step 2 on an AVX2-only CPU (but not on an AVX-512 one)."""
    summary = train(tiny_cfg(optimizer="sgd", lr=1e8, clip=0, max_steps=2, schedule="constant"),
                    progress=False, log=lambda *_: None)
    assert summary["steps"] == 2 and summary["test_ppl"] == math.inf and summary["test_loss"] > 710


def _strict_json(text: str):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""
    import json

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_overflowing_perplexity_is_inf_everywhere(flags, small_corpus, tmp_path, capsys):
    """Losses past exp's range (~709.8 nats): printed and in metrics.csv as inf (they were capped at exp(50) =
    5.18e21), null in the JSON files and in --json output (which had bare Infinity), never a crash."""
    from deeprnn.cli import main

    assert train_mod.perplexity(60.0) == pytest.approx(math.exp(60.0))  # no cap below the overflow
    assert train_mod.perplexity(710.0) == math.inf
    run = tmp_path / "run"
    argv = ["train", "--corpus", str(small_corpus), "--run-dir", str(run),
            *flags(optimizer="sgd", lr=1e8, clip=0, schedule="constant", max_steps=2)]  # losses ~1e7 nats
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out test perplexity inf (" in out and "best validation perplexity inf (" in out
    with open(run / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["train_loss"]) > 710 and float(row["val_loss"]) > 710
    assert row["train_ppl"] == "inf" and row["val_ppl"] == "inf"
    summary = _strict_json((run / "summary.json").read_text())
    assert summary["test_ppl"] is None and summary["best_val_ppl"] is None and summary["last"]["val_ppl"] is None
    assert summary["test_loss"] > 710
    assert main(["info", str(run), "--json"]) == 0
    info = _strict_json(capsys.readouterr().out)
    assert info["metrics"]["val_ppl"] is None and info["metrics"]["val_loss"] > 710
    assert main(["evaluate", str(run), "--split", "valid", "--json"]) == 0
    result = _strict_json(capsys.readouterr().out)
    assert result["perplexity"] is None and result["loss_nats"] > 710


def test_unrepresentable_lr_is_a_config_error(cli_error, flags, small_corpus, tmp_path):
    line = cli_error(["train", "--corpus", str(small_corpus), "--run-dir", str(tmp_path / "r"),
                      *flags(lr=1e300)])
    assert line == "deeprnn: error: lr must be <= 3e38 (what float32 weights can take), got 1e+300"
