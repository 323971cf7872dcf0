"""Exact resume, row by row: a paused and resumed run writes the uninterrupted run's ``metrics.csv``, every
column but the timings (step, epoch, tokens, lr, losses, perplexities, bits per character)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from deeprnn.checkpoint import load_checkpoint
from deeprnn.train import train

from test_train import rows, tiny

TIMINGS = ("elapsed_s", "tokens_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")


def without_timings(run_dir) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows(run_dir)]


def same_weights(a, b) -> bool:
    wa, wb = load_checkpoint(a).model.state_dict(), load_checkpoint(b).model.state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("pause", [8, 7], ids=["at-an-evaluation", "between-evaluations"])
@pytest.mark.parametrize(
    "kw",
    [
        # a warm-up and a cosine: the lr column changes every step across the pause
        dict(sampling="sequential", schedule="cosine", warmup_steps=3, dropout=0.3, num_layers=2),
        # lr 1e-9 never improves the held-out loss: the plateau counters and scale carry across the pause
        # (decays after evaluations 3, 5 and 7; the pause at step 8 is evaluation 4, at step 7 between two)
        dict(sampling="random", schedule="plateau", lr=1e-9, lr_gamma=0.25),
    ],
    ids=["sequential-cosine-warmup", "random-plateau"],
)
def test_resumed_run_writes_the_uninterrupted_runs_metrics(tmp_path, kw, pause):
    """A pause between two evaluations is not an evaluation: it used to evaluate, which added a row, split the
    next row's training loss, and counted towards the plateau schedule, early stopping and best/."""
    cfg = dict(num_epochs=2, max_tokens=1000, eval_every=2, **kw)  # 12 steps an epoch, 24 in all
    straight = train(tiny(tmp_path / "a", **cfg), progress=False, log=lambda *_: None)

    part = tiny(tmp_path / "b", **cfg)
    paused = train(part, progress=False, log=lambda *_: None, stop_after_steps=pause)
    assert paused["stop_reason"] == "paused" and paused["steps"] == pause
    resumed = train(part, resume=True, progress=False, log=lambda *_: None)

    a, b = without_timings(tmp_path / "a" / "run"), without_timings(tmp_path / "b" / "run")
    assert [r["step"] for r in a] == [str(s) for s in range(2, 25, 2)]
    assert a == b
    # tokens counts every step's batch_size x num_steps tokens, resumed steps included
    assert [int(r["tokens"]) for r in b] == [s * 8 * 10 for s in range(2, 25, 2)]
    assert len({r["lr"] for r in a}) >= 4
    for name in ("best", "last"):
        assert same_weights(tmp_path / "a" / "run" / name, tmp_path / "b" / "run" / name), name
    assert (resumed["best_val_ppl"], resumed["test_ppl"]) == (straight["best_val_ppl"], straight["test_ppl"])


def test_a_pause_on_the_runs_last_batch_finishes_it():
    """stop_after_steps on the last batch of the last epoch skipped that epoch's evaluation (and with it best/
    and the final row), and the run could not be resumed: its epochs were spent. It finishes instead, as a
    signal there does."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        cfg = tiny(Path(d), num_epochs=1, max_tokens=1000, eval_every=0, schedule="constant")  # 12 steps
        summary = train(cfg, progress=False, log=lambda *_: None, stop_after_steps=12)
        assert (summary["stop_reason"], summary["steps"]) == ("epochs", 12)
        assert summary["best_val_ppl"] is not None and [r["step"] for r in rows(Path(d) / "run")] == ["12"]


@pytest.mark.parametrize("how", ["max_steps", "pause"])
def test_a_run_stopped_at_an_epochs_end_is_not_evaluated_twice(tmp_path, how):
    """Evaluated once an epoch, stopped on the epoch's last batch, resumed: the resumed run evaluated that step
    again on an empty interval (a row with train perplexity 1.000 and tokens/s nan), counted it as an
    evaluation without improvement and, with --patience 1, stopped at once, having trained nothing."""
    cfg = dict(num_epochs=3, max_tokens=1000, eval_every=0, schedule="constant", patience=1)  # 12 steps an epoch
    straight = train(tiny(tmp_path / "a", **cfg), progress=False, log=lambda *_: None)
    assert straight["steps"] == 36

    part = tiny(tmp_path / "b", **cfg)
    if how == "max_steps":  # the run's end, evaluated there as once an epoch
        assert train(dataclasses.replace(part, max_steps=12), progress=False, log=lambda *_: None)["steps"] == 12
    else:  # a stop between evaluations: last/ holds the epoch's training loss, unscored
        assert train(part, progress=False, log=lambda *_: None, stop_after_steps=12)["steps"] == 12
    lines = []
    resumed = train(part, resume=True, progress=False, log=lines.append)
    assert [r["step"] for r in rows(tmp_path / "b" / "run")] == ["12", "24", "36"]
    assert without_timings(tmp_path / "a" / "run") == without_timings(tmp_path / "b" / "run")
    assert resumed["steps"] == 36 and resumed["stop_reason"] == straight["stop_reason"] == "epochs"
    assert lines[0] == f"resuming {part.run_dir} at step 12 (epoch 1)"  # it said epoch 0
