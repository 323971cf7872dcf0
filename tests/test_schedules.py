"""Learning-rate schedules: ``lr_at`` (cosine with warm-up) at exact steps, and the ``lr`` column of
``metrics.csv`` for the ``step`` and ``plateau`` schedules, which the training loop applies itself."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from deeprnn.errors import ConfigError
from deeprnn.train import TrainConfig, lr_at, train

from test_train import rows, tiny


pytestmark = pytest.mark.usefixtures("one_thread")


def cosine(**kw) -> TrainConfig:
    # lr and min_lr_ratio in powers of two: the schedule's values are exact in binary
    return TrainConfig(**{"lr": 0.5, "schedule": "cosine", "min_lr_ratio": 0.25, "warmup_steps": 0, **kw})


def test_cosine_runs_from_lr_to_its_floor():
    """lr at step 0, lr (1 + r) / 2 halfway, lr r at the end and after it (r = min_lr_ratio)."""
    cfg = cosine()
    assert lr_at(cfg, 0, 100, None) == 0.5
    assert lr_at(cfg, 50, 100, None) == 0.5 * (1 + 0.25) / 2 == 0.3125
    assert lr_at(cfg, 100, 100, None) == 0.5 * 0.25
    assert lr_at(cfg, 250, 100, None) == 0.5 * 0.25
    assert lr_at(cfg, 25, 100, None) == pytest.approx(0.125 + 0.375 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-15)
    values = [lr_at(cfg, s, 100, None) for s in range(101)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly falling in between


def test_constant_schedule_warms_up_then_holds():
    """The constant schedule takes the same linear warm-up, then stays at lr: the same values as a cosine
    whose floor is lr itself (min_lr_ratio 1); without warm-up it is lr from the first step."""
    cfg = TrainConfig(lr=0.5, schedule="constant", warmup_steps=4)
    values = [lr_at(cfg, s, 12, None) for s in range(14)]
    assert values == [0.5 / 4, 0.5 * 2 / 4, 0.5 * 3 / 4] + [0.5] * 11
    assert values == [lr_at(cosine(warmup_steps=4, min_lr_ratio=1.0), s, 12, None) for s in range(14)]
    assert lr_at(TrainConfig(lr=0.5, schedule="constant"), 0, 12, None) == 0.5


def test_wsd_holds_then_decays_linearly_to_the_floor():
    """wsd: the warm-up, lr until the last decay_fraction of the run, then a straight line down to lr r
    (r = min_lr_ratio) at the end and after it; by steps or by the time budget's elapsed fraction."""
    cfg = TrainConfig(lr=0.5, schedule="wsd", warmup_steps=4, min_lr_ratio=0.25, decay_fraction=0.5)
    # 4 warm-up steps, then 8: lr up to halfway (step 8), then down by (0.5 - 0.125) / 4 a step to the floor.
    values = [lr_at(cfg, s, 12, None) for s in range(14)]
    assert values == [0.125, 0.25, 0.375] + [0.5] * 6 + [0.5 - 0.375 / 4, 0.5 - 0.375 / 2, 0.5 - 0.375 * 3 / 4,
                                                         0.125, 0.125]
    assert lr_at(cfg, 5, 12, 0.75) == 0.5 - 0.375 / 2  # time budget: 75% elapsed
    assert lr_at(cfg, 5, 12, 0.4) == 0.5
    assert lr_at(cfg, 5, None, None) == 0.5  # no length: lr
    with pytest.raises(ConfigError, match=r"^decay_fraction must be in \(0, 1\], got 0$"):
        TrainConfig(schedule="wsd", decay_fraction=0).validate()


def test_cosine_floor_defaults_to_min_lr_ratio():
    cfg = TrainConfig(lr=4e-3, schedule="cosine")
    assert cfg.min_lr_ratio == 0.05
    assert lr_at(cfg, 0, 10, None) == 4e-3
    assert lr_at(cfg, 10, 10, None) == pytest.approx(4e-3 * 0.05, rel=1e-15)


def test_warmup_climbs_linearly_then_the_cosine_starts():
    """Step s < warmup_steps runs at lr (s + 1) / warmup_steps; the cosine then spans the steps left."""
    cfg = cosine(warmup_steps=4)
    assert [lr_at(cfg, s, 12, None) for s in range(4)] == [0.5 / 4, 0.5 * 2 / 4, 0.5 * 3 / 4, 0.5]
    assert lr_at(cfg, 4, 12, None) == 0.5  # the cosine's first step
    assert lr_at(cfg, 8, 12, None) == 0.3125  # halfway through the 8 steps after warm-up
    assert lr_at(cfg, 12, 12, None) == 0.125


def test_time_budget_fraction_drives_the_cosine():
    """With a time budget the elapsed fraction of it replaces the step count; without a length, lr."""
    cfg = cosine()
    assert lr_at(cfg, 3, 100, 0.5) == 0.3125
    assert lr_at(cfg, 90, 100, 0.0) == 0.5
    assert lr_at(cfg, 3, 100, 1.5) == 0.125
    assert lr_at(cfg, 7, None, None) == 0.5


