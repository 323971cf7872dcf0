"""``benchmarks/ensemble.py``: the mean of several runs' next-token probabilities, scored on held-out text."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.ensemble import ensemble_perplexities, main as ensemble_main
from deeprnn.cli import main
from deeprnn.errors import ConfigError, DeepRNNError

TINY = ["--num-layers", "1", "--num-hiddens", "16", "--batch-size", "4", "--num-steps", "8",
        "--max-tokens", "2000", "--max-steps", "6", "--eval-batch-size", "4", "--sample-every", "0",
        "--precision", "fp32", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = []
    for seed in (0, 1):
        run = tmp_path_factory.mktemp("ens") / f"run{seed}"
        assert main(["train", *TINY, "--seed", str(seed), "--run-dir", str(run)]) == 0
        out.append(str(run))
    return out


def test_one_run_scores_as_evaluate_does(runs, capsys):
    capsys.readouterr()
    assert main(["evaluate", runs[0], "--split", "valid", "--batch-size", "4", "--num-steps", "32", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)
    singles, ensemble, n = ensemble_perplexities(runs[:1], "valid", batch_size=4, num_steps=32)
    assert n == want["tokens"]
    assert singles[0] == pytest.approx(want["perplexity"], rel=1e-6)  # evaluate sums float32 losses
    assert ensemble == pytest.approx(singles[0], rel=1e-12)


def test_two_runs_mix_probabilities(runs):
    singles, ensemble, _ = ensemble_perplexities(runs, "valid", batch_size=4, num_steps=32)
    assert singles[0] != pytest.approx(singles[1], rel=1e-6)  # two different models
    # -log of a mean of probabilities is at most the mean of the -logs (Jensen): the ensemble's
    # perplexity is at most the geometric mean of the members', and not equal to it for different models.
    assert ensemble < math.sqrt(singles[0] * singles[1])
    same, twice, _ = ensemble_perplexities([runs[0], runs[0]], "valid", batch_size=4, num_steps=32)
    assert twice == pytest.approx(same[0], rel=1e-12)


def test_another_vocabulary_is_refused(runs, tmp_path):
    other = tmp_path / "raw"
    assert main(["train", *TINY, "--normalization", "raw", "--run-dir", str(other)]) == 0
    with pytest.raises(DeepRNNError, match="has another vocabulary than"):
        ensemble_perplexities([runs[0], str(other)], "valid")


def test_the_script_says_what_is_wrong_in_one_line(runs, tmp_path, capsys):
    other = tmp_path / "raw"
    assert main(["train", *TINY, "--normalization", "raw", "--run-dir", str(other)]) == 0
    capsys.readouterr()
    assert ensemble_main([runs[0], str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ensemble.py: error: {other} has another vocabulary than {runs[0]}; an ensemble needs one vocabulary"]
    assert ensemble_main(runs + ["--batch-size", "4", "--num-steps", "32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("ensemble of 2: perplexity ") and out[-1].endswith(" valid tokens")


@pytest.mark.parametrize("flag, value", [("--batch-size", "-1"), ("--batch-size", "0"), ("--num-steps", "-5"),
                                         ("--num-steps", "0")])
def test_sizes_below_one_are_one_line(runs, flag, value, capsys):
    # --num-steps -5 was a ValueError traceback, --batch-size -1 scored with other streams and exited 0, and 0
    # meant the default without a word; the help gives the default as "the first run's", not 0.
    with pytest.raises(SystemExit) as exc:
        ensemble_main([*runs, flag, value])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"ensemble.py: error: {flag} must be >= 1, got {value} (see ensemble.py --help)\n"


@pytest.mark.parametrize("sizes, message", [(dict(batch_size=0), "batch_size must be >= 1, got 0"),
                                            (dict(num_steps=-5), "num_steps must be >= 1, got -5")])
def test_the_library_refuses_sizes_below_one(runs, sizes, message):
    with pytest.raises(ConfigError) as exc:
        ensemble_perplexities(runs, "valid", **sizes)
    assert str(exc.value) == message
