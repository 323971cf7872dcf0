"""Bad arguments to ``benchmarks/quality.py`` and ``python -m benchmarks``: one line, exit 2, before any work.

(``step_sweep.py`` and ``ensemble.py`` have theirs in ``test_step_sweep.py`` and ``test_ensemble_script.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import quality, suite

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--preset", "tiny", "--minutes", "1"]  # 5 steps of a 1x16 LSTM


def refused(main, argv, capsys) -> str:
    """The one error line of ``main(argv)``, which must exit 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return one_line(capsys.readouterr().err)


def one_line(err: str) -> str:
    """The error of a benchmark script's stderr, which must be one line (argparse's usage block came first),
    without the pointer to --help that parser errors end with."""
    lines = err.splitlines()
    assert len(lines) == 1, lines
    prog = lines[0].split(": ", 1)[0]
    return lines[0].removesuffix(f" (see {prog} --help)")


@pytest.fixture
def no_training(monkeypatch):
    """Any training run fails the test: the arguments must be refused before one starts."""
    monkeypatch.setattr(quality, "train", lambda *a, **k: pytest.fail("training started"))


@pytest.mark.parametrize("args, message", [
    (["--threads", "-1"], "--threads must be >= 1, got -1"),  # was torch's RuntimeError traceback
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    # the dynamic-evaluation settings were refused only after the whole training run
    (["--dynamic-lr", "1e-4", "-1"], "--dynamic-lr must be in [0, 3e38], got -1.0"),
    (["--dynamic-lr", "nan"], "--dynamic-lr must be in [0, 3e38], got nan"),
    (["--dynamic-lr", "1e39"], "--dynamic-lr must be in [0, 3e38], got 1e+39"),
    (["--dynamic-lr"], "--dynamic-lr needs at least one learning rate"),  # skipped dynamic evaluation silently
    (["--dynamic-decay", "0.1"], "--dynamic-decay needs --dynamic-lr: the learning rates to evaluate with"),
    (["--dynamic-lr", "1e-4", "--dynamic-decay", "1.5"], "--dynamic-decay must be in [0, 1], got 1.5"),
    # the configuration is checked before the preset line and the run (it was exit 1, after both)
    (["--minutes", "0"], "time_budget must be > 0 minutes, got 0.0"),
    (["--set", "num_layers=0"], "num_layers must be >= 1, got 0"),
    (["--set", "momentum=0.9"], "--set momentum=0.9 has no effect with optimizer 'adam'; it is read only with "
                                "optimizer 'sgd': drop it, or --set optimizer=..."),  # trained as if not there
    (["--run-dir", " "], "--run-dir is empty; name a directory, or drop --run-dir for a temporary one"),
])
def test_quality_refuses_bad_arguments_before_training(args, message, capsys, no_training):
    assert refused(quality.main, [*TINY, *args], capsys) == f"quality.py: error: {message}"


@pytest.mark.parametrize("args, message", [
    (["--only", "tied", "nosuch"], "--only 'nosuch' matches no ablation row; give part of a row's name: "
     + "; ".join(quality.ABLATION_ROWS)),  # was a StopIteration traceback (with "nosuch" alone)
    (["--seeds", "0", "1", "0"], "--seeds gives seed 0 twice; give each seed once"),  # counted twice in the mean
    (["--seeds", "0", "-1"], "seed must be an integer in [0, 2**63), got -1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--run-dir", "kept"], "--ablation does not use --run-dir; drop it, or drop --ablation"),
    (["--dynamic-lr", "1e-4"], "--ablation does not use --dynamic-lr; drop it, or drop --ablation"),
])
def test_quality_ablation_refuses_bad_arguments_before_training(args, message, capsys, no_training):
    assert refused(quality.main, ["--ablation", *args], capsys) == f"quality.py: error: {message}"


