"""``benchmarks/step_sweep.py``: variants of a preset for a fixed number of steps, in worker processes."""

from __future__ import annotations

import json

import pytest

from benchmarks.step_sweep import main, paired_change, summary_table

TINY = ["--set", "num_layers=1", "num_hiddens=16", "embed_size=8", "batch_size=4", "num_steps=8",
        "max_tokens=3000", "eval_every=3", "eval_batch_size=4", "eval_num_steps=64", "device=cpu"]


def runs_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"variant"')]


def test_the_table_compares_each_variant_with_the_baseline_on_the_seeds_both_finished():
    results = {("base", 0): {"best_ppl": 4.0}, ("base", 1): {"best_ppl": 4.1},
               ("wide", 0): {"best_ppl": 3.96}, ("wide", 1): {"best_ppl": 4.141}, ("wide", 2): {"best_ppl": 3.0},
               ("lr", 1): {"best_ppl": 4.0}}
    variants = {"base": {}, "wide": {"num_hiddens": 640, "max_steps": 826}, "lr": {"lr": 0.02}, "gone": {"clip": 1}}
    change, seeds = paired_change(results, "wide", "base", [0, 1, 2])  # -1% and +1%; seed 2 has no baseline
    assert (change, seeds) == (pytest.approx(0.0), 2)
    assert paired_change(results, "gone", "base", [0, 1]) is None
    assert summary_table("tm-cpu-fp32", variants, results, [0, 1, 2], 1230) == [
        "| variant of `tm-cpu-fp32` | changes | steps | best held-out ppl (mean) | per seed | vs base (paired) |",
        "| --- | --- | ---: | ---: | --- | ---: |",
        "| base | (the preset) | 1230 | 4.050 | 4.000, 4.100 |  |",
        "| wide | num_hiddens=640 max_steps=826 | 826 | 3.700 | 3.960, 4.141, 3.000 | +0.00% (2) |",
        "| lr | lr=0.02 | 1230 | 4.000 | 4.000 | -2.44% (1) |",
        "| gone | clip=1 | | (no run finished) | | |",
    ]


def test_a_sweep_runs_every_variant_and_then_the_finalists_on_more_seeds(capsys, tmp_path):
    # ema99 changes nothing within 6 steps (the preset's average starts at step 600), so it must reproduce the
    # baseline exactly in another worker process; "bad" (a corpus file that is not there, which only reading
    # finds) fails alone, with its error, the sweep goes on, and its exit status says a run failed.
    missing = tmp_path / "missing.txt"
    assert main(["--preset", "tm-cpu-fp32", "--steps", "6", "--seeds", "0", "--jobs", "1", *TINY,
                 "--variant", "ema99", "ema_decay=0.99", "--variant", "short", "max_steps=2",
                 "--variant", "bad", f"corpus=['{missing}']", "--finalists", "1", "--more-seeds", "1"]) == 1
    captured = capsys.readouterr()
    out = captured.out
    runs = {(r["variant"], r["seed"]): r for r in runs_of(out)}
    assert set(runs) == {("base", 0), ("ema99", 0), ("short", 0), ("bad", 0), ("base", 1), ("ema99", 1)}
    assert runs["bad", 0]["error"] == f"CorpusError: no such file: '{missing}'; check the path"
    assert captured.err.splitlines()[-1] == "step_sweep.py: 1 of 6 runs failed: bad seed 0 (their errors are above)"
    assert runs["ema99", 0]["best_ppl"] == runs["base", 0]["best_ppl"]
    assert runs["ema99", 1]["best_ppl"] == runs["base", 1]["best_ppl"]
    assert runs["base", 0]["best_ppl"] != runs["base", 1]["best_ppl"]
    assert (runs["base", 0]["steps"], runs["short", 0]["steps"]) == (6, 2)
    assert runs["short", 0]["best_ppl"] > runs["base", 0]["best_ppl"]  # 2 steps of Adam, not 6
    assert "finalists for seeds [1]: base, ema99" in out
    assert "| ema99 | ema_decay=0.99 | 6 |" in out and "| +0.00% (2) |" in out
    assert f"| bad | corpus=['{missing}'] | | (no run finished) | | |" in out


def test_a_sweep_where_every_run_failed_exits_1(capsys, tmp_path):
    # It used to print "(no run finished)" and exit 0.
    missing = tmp_path / "missing.txt"
    assert main(["--preset", "tm-cpu-fp32", "--steps", "2", "--seeds", "0", "--jobs", "1", *TINY,
                 "--set", f"corpus=['{missing}']"]) == 1
    captured = capsys.readouterr()
    assert [r["variant"] for r in runs_of(captured.out)] == ["base"]
    assert "| base | (the preset) | | (no run finished) | | |" in captured.out
    assert captured.err.splitlines() == ["step_sweep.py: 1 of 1 runs failed: base seed 0 (their errors are above)"]


def test_a_deadline_starts_no_more_runs(capsys):
    # One worker, and the deadline has passed when the first run ends: no other run starts.
    variants = [arg for i in range(3) for arg in ("--variant", f"v{i}", f"clip={i + 1}")]
    assert main(["--preset", "tm-cpu-fp32", "--steps", "2", "--seeds", "0", "--jobs", "1", "--deadline", "0",
                 *TINY, *variants]) == 0
    out = capsys.readouterr().out
    assert [(r["variant"], r["seed"]) for r in runs_of(out)] == [("base", 0)]
    assert "| v0 | clip=1 | | (no run finished) | | |" in out and "| v2 | clip=3 | | (no run finished) | | |" in out
    assert "\n1 runs in " in out


@pytest.mark.parametrize("args, message", [
    (["--steps", "2", "--variant", "a", "lr=0.1", "--variant", "a", "lr=0.2"],
     "variant 'a' is given twice; give each variant its own name"),
    (["--steps", "2", "--finalists", "2"], "--finalists needs --more-seeds: the seeds to run the finalists on"),
    (["--steps", "0"], "--steps and --jobs must be >= 1, got 0 and 1"),
    # a seed given twice was run twice and counted twice in the means
    (["--steps", "2", "--seeds", "0", "1", "0"], "--seeds gives seed 0 twice; give each seed once"),
    (["--steps", "2", "--seeds", "0", "1", "--finalists", "1", "--more-seeds", "2", "1"],
     "--more-seeds gives seed 1, which --seeds already runs; give the finalists other seeds"),
    (["--steps", "2", "--finalists", "1", "--more-seeds", "2", "2"],
     "--more-seeds gives seed 2 twice; give each seed once"),
    (["--steps", "2", "--more-seeds", "2"], "--more-seeds needs --finalists: how many variants to run on them"),
    (["--steps", "2", "--finalists", "-1", "--more-seeds", "2"], "--finalists must be >= 0, got -1"),
    # configurations are checked before any worker starts, not by each run in turn
    (["--steps", "2", "--set", "lr=-1"], "--set: lr must be > 0, got -1"),
    (["--steps", "2", "--variant", "wide", "num_hiddens=32", "--variant", "bad", "dropout=2"],
     "variant 'bad': dropout must be in [0, 1), got 2"),
    (["--steps", "2", "--seeds", "0", "-1"], "seed must be an integer in [0, 2**63), got -1"),
])
def test_bad_arguments_get_one_line(args, message, capsys, monkeypatch):
    monkeypatch.setattr("benchmarks.step_sweep.cf.ProcessPoolExecutor", lambda *a, **k: pytest.fail("workers started"))
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "tm-cpu-fp32", "--jobs", "1", *args])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"step_sweep.py: error: {message} (see step_sweep.py --help)\n"
