"""Exact resume, row by row: a paused and resumed run writes the uninterrupted run's ``metrics.csv``, every
column but the timings (step, epoch, tokens, lr, losses, perplexities, bits per character)."""

from __future__ import annotations

import pytest

from deeprnn.train import train

from test_train import rows, tiny

TIMINGS = ("elapsed_s", "tokens_per_s")


pytestmark = pytest.mark.usefixtures("one_thread")


def without_timings(run_dir) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows(run_dir)]


@pytest.mark.parametrize(
    "kw",
    [
        # a warm-up and a cosine: the lr column changes every step across the pause
        dict(sampling="sequential", schedule="cosine", warmup_steps=3, dropout=0.3, num_layers=2),
        # lr 1e-9 never improves the held-out loss: the plateau counters and scale carry across the pause
        # (decays after evaluations 3, 5 and 7; the pause at 4 falls between two)
        dict(sampling="random", schedule="plateau", lr=1e-9, lr_gamma=0.25),
    ],
    ids=["sequential-cosine-warmup", "random-plateau"],
)
def test_resumed_run_writes_the_uninterrupted_runs_metrics(tmp_path, kw):
    cfg = dict(num_epochs=2, max_tokens=1000, eval_every=2, **kw)  # 12 steps an epoch, 24 in all
    train(tiny(tmp_path / "a", **cfg), progress=False, log=lambda *_: None)

    part = tiny(tmp_path / "b", **cfg)
    paused = train(part, progress=False, log=lambda *_: None, stop_after_steps=8)
    assert paused["stop_reason"] == "paused" and paused["steps"] == 8
    train(part, resume=True, progress=False, log=lambda *_: None)

    a, b = without_timings(tmp_path / "a" / "run"), without_timings(tmp_path / "b" / "run")
    assert [r["step"] for r in a] == [str(s) for s in range(2, 25, 2)]
    assert a == b
    # tokens counts every step's batch_size x num_steps tokens, resumed steps included
    assert [int(r["tokens"]) for r in b] == [s * 8 * 10 for s in range(2, 25, 2)]
    assert len({r["lr"] for r in a}) >= 4