@pytest.mark.parametrize("schedule", ["step", "plateau"])
def test_other_schedules_take_lr_and_no_warmup_from_lr_at(schedule):
    """Warm-up belongs to the cosine, wsd and constant schedules; step and plateau are applied by the training
    loop (below)."""
    cfg = TrainConfig(lr=0.5, schedule=schedule, warmup_steps=4)
    assert [lr_at(cfg, s, 12, None) for s in (0, 3, 11)] == [0.5, 0.5, 0.5]


def test_step_schedule_decays_by_epoch(tmp_path):
    """lr gamma^(epoch // lr_step_size) for every step of epoch ``epoch`` (12 steps an epoch here)."""
    cfg = tiny(tmp_path, schedule="step", lr_step_size=2, lr_gamma=0.25, num_epochs=5, max_tokens=1000,
               eval_every=5)
    train(cfg, progress=False, log=lambda *_: None)
    r = rows(tmp_path / "run")
    steps_per_epoch = (1000 - 10) // (8 * 10)
    assert steps_per_epoch == 12
    assert [int(x["step"]) for x in r] == list(range(5, 61, 5))
    expected = [1e-2 * 0.25 ** (((k - 1) // steps_per_epoch) // 2) for k in range(5, 61, 5)]
    assert [float(x["lr"]) for x in r] == expected
    assert expected[:3] == [1e-2] * 3 and expected[5] == 1e-2 / 4 and expected[-1] == 1e-2 / 16  # steps 30, 60


@pytest.mark.parametrize(
    "patience, expected",
    [
        # patience 0 (no early stopping): lr x gamma after every 2 evaluations without improvement
        (0, [1, 1, 1, 1 / 4, 1 / 4, 1 / 16, 1 / 16, 1 / 64]),
        # patience 6: after every 6 // 2 = 3; early stopping after the 6th, at evaluation 7
        (6, [1, 1, 1, 1, 1 / 4, 1 / 4, 1 / 4]),
    ],
)
def test_plateau_decays_after_evaluations_without_improvement(tmp_path, patience, expected):
    """lr 1e-9: the held-out loss cannot improve by 1e-6 after the first evaluation, one per step. The lr
    column is the lr of the step before each evaluation, so a decay shows from the next row."""
    cfg = tiny(tmp_path, schedule="plateau", lr=1e-9, lr_gamma=0.25, eval_every=1, max_steps=8, patience=patience)
    summary = train(cfg, progress=False, log=lambda *_: None)
    r = rows(tmp_path / "run")
    val = [float(x["val_loss"]) for x in r]
    assert all(v > val[0] - 1e-6 for v in val[1:])  # no improvement after the first
    assert [float(x["lr"]) for x in r] == [1e-9 * f for f in expected]
    assert summary["stop_reason"] == ("max_steps" if patience == 0 else "early stopping")


def _strict_json(text: str):
    """JSON as a strict parser (a browser's JSON.parse, jq) reads it: NaN and Infinity are errors."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_checkpoint_json_is_strict_json_and_the_inf_it_stands_for_resumes(tmp_path, schedule):
    """No evaluation improved the plateau counter of a cosine run, so its best loss is inf: checkpoint.json
    must still be strict JSON (null), and resuming must read inf back, so that the first evaluation after
    the resume counts as an improvement."""
    cfg = tiny(tmp_path, schedule=schedule, eval_every=2, max_steps=4)
    train(cfg, progress=False, log=lambda *_: None)
    for name in ("best", "last"):
        meta = _strict_json((tmp_path / "run" / name / "checkpoint.json").read_text())
        assert math.isfinite(meta["best_val"])
        assert (meta["plateau"]["best"] is None) == (schedule == "cosine")
    resumed = train(dataclasses.replace(cfg, max_steps=6), resume=True, progress=False, log=lambda *_: None)
    assert resumed["steps"] == 6
    meta = _strict_json((tmp_path / "run" / "last" / "checkpoint.json").read_text())
    assert (meta["plateau"]["best"] is None) == (schedule == "cosine")


def test_a_best_loss_saved_as_null_reads_back_as_inf():
    from deeprnn.train import _eval_counters, _loss_or_inf

    assert _loss_or_inf(None) == math.inf and _loss_or_inf(1.5) == 1.5
    counters = {"bad_evals": 2, "evals_done": 5}
    assert _eval_counters({"best_val": None, "plateau": {"best": None, "bad": 1, "scale": 0.5}, **counters}, {}) == \
        (math.inf, 2, 5, {"best": math.inf, "bad": 1, "scale": 0.5})
    # checkpoints written before this change hold Infinity, which Python's json reads as inf
    old = json.loads('{"best_val": 1.25, "plateau": {"best": Infinity, "bad": 0, "scale": 1.0}}')
    assert _eval_counters({**old, **counters}, {})[::3] == (1.25, {"best": math.inf, "bad": 0, "scale": 1.0})
    default = {"best": math.inf, "bad": 0, "scale": 1.0}
    assert _eval_counters({"best_val": 0.5, **counters}, default) == (0.5, 2, 5, default)