def test_the_ablation_compares_with_the_first_row_when_only_leaves_out_the_baseline(monkeypatch, capsys):
    def fake_run(values, *, run_dir, **_):  # best perplexity 5 + seed, + 1 with tied weights
        ppl = 5.0 + values["seed"] + values.get("tie_weights", False)
        return {"curve": [(0.1, 10, 1.6, ppl)], "train_time_s": 1.0, "steps": 10}

    monkeypatch.setattr(quality, "run", fake_run)
    quality.main(["--ablation", "--steps", "10", "--seeds", "0", "1", "--only", "tied", "forget-gate"])
    table = capsys.readouterr().out.splitlines()[-4:]
    assert table == ["| configuration | best held-out ppl (mean) | per seed | vs the first row |",
                     "| --- | ---: | --- | ---: |",
                     "| + tied embeddings | 6.500 | 6.000, 7.000 | +0.000 |",
                     "| + forget-gate bias 1 | 5.500 | 5.000, 6.000 | -1.000 |"]
    quality.main(["--ablation", "--steps", "10", "--seeds", "0", "--only", "baseline (dropout", "tied"])
    assert capsys.readouterr().out.splitlines()[-4:] == [
        "| configuration | best held-out ppl (mean) | per seed | vs baseline |",
        "| --- | ---: | --- | ---: |",
        "| baseline (dropout 0.2 between layers and on the output) | 5.000 | 5.000 | +0.000 |",
        "| + tied embeddings | 6.000 | 6.000 | +1.000 |"]


def test_quality_keeps_a_run_dir_that_holds_a_run_unless_told_to_overwrite(tmp_path, capsys):
    """``--run-dir`` holding a run is refused in one line, as ``deeprnn train`` refuses it (quality.py used to
    replace it without a word); ``--overwrite`` replaces it; a new or empty directory just works."""
    run = tmp_path / "run"
    assert quality.main([*TINY, "--run-dir", str(run)]) == 0
    config = (run / "config.json").read_bytes()
    summary = (run / "summary.json").read_bytes()
    assert refused(quality.main, [*TINY, "--seed", "1", "--run-dir", str(run)], capsys) == (
        f"quality.py: error: --run-dir {run} already holds a run; pass --overwrite to replace it, or choose "
        "another --run-dir")
    assert (run / "config.json").read_bytes() == config and (run / "summary.json").read_bytes() == summary
    assert quality.main([*TINY, "--seed", "1", "--run-dir", str(run), "--overwrite"]) == 0
    assert json.loads((run / "config.json").read_text())["seed"] == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert quality.main([*TINY, "--run-dir", str(empty)]) == 0
    assert json.loads((empty / "summary.json").read_text())["steps"] == 5


@pytest.mark.parametrize("args, message", [
    (["--threads", "-1"], "--threads must be >= 1, got -1"),  # was torch's RuntimeError traceback
    (["--rounds", "-1"], "--rounds must be >= 1, got -1"),  # was a StatisticsError after every warm-up
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),  # meant the default, silently
    (["--seconds", "0"], "--seconds must be a finite number > 0, got 0.0"),  # meant the default, silently
    (["--seconds", "-0.5"], "--seconds must be a finite number > 0, got -0.5"),
    (["--seconds", "nan"], "--seconds must be a finite number > 0, got nan"),
])
def test_the_suite_refuses_bad_arguments_before_measuring(args, message, capsys, monkeypatch):
    monkeypatch.setattr(suite, "fp32_ceiling", lambda: pytest.fail("the suite started measuring"))
    threads = torch.get_num_threads()
    assert refused(suite.main, ["--quick", "--skip-ingest", "--no-save", *args], capsys) == (
        f"python -m benchmarks: error: {message}")
    assert torch.get_num_threads() == threads


def test_python_m_benchmarks_refuses_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--skip-ingest", "--no-save",
                           "--rounds", "-1", "--threads", "1"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "python -m benchmarks: error: --rounds must be >= 1, got -1 (see python -m benchmarks --help)\n"
    assert "Traceback" not in proc.stderr
