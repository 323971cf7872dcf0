"""deeprnn compare: grid report, run cache, the data experiments' held-out spans, per-source scores."""

import argparse
import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from deeprnn import compare
from deeprnn.cli import build_parser, main
from deeprnn.corpus import build_corpus
from deeprnn.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n"

# Tiny models and budgets: every run is a few steps of an 8-unit model.
TINY_SET = ["max_steps=3", "batch_size=4", "num_steps=8", "eval_every=2", "eval_batch_size=8",
            "eval_num_steps=32", "num_preds=0", "sample_every=0", "precision=fp32", "dropout=0",
            "val_fraction=0.1", "test_fraction=0.1"]


def _set_flags(items):
    return [x for item in items for x in ("--set", item)]


def _table_rows(report: str) -> list[list[str]]:
    lines = [ln for ln in report.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_text(tmp_path, shared_data) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text((shared_data / "timemachine.txt").read_text()[:6000])
    return path


def test_grid_report_then_cache(tmp_path, tiny_text, capsys):
    out = tmp_path / "report"
    argv = ["compare", "--cells", "gru,lstm", "--layers", "1,2", "--hiddens", "8", "--corpus", f"tiny={tiny_text}",
            "--epochs", "1", "--target-ppl", "1e6", "--out", str(out), *_set_flags(TINY_SET)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 trained, 0 from the cache" in printed

    report = (out / "report.md").read_text()
    header, _sep, *rows = _table_rows(report)
    assert header[0] == "configuration" and "held-out ppl (best)" in header and "tokens/s" in header
    # a file of the user's is read where it is: the report said it came from $DEEPRNN_DATA_DIR, beside a Time
    # Machine the grid did not use
    assert "Corpora:" not in report and "Budget: at most 3 steps per run; 1 epochs per run;" in report
    assert [r[0] for r in rows] == ["gru 1x8 concise", "gru 2x8 concise", "lstm 1x8 concise", "lstm 2x8 concise"]
    for row in rows:  # every column filled with a number
        assert len(row) == len(header)
        for cell in row[1:]:
            assert cell and cell not in ("n/a", "nan") and "not reached" not in cell, (row, cell)
            float(cell.split(" ± ")[0].replace(",", ""))
    assert "| gru 1x8 concise |" in printed  # the table is printed too

    with open(out / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert len(results) == 4
    for r in results:
        assert float(r["best_val_ppl"]) <= float(r["final_val_ppl"]) + 1e-9
        assert float(r["best_val_bpc"]) == pytest.approx(math.log2(float(r["best_val_ppl"])))
        assert int(r["parameters"]) > 0 and float(r["tokens_per_s"]) > 0 and int(r["steps"]) == 3
        assert 0 <= float(r["time_to_target_s"]) <= float(r["train_time_s"]) + 1e-6
    # depth adds parameters; an LSTM has 4 gates to the GRU's 3
    p = {r["label"]: int(r["parameters"]) for r in results}
    assert p["gru 2x8 concise"] > p["gru 1x8 concise"] and p["lstm 1x8 concise"] > p["gru 1x8 concise"]
    for png in ("curves.png", "speed.png"):
        assert (out / png).read_bytes()[:8] == PNG

    summaries = sorted((out / "runs").glob("*/summary.json"))
    assert len(summaries) == 4
    stamps = {s: s.stat().st_mtime_ns for s in summaries}
    assert main(argv) == 0
    assert "0 trained, 4 from the cache" in capsys.readouterr().out
    assert {s: s.stat().st_mtime_ns for s in summaries} == stamps
    assert sorted((out / "runs").glob("*/summary.json")) == summaries  # no new run directories


def test_time_to_target_reads_metrics():
    rows = [{"val_ppl": "20.0", "elapsed_s": "1.5"}, {"val_ppl": "nan", "elapsed_s": "2"},
            {"val_ppl": "9.5", "elapsed_s": "3.25"}, {"val_ppl": "8.0", "elapsed_s": "4"}]
    assert compare.time_to_target(rows, 10.0) == 3.25
    assert compare.time_to_target(rows, 5.0) is None
    assert compare.time_to_target(rows, None) is None


def test_aggregate_mean_and_std_over_seeds():
    def rec(seed, ppl, t):
        r = {k: 1.0 for k, _, _ in compare.COLUMNS}
        r.update(label="lstm 2x256 concise", seed=seed, best_val_ppl=ppl, time_to_target_s=t)
        return r

    header, rows = compare.aggregate([rec(0, 6.0, 10.0), rec(1, 8.0, None)], [], 7.0)
    col = header.index("held-out ppl (best)")
    assert rows[0][1] == "2" and rows[0][col] == "7.000 ± 1.414"
    assert rows[0][-1] == "not reached (1/2)"


def test_config_key_ignores_where_not_what(tmp_path):
    spec = compare.GridSpec(cells=["gru", "lstm"], seeds=[0, 1])
    points = compare.expand_grid(spec)
    assert len({p.key for p in points}) == 4
    cfg = points[0].cfg
    assert compare.config_key(dataclasses.replace(cfg, run_dir=str(tmp_path))) == compare.config_key(cfg)
    assert compare.config_key(cfg, {"timemachine": 2.0}) != compare.config_key(cfg)


def test_set_and_weights_parsing():
    assert compare.parse_set(["lr=0.01", "dropout=0", "tie-weights=true", "max-steps=none"]) == \
        {"lr": 0.01, "dropout": 0.0, "tie_weights": True, "max_steps": None}
    for items, message in [
            (["cell=gru"], "cell is a grid axis or compare option; use --cells instead of --set"),
            (["learning_rate=1"], "--set: unknown key 'learning_rate'; see deeprnn train --help for the options"),
            (["lr=fast"], "--set: lr must be of type float, got 'fast'"),  # the only one without "--set:" before
            (["optimizer=lbfgs"], "--set: optimizer must be one of sgd, adam, adamw, got 'lbfgs'")]:
        with pytest.raises(ConfigError) as err:
            compare.parse_set(items)
        assert str(err.value) == message
    assert compare.parse_set(["source-weights=2,0.5"]) == {"source_weights": [2.0, 0.5]}
    with pytest.raises(ConfigError, match=r"^--set: source_weights must be of type list\[float\], got 'two,1'$"):
        compare.parse_set(["source_weights=two,1"])
    assert compare.parse_weights("tinyshakespeare=0.25,timemachine=3") == {"tinyshakespeare": 0.25, "timemachine": 3.0}
    assert compare.parse_weights("balance") == "balance"
    for bad in ("timemachine=-1", "timemachine=1e308"):  # 1e308 overflowed torch's repeat count after training began
        with pytest.raises(ConfigError) as err:
            compare.parse_weights(bad)
        assert str(err.value) == f"weights must be 'balance' or SOURCE=W,... with 0 < W <= 1,000, got {bad!r}"


def test_compare_is_a_cli_command():
    args = build_parser().parse_args(["compare", "--preset", "more-data", "--minutes", "0.5", "--seeds", "0,1"])
    spec = compare.spec_from_args(args)
    assert spec.base["time_budget"] == 0.5 and spec.seeds == [0, 1]
    assert [v.heldout_from for v in spec.data] == [["timemachine"], ["timemachine"]]
    assert compare.PRESETS["more-data"]["data"][0].weights is None  # flags never alter the preset itself
    args = build_parser().parse_args(["compare", "--preset", "authors", "--weights", "tinyshakespeare=0.5"])
    assert [v.weights for v in compare.spec_from_args(args).data] == \
        [None, None, {"tinyshakespeare": 0.5}, {"tinyshakespeare": 0.5}]
    with pytest.raises(ConfigError) as err:
        compare.spec_from_args(build_parser().parse_args(["compare", "--preset", "authors", "--weights", "shakespear=2"]))
    assert str(err.value) == ("weights name 'shakespear', which no multi-source --corpus variant trains on; sources: "
                              "timemachine, tinyshakespeare, war-of-the-worlds")


def test_a_set_option_the_runs_would_not_read_is_refused():
    """As train refuses --momentum with Adam: SGD takes --set momentum=0.9, the presets' Adam does not."""
    spec = compare.spec_from_args(build_parser().parse_args(["compare", "--preset", "gru-vs-lstm", "--set",
                                                             "optimizer=sgd", "--set", "momentum=0.9"]))
    assert (spec.base["optimizer"], spec.base["momentum"]) == ("sgd", 0.9)
    for argv, message in [(["--preset", "gru-vs-lstm", "--set", "momentum=0.9"],
                           "--set momentum=0.9 has no effect with optimizer 'adam'; it is read only with optimizer "
                           "'sgd': drop it, or --set optimizer=..."),
                          (["--set", "beta1=0.5", "--set", "optimizer=sgd"],
                           "--set beta1=0.5 has no effect with optimizer 'sgd'; it is read only with optimizer 'adam' "
                           "or 'adamw': drop it, or --set optimizer=...")]:
        with pytest.raises(ConfigError) as err:
            compare.spec_from_args(build_parser().parse_args(["compare", *argv]))
        assert str(err.value) == message


def test_more_data_heldout_is_only_time_machine():
    """Exercise 3: the validation/test text of the merged corpus lies inside The Time Machine's span."""
    variant = compare.PRESETS["more-data"]["data"][1]
    assert variant.corpus == ["timemachine", "war-of-the-worlds"] and variant.heldout_from == ["timemachine"]
    corpus = build_corpus(variant.corpus)
    (tm, tm_a, tm_b), (wotw, w_a, w_b) = corpus.spans
    assert (tm, wotw) == ("timemachine", "war-of-the-worlds") and tm_b == w_a
    fractions = (0.9, 0.05, 0.05)
    ranges = compare.heldout_ranges(corpus, fractions, variant.heldout_from)
    splits = corpus.split(fractions, heldout_from=variant.heldout_from)
    for part in ("valid", "test"):
        assert ranges[part] and all(name == "timemachine" and tm_a <= a < b <= tm_b for name, a, b in ranges[part])
        # the ranges are exactly what Corpus.split handed to training as held-out text
        got = torch.cat([corpus.tokens[a:b] for _, a, b in ranges[part]])
        assert torch.equal(got, getattr(splits, part))
    # the added book goes wholly to training; the Time Machine held-out tail is the same as alone
    assert ("war-of-the-worlds", w_a, w_b) in ranges["train"]
    alone = build_corpus(["timemachine"], vocab=corpus.vocab).split(fractions)
    assert torch.equal(alone.valid, splits.valid) and torch.equal(alone.test, splits.test)
    # and the grid gives both runs that held-out split
    points = compare.expand_grid(compare.GridSpec(data=compare.PRESETS["more-data"]["data"]))
    assert [p.cfg.heldout_from for p in points] == [None, ["timemachine"]]  # None: its only source


def test_weighted_text_keeps_heldout_out_of_training(tmp_path, shared_data):
    """--weights repeats/truncates training text only; held-out tokens never reach training."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    text = (shared_data / "timemachine.txt").read_text()
    a.write_text(text[:4000])
    b.write_text(text[20000:22000])
    from deeprnn.train import TrainConfig

    cfg = TrainConfig(corpus=[str(a), str(b)])
    corpus = build_corpus(cfg.corpus)
    fr = compare.split_fractions(cfg)
    plain = corpus.split(fr)
    ranges = compare.heldout_ranges(corpus, fr)
    n_train = {name: hi - lo for name, lo, hi in ranges["train"]}
    weighted = compare.materialise_weighted(cfg, {str(a): 0.5, str(b): 2.5}, tmp_path / "data")
    new = build_corpus(weighted.corpus)
    split = new.split(compare.split_fractions(weighted), heldout_from=weighted.heldout_from)
    want = int(n_train[str(a)] * 0.5) + round(n_train[str(b)] * 2.5)
    assert abs(split.train.numel() - want) <= 4  # up to the spaces that normalisation strips at the ends
    for i, name in enumerate([str(a), str(b)]):  # each .heldout file is that source's valid + test text
        parts = [(lo, hi) for part in ("valid", "test") for n, lo, hi in ranges[part] if n == name]
        want_text = corpus.vocab.decode(corpus.tokens[parts[0][0]: parts[-1][1]])
        assert (tmp_path / "data" / f"{i}.heldout.txt").read_text() == want_text
    assert abs(split.valid.numel() + split.test.numel() - plain.valid.numel() - plain.test.numel()) <= 4
    # no held-out token went to training: training is exactly the two .train.txt files
    train_files = [c for c in weighted.corpus if c.endswith(".train.txt")]
    assert split.train.numel() == sum(e - s for n, s, e in new.spans if n in train_files)
    balanced = compare.materialise_weighted(cfg, "balance", tmp_path / "bal")
    sizes = [Path(c).stat().st_size for c in balanced.corpus if c.endswith(".train.txt")]
    assert abs(sizes[0] - sizes[1]) <= 2
    with pytest.raises(ConfigError) as err:  # 1e30 overflowed torch's repeat count
        compare.materialise_weighted(cfg, {str(a): 1e30}, tmp_path / "huge")
    assert str(err.value) == "weights must be in (0, 1,000], got 1e+30" and not (tmp_path / "huge").exists()


def test_authors_preset_scores_every_source(tmp_path, capsys):
    """Exercise 4 at a tiny budget: every model has a perplexity on every source's validation span."""
    out = tmp_path / "authors"
    tiny = ["max_tokens=2000", "val_fraction=0.004", "test_fraction=0.004", "eval_every=0",
            "eval_batch_size=16", "eval_num_steps=64", "max_steps=2", "batch_size=4", "num_steps=8"]
    argv = ["compare", "--preset", "authors", "--layers", "1", "--hiddens", "8", "--epochs", "1",
            "--out", str(out), *_set_flags(tiny)]
    assert main(argv) == 0
    with open(out / "results.csv", newline="") as f:
        results = {r["data"]: r for r in csv.DictReader(f)}
    assert list(results) == ["wells", "shakespeare", "merge", "merge-balanced"]
    for r in results.values():
        for src in ("timemachine", "war-of-the-worlds", "tinyshakespeare"):
            ppl = float(r[f"valid_ppl[{src}]"])
            assert 1 < ppl < 60, (r["data"], src, ppl)  # an 8-unit model after 2 steps: near uniform (28)
            assert float(r[f"valid_bpc[{src}]"]) == pytest.approx(math.log2(ppl))
    report = (out / "report.md").read_text()
    header = _table_rows(report)[0]
    assert header[-3:] == ["valid ppl timemachine", "valid ppl war-of-the-worlds", "valid ppl tinyshakespeare"]
    assert ("Corpora: timemachine is bundled with deeprnn; tinyshakespeare, war-of-the-worlds come from "
            "`$DEEPRNN_DATA_DIR` (downloaded there when missing unless `DEEPRNN_OFFLINE=1`).") in report
    capsys.readouterr()


def test_per_source_eval_refuses_trained_on_text(tmp_path, tiny_text, capsys):
    """A source trained on wholly (heldout_from elsewhere) is reported n/a, never scored."""
    other = tmp_path / "other.txt"
    other.write_text(tiny_text.read_text()[::-1])
    out = tmp_path / "r"
    argv = ["compare", "--hiddens", "8", "--layers", "1", "--corpus", f"both={tiny_text},{other}",
            "--heldout-from", str(tiny_text), "--eval-on", f"{tiny_text},{other}", "--epochs", "1",
            "--out", str(out), *_set_flags(TINY_SET)]
    assert main(argv) == 0
    with open(out / "results.csv", newline="") as f:
        (r,) = list(csv.DictReader(f))
    assert float(r[f"valid_ppl[{tiny_text}]"]) > 1 and r[f"valid_ppl[{other}]"] == ""
    assert "n/a (trained on)" in (out / "report.md").read_text()
    capsys.readouterr()


def test_trained_on_is_decided_by_the_files_not_the_spelling(tmp_path):
    """--eval-on and --heldout-from compared as typed: ./d/b.txt, trained on whole, was scored as "validation"
    (training text), d/a.txt held out as ./d/a.txt was reported "trained on", and a file inside a directory the
    variant trains on counted as a new source."""
    d = tmp_path / "d"
    d.mkdir()
    for name in ("a", "b"):
        (d / f"{name}.txt").write_text("the time machine " * 50)
    a, b, dot_a, dot_b = str(d / "a.txt"), str(d / "b.txt"), f"{d}/./a.txt", f"{d}/./b.txt"
    files = compare.DataVariant("files", [a, b], heldout_from=[a])
    assert [compare.trained_whole(files, s) for s in (a, b, dot_a, dot_b)] == [False, True, False, True]
    spelled = compare.DataVariant("spelled", [a, b], heldout_from=[dot_a])
    assert [compare.trained_whole(spelled, s) for s in (a, b)] == [False, True]
    folder = compare.DataVariant("folder", [str(d)], heldout_from=[a])
    assert [compare.trained_whole(folder, s) for s in (a, b, str(d), "timemachine")] == [False, True, True, False]
    every = compare.DataVariant("every", [str(d)])  # no --heldout-from: every source is split
    assert [compare.trained_whole(every, s) for s in (a, b)] == [False, False]


def test_an_eval_on_source_too_short_to_score_is_refused_before_training(tmp_path, tiny_text, capsys, monkeypatch):
    """Its column said nan after the grid trained, then "n/a (trained on)" from the cache, of a text the runs
    never saw."""
    short = tmp_path / "short.txt"
    short.write_text("hello there my friend")
    monkeypatch.setattr(compare, "run_point", lambda *a, **k: pytest.fail("a run started"))
    assert main(["compare", "--hiddens", "8", "--layers", "1", "--corpus", f"tiny={tiny_text}", "--eval-on", str(short),
                 "--epochs", "1", "--out", str(tmp_path / "r"), *_set_flags(TINY_SET)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"deeprnn: error: --eval-on {short}: its validation span has 2 tokens (--set val_fraction=0.1); "
                    "it needs at least 3 to be scored: use a longer text, or leave it out of --eval-on")
    assert not (tmp_path / "r").exists()
    # an older cache's unscored source is "n/a", not "trained on"
    runs = [{"label": "x", **{k: 1.0 for k, _, _ in compare.COLUMNS}, "valid_ppl[s]": None, "trained_on[s]": False}]
    assert compare.aggregate(runs, ["s"], None)[1][0][-1] == "n/a"
    assert compare.aggregate([{**runs[0], "trained_on[s]": True}], ["s"], None)[1][0][-1] == "n/a (trained on)"


def test_a_damaged_cache_entry_is_trained_or_scored_again(tmp_path, tiny_text, capsys):
    """compare.json cut short (a kill mid-write), a summary.json that is not an object, an eval.json cut short:
    each used to stop the next compare with a JSONDecodeError/AttributeError traceback. The run is trained
    again (the eval scored again); the intact runs still come from the cache."""
    out = tmp_path / "r"
    argv = ["compare", "--cells", "gru", "--layers", "1,2", "--hiddens", "8", "--corpus", f"tiny={tiny_text}",
            "--eval-on", str(tiny_text), "--epochs", "1", "--out", str(out), *_set_flags(TINY_SET)]
    assert main(argv) == 0
    runs = sorted(p for p in (out / "runs").iterdir())
    assert len(runs) == 2 and all((r / "eval.json").exists() for r in runs)
    before = (out / "results.csv").read_text()
    for path, cut in ((runs[0] / "compare.json", lambda t: t[: len(t) // 2]),
                      (runs[0] / "summary.json", lambda t: "[1, 2]")):
        path.write_text(cut(path.read_text()))
        capsys.readouterr()
        assert main(argv) == 0
        assert "1 trained, 1 from the cache" in capsys.readouterr().out
        assert json.loads(path.read_text())  # written whole again
    # metrics.csv gone: the time to the target was "not reached" of a run that reached it; now trained again
    (runs[0] / "metrics.csv").unlink()
    assert main(argv) == 0
    assert "1 trained, 1 from the cache" in capsys.readouterr().out and (runs[0] / "metrics.csv").is_file()
    # a directory in its place: an IsADirectoryError traceback; now the one line of a folder deeprnn cannot clear
    (runs[0] / "metrics.csv").unlink()
    (runs[0] / "metrics.csv").mkdir()
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"deeprnn: error: cannot overwrite run directory {runs[0]}: {runs[0]}/metrics.csv "
                                       "was not written by deeprnn; move it away or use another --runs-dir\n")
    (runs[0] / "metrics.csv").rmdir()
    assert main(argv) == 0
    capsys.readouterr()
    evals = runs[1] / "eval.json"
    evals.write_text(evals.read_text()[:10])
    assert main(argv) == 0
    assert "0 trained, 2 from the cache" in capsys.readouterr().out
    assert json.loads(evals.read_text())[str(tiny_text)]["ppl"] > 1  # scored again
    assert (out / "results.csv").read_text().count("\n") == before.count("\n")


def test_an_interrupted_run_continues_when_the_compare_command_is_run_again(tmp_path, tiny_text, monkeypatch):
    """Ctrl-C during compare used to print ``resume with: deeprnn train --resume RUNS/<key>`` while the same
    compare command, run again, trained that run from step 0. Now the hint names the compare command, and
    it resumes the run from its checkpoint; the wall time adds both sessions."""
    from deeprnn.train import TrainingInterrupted, request_stop

    spec = compare.GridSpec(cells=["gru"], layers=[1], hiddens=[8],
                            data=[compare.DataVariant("tiny", [str(tiny_text)])],
                            base=compare.parse_set([*TINY_SET, "max_steps=8", "eval_every=2"]))
    out = tmp_path / "r"

    def ctrl_c_at_step_4(line: str) -> None:
        if line.startswith("epoch") and " step 4:" in line:
            request_stop(signal.SIGINT)  # as the SIGINT handler does

    clock = iter([10.0, 13.5, 100.0, 102.0])  # compare's wall clock: 3.5 s to the interrupt, then 2 s more
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=lambda: next(clock),
                                                               strftime=time.strftime))
    with pytest.raises(TrainingInterrupted) as err:
        compare.run_compare(spec, out, log=lambda *_: None, train_log=ctrl_c_at_step_4)
    (run,) = (out / "runs").iterdir()
    assert str(err.value) == "SIGINT received: checkpoint saved; resume with: the same deeprnn compare command"
    info = json.loads((run / "compare.json").read_text())
    assert info["interrupted"] is True and info["wall_s_so_far"] == 3.5 and info["wall_s"] is None
    # stopped at step 5, between two evaluations: not evaluated there (last/ holds step 5's training loss)
    assert [r["step"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["2", "4"]

    said = []
    result = compare.run_compare(spec, out, log=said.append)
    assert said[0] == f"[1/1] gru 1x8 concise seed 0: continuing ({run})"
    assert result["trained"] == 1
    assert [r["step"] for r in csv.DictReader(open(run / "metrics.csv"))] == ["2", "4", "6", "8"]  # resumed
    done = json.loads((run / "compare.json").read_text())
    assert "interrupted" not in done and "wall_s_so_far" not in done
    assert done["wall_s"] == 5.5  # both sessions
    assert result["records"][0]["steps"] == 8


def test_a_file_where_a_run_goes_is_one_line(tmp_path, tiny_text, capsys):
    argv = ["compare", "--cells", "gru", "--layers", "1", "--hiddens", "8", "--corpus", f"tiny={tiny_text}",
            "--epochs", "1", "--out", str(tmp_path / "r"), *_set_flags(TINY_SET)]
    (point,) = compare.expand_grid(compare.spec_from_args(build_parser().parse_args(argv)))
    (tmp_path / "r" / "runs").mkdir(parents=True)
    (tmp_path / "r" / "runs" / point.key).write_text("mine")
    line = _one_error_line(capsys, argv)
    assert line == (f"deeprnn: error: {tmp_path / 'r' / 'runs' / point.key} is a file where compare keeps this run; "
                    "move it away")
    assert (tmp_path / "r" / "runs" / point.key).read_text() == "mine"


def _one_error_line(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_out_or_runs_dir_that_is_a_file_is_one_line(tmp_path, tiny_text, capsys):
    """Refused before any training (it used to train, then stop with a FileExistsError traceback)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    grid = ["compare", "--cells", "lstm", "--hiddens", "8", "--layers", "1", "--epochs", "1",
            "--corpus", f"tiny={tiny_text}", *_set_flags(TINY_SET)]
    line = _one_error_line(capsys, [*grid, "--out", str(afile)])
    assert line == f"deeprnn: error: --out {afile} is a file, not a directory; choose another --out"
    out = tmp_path / "report"
    line = _one_error_line(capsys, [*grid, "--out", str(out), "--runs-dir", str(afile)])
    assert line == f"deeprnn: error: --runs-dir {afile} is a file, not a directory; choose another --runs-dir"
    line = _one_error_line(capsys, [*grid, "--out", str(afile / "sub")])
    assert line == f"deeprnn: error: cannot write into --out {afile / 'sub'}: Not a directory; choose another --out"
    assert afile.read_text() == "x" and not out.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_out_that_cannot_be_written_is_one_line_before_training(tmp_path, tiny_text, capsys):
    """A directory that exists but takes no files (/proc/self here; a read-only folder for most users):
    the whole grid used to train, then end in a FileNotFoundError/PermissionError traceback."""
    grid = ["compare", "--cells", "lstm", "--hiddens", "8", "--layers", "1", "--epochs", "1",
            "--corpus", f"tiny={tiny_text}", *_set_flags(TINY_SET), "--runs-dir", str(tmp_path / "runs")]
    line = _one_error_line(capsys, [*grid, "--out", "/proc/self"])
    assert line == "deeprnn: error: cannot write into --out /proc/self: No such file or directory; choose another --out"
    assert not (tmp_path / "runs").exists()  # nothing trained


@pytest.mark.parametrize("kind", ["latin-1", "directory"])
def test_notes_that_cannot_be_read_are_one_line_before_training(tmp_path, tiny_text, capsys, kind):
    """``OUT/notes.md`` (hand-written notes appended to the report) that is not UTF-8, or is a directory: a
    UnicodeDecodeError / IsADirectoryError traceback after training, with results.csv already rewritten."""
    out = tmp_path / "report"
    out.mkdir()
    notes = out / "notes.md"
    notes.write_bytes("café\n".encode("latin-1")) if kind == "latin-1" else notes.mkdir()
    grid = ["compare", "--cells", "lstm", "--hiddens", "8", "--layers", "1", "--epochs", "1",
            "--corpus", f"tiny={tiny_text}", *_set_flags(TINY_SET), "--out", str(out)]
    why = "not UTF-8 text" if kind == "latin-1" else "Is a directory"
    assert _one_error_line(capsys, grid) == (f"deeprnn: error: {notes} cannot be read for the report's Notes section "
                                             f"({why}); fix or move it, or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == ["notes.md"]


@pytest.mark.parametrize("name", ["report.md", "results.csv", "curves.png", "speed.png"])
def test_report_never_replaces_a_file_it_did_not_write(tmp_path, tiny_text, capsys, name):
    """A report.md, results.csv or plot of the user's in --out is refused before training; the report's own
    files are replaced when it is written again."""
    out = tmp_path / "report"
    out.mkdir()
    mine = out / name
    mine.write_bytes(b"my own notes\n")
    argv = ["compare", "--cells", "lstm", "--hiddens", "8", "--layers", "1", "--epochs", "1",
            "--corpus", f"tiny={tiny_text}", "--out", str(out), *_set_flags(TINY_SET)]
    line = _one_error_line(capsys, argv)
    assert line == (f"deeprnn: error: {mine} was not written by deeprnn compare and would be replaced; "
                    "move it away or choose another --out")
    assert mine.read_bytes() == b"my own notes\n" and sorted(out.iterdir()) == [mine]
    if name != "report.md":
        return  # one full round trip is enough
    mine.unlink()
    (out / "notes.md").write_text("findings")
    assert main(argv) == 0
    assert main(argv) == 0  # its own files: replaced
    assert "1 from the cache" in capsys.readouterr().out
    assert (out / "notes.md").read_text() == "findings" and "findings" in (out / "report.md").read_text()


def test_a_users_matplotlib_plot_is_not_taken_for_the_reports(tmp_path):
    """A plot is the report's own when it carries the report's PNG tag; an untagged Matplotlib PNG of the
    same name is the user's, unless it sits beside a report.md deeprnn wrote (reports from before the tag)."""
    plt = compare._plt()
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    theirs, ours = tmp_path / "theirs" / "curves.png", tmp_path / "ours" / "curves.png"
    for path, meta in ((theirs, None), (ours, compare.PNG_METADATA)):
        path.parent.mkdir()
        fig.savefig(path, metadata=meta)
    plt.close(fig)
    assert b"Matplotlib" in theirs.read_bytes()[:4096]
    assert not compare._is_own_report_file(theirs)
    assert compare._is_own_report_file(ours)
    (theirs.parent / "report.md").write_text("my report\n")
    assert not compare._is_own_report_file(theirs)
    (theirs.parent / "report.md").write_text(f"# old report\n\n{compare._REPORT_TAIL}\n")
    assert compare._is_own_report_file(theirs)


def test_a_corpus_path_with_an_equals_sign_or_a_comma_is_that_file(tmp_path, monkeypatch):
    """"v=2/a.txt" was read as label v, file 2/a.txt ("no such file"), and "c,d.txt" as two sources: a path that
    exists is the file itself; LABEL=SRC,SRC is read as before otherwise."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v=2").mkdir()
    (tmp_path / "v=2" / "a.txt").write_text("x")
    (tmp_path / "c,d.txt").write_text("x")
    assert compare.parse_variant("v=2/a.txt") == compare.DataVariant("v=2/a.txt", ["v=2/a.txt"])
    assert compare.parse_variant("c,d.txt") == compare.DataVariant("c,d.txt", ["c,d.txt"])
    assert compare.parse_variant("both=a.txt,b.txt") == compare.DataVariant("both", ["a.txt", "b.txt"])
    assert compare.parse_variant("timemachine") == compare.DataVariant("timemachine", ["timemachine"])


def test_set_reads_booleans_strictly():
    """``--set residual=maybe`` is neither true nor false: an error naming the field, not a silent False."""
    from deeprnn.compare import parse_set

    assert parse_set(["residual=yes", "tie_weights=0"]) == {"residual": True, "tie_weights": False}
    with pytest.raises(ConfigError) as err:
        parse_set(["residual=maybe"])
    assert str(err.value) == "--set: residual must be of type bool, got 'maybe'"


def test_cache_key_holds_what_precision_auto_means_here():
    """A run cached where auto meant bf16 is not reused where it means fp32: the key is the one of the precision
    auto means here."""
    from deeprnn.compare import config_key
    from deeprnn.precision import resolve_precision
    from deeprnn.train import TrainConfig

    here = resolve_precision("auto", torch.device("cpu"))
    other = {"bf16": "fp32", "fp32": "bf16"}[here]
    auto = config_key(TrainConfig(precision="auto", device="cpu"))
    assert auto == config_key(TrainConfig(precision=here, device="cpu"))
    assert auto != config_key(TrainConfig(precision=other, device="cpu"))


@pytest.mark.parametrize("flag", ["--cells", "--layers", "--hiddens", "--impl", "--seeds"])
def test_an_empty_grid_axis_is_a_usage_error(tmp_path, capsys, flag):
    """``--cells ""`` (or any empty axis) used to write an empty report and exit 0."""
    with pytest.raises(SystemExit) as e:
        main(["compare", flag, " , ", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"deeprnn compare: error: argument {flag}: expected at least one value (comma-separated), got ' , ' "
        "(see deeprnn compare --help)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, repeated", [("--seeds", "0,1,0", "0"), ("--cells", "gru,gru", "gru"),
                                                   ("--layers", "2, 2", "2")])
def test_a_value_given_twice_on_a_grid_axis_is_a_usage_error(tmp_path, capsys, flag, value, repeated):
    """``--seeds 0,0`` trained one run and counted it twice: "seeds 2", ± 0.000."""
    with pytest.raises(SystemExit) as e:
        main(["compare", flag, value, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"deeprnn compare: error: argument {flag}: {repeated} is given twice in {value!r}; give each value once "
        "(see deeprnn compare --help)")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--eval-on", "timemachin"], "unknown corpus 'timemachin'; known corpora: "),
    (["--corpus", "a=timemachine,nothere.txt"], "no such file: 'nothere.txt'; check the path"),
    (["--heldout-from", "nothere/"], "no such file: 'nothere'; check the path"),
])
def test_a_source_that_names_nothing_is_refused_before_training(tmp_path, capsys, argv, message):
    """A typo in --eval-on used to surface after the first run had trained; in --corpus after compare.json
    marked a run folder."""
    assert main(["compare", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deeprnn: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_corpus_messages_name_compares_encoding_flag():
    """Every corpus message's --encoding, as compare spells it (the UTF-16 one came out as '--set encoding=if')."""
    from deeprnn.corpus import unknown_encoding_message

    assert compare._as_compare_flags("x looks binary; pass a text file, or its encoding with --encoding if it is "
                                     "UTF-16") == ("x looks binary; pass a text file, or its encoding with --set "
                                                   "encoding=NAME if it is UTF-16")
    assert compare._as_compare_flags("pass its encoding with --encoding (e.g. --encoding latin-1)") == (
        "pass its encoding with --set encoding=NAME (e.g. --set encoding=latin-1)")
    assert compare._as_compare_flags(unknown_encoding_message("x")).endswith("such as utf-8 or cp1252 to --set "
                                                                              "encoding=NAME")


def test_a_text_that_needs_an_encoding_names_compares_flag(tmp_path, capsys):
    """The corpus's message said "pass its encoding with --encoding", a flag compare does not have."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc \x81\x8d def\n" * 300)  # neither UTF-8 nor Windows-1252
    assert main(["compare", "--corpus", str(bad), "--hiddens", "8", "--layers", "1", "--epochs", "1",
                 "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"deeprnn: error: {bad} is not UTF-8 (byte 0x81 at offset 4) and does not look like Windows-1252 text; pass "
        "its encoding with --set encoding=NAME (e.g. --set encoding=latin-1)")


@pytest.mark.parametrize("argv, message", [
    # two data sets averaged into one row
    (["--corpus", "a=timemachine", "--corpus", "a=timemachine,war-of-the-worlds"],
     "--corpus label 'a' names two variants; give each its own LABEL="),
    (["--target-ppl", "nan"], "--target-ppl must be a number > 1 (a perplexity is at least 1), got nan"),
    (["--target-ppl", "-5"], "--target-ppl must be a number > 1 (a perplexity is at least 1), got -5.0"),
    (["--runs-dir", " "], "--runs-dir is empty; name a directory, or drop --runs-dir for the default"),
    # found only once compare.json had marked a run folder, before
    # (compare has no --encoding: the message named it)
    (["--set", "encoding=nope"], "unknown encoding 'nope'; pass a Python codec name such as utf-8 or cp1252 to "
                                 "--set encoding=NAME"),
    (["--set", "encoding=rot13"], "unknown encoding 'rot13'; pass a Python codec name such as utf-8 or cp1252 to "
                                  "--set encoding=NAME"),
    # a preset's one-minute budget silently replaced these
    (["--preset", "gru-vs-lstm", "--set", "time_budget=0.05"],
     "time_budget is a grid axis or compare option; use --minutes instead of --set"),
    (["--set", "num_epochs=1"], "num_epochs is a grid axis or compare option; use --epochs instead of --set"),
    # found when the point started, after the points before it had trained
    (["--corpus", "both=timemachine,war-of-the-worlds", "--corpus", "tm=timemachine", "--heldout-from",
      "war-of-the-worlds"],
     "--heldout-from war-of-the-worlds: variant 'tm' trains on none of these (timemachine), so it would have no "
     "held-out text; name a source of every variant, or compare these variants separately"),
    (["--corpus", "both=timemachine,war-of-the-worlds", "--corpus", "tm=timemachine", "--set", "source_weights=2,1"],
     "--set source_weights has 2 values but variant 'tm' has 1 source (timemachine); give one weight per source, "
     "in order, or weight sources by name with --weights SRC=W"),
    (["--corpus", "both=timemachine,war-of-the-worlds", "--set", "source_weights=2,1", "--weights",
      "timemachine=3"], "--set source_weights and --weights both weight the training text; use one of them"),
    (["--heldout-from", ""], "--heldout-from is empty; name the sources that give validation/test text, or drop it "
                             "to hold out part of every source"),
    # ignored, or two identical columns
    (["--weights", "balance"], "--weights balance weights the sources of a multi-source --corpus variant, and no "
                               "variant has several sources; drop --weights or give a variant SRC,SRC"),
    (["--eval-on", "timemachine,timemachine"], "--eval-on names 'timemachine' twice; give each source once"),
    (["--minutes", "inf"], "minutes must be a finite number > 0, got inf"),
])
def test_a_grid_that_would_mislead_is_refused(tmp_path, capsys, argv, message):
    assert main(["compare", *argv, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"deeprnn: error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_the_cache_key_holds_the_text_of_corpus_files_not_their_path(tmp_path, monkeypatch):
    """Two folders each with a text.txt of other text, sharing a --runs-dir, shared one run: the second report
    showed the first text's numbers as its own. So did a corpus file edited in place."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d, text in ((one, "the time machine " * 50), (two, "the war of the worlds " * 50)):
        d.mkdir()
        (d / "text.txt").write_text(text)

    def key(cwd, corpus="text.txt"):
        monkeypatch.chdir(cwd)
        return compare.expand_grid(compare.GridSpec(data=[compare.DataVariant("t", [corpus])]))[0].key

    assert key(one) != key(two)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "text.txt").write_bytes((one / "text.txt").read_bytes())
    assert key(tmp_path / "copy") == key(one) == key(tmp_path, "one/text.txt")  # the same text, wherever it lies
    before = key(one)
    (one / "text.txt").write_text("edited " * 50)
    assert key(one) != before
    assert key(tmp_path, "one") != key(tmp_path, "two")  # a directory of .txt files: by their names and bytes
    assert compare.source_identity("timemachine") == "timemachine"  # a named corpus: its checksum-verified name
    assert compare.source_identity(str(tmp_path / "missing.txt")) == str(tmp_path / "missing.txt")


def test_heldout_from_holds_out_what_each_variant_has_and_the_report_says_so(tmp_path):
    """--heldout-from A,B with a variant of A alone holds out A; the two variants are then scored on different
    held-out text, so the report names no most accurate configuration (it used to, comparing the two)."""
    spec = compare.GridSpec(data=[compare.DataVariant("tm", ["timemachine"]),
                                  compare.DataVariant("both", compare.WELLS)])
    for v in spec.data:
        v.heldout_from = list(compare.WELLS)
    assert [compare.held_sources(v) for v in spec.data] == [["timemachine"], compare.WELLS]
    records = [{"label": v.label, "data": v.label, "cell": "lstm", "layers": 1, "hiddens": 8, "impl": "concise",
                "seed": 0, "key": v.label, "best_val_ppl": ppl, "best_val_bpc": 2.0, "final_val_ppl": ppl,
                "final_val_bpc": 2.0, "test_ppl": ppl, "test_bpc": 2.0, "train_ppl": ppl, "tokens": 100.0,
                "tokens_per_s": 1000.0, "train_time_s": 1.0, "wall_s": 1.0, "steps": 3, "epochs": 1.0,
                "target_ppl": None, "time_to_target_s": None, "stop_reason": "max_steps", "cached": False,
                "run_dir": str(tmp_path), "parameters": 10}
               for v, ppl in zip(spec.data, (5.0, 4.0))]
    compare.write_report(tmp_path / "out", spec, records)
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "they compare across rows only where those sources agree" in report
    assert "Lowest held-out perplexity" not in report


def test_the_report_is_utf8_whatever_the_locale(tmp_path, shared_data):
    """Under a locale that is not UTF-8 the report's '±' was a UnicodeEncodeError after the whole grid had
    trained, leaving an empty report.md that every later run refused as not compare's own."""
    script = f"""
from pathlib import Path
from deeprnn import compare
spec = compare.GridSpec(seeds=[0, 1], base={{"token": "word"}})
recs = [dict(label="lstm 2x256 concise", data="timemachine", cell="lstm", layers=2, hiddens=256, impl="concise",
             seed=s, key=str(s), best_val_ppl=5.0 + s, best_val_bpc=2.0, final_val_ppl=5.0, final_val_bpc=2.0,
             test_ppl=5.0, test_bpc=2.0, train_ppl=4.0, tokens=100.0, tokens_per_s=1000.0, train_time_s=1.0,
             wall_s=1.0, steps=3, epochs=1.0, target_ppl=None, time_to_target_s=None, stop_reason="max_steps",
             cached=False, run_dir=".", parameters=10) for s in (0, 1)]
compare.write_report(Path({str(tmp_path / "out")!r}), spec, recs)
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "ascii"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| 5.500 ± 0.707 |" in report and "bpc = bits per word = log2 of perplexity." in report
    assert compare._is_own_report_file(tmp_path / "out" / "report.md")
    assert (tmp_path / "out" / "results.csv").read_text(encoding="utf-8").startswith(compare._RESULTS_HEAD)


def test_a_changed_preset_says_so_above_its_description(tmp_path):
    args = argparse.Namespace(preset="gru-vs-lstm", cells=["lstm"], layers=[1], hiddens=[16], impl=None, seeds=None,
                              eval_on=None, corpus=None, heldout_from=None, weights=None, target_ppl=None, set=None,
                              minutes=None, epochs=None)
    spec = compare.spec_from_args(args)
    assert spec.description.startswith("*Changed from the preset `gru-vs-lstm`:* `--cells lstm --layers 1 --hiddens "
                                       "16`; the description below is the preset's.\n\nWhich cell is more accurate")
    args.cells = args.layers = args.hiddens = None
    assert compare.spec_from_args(args).description == compare.PRESETS["gru-vs-lstm"]["description"]
    args.set, args.minutes = ["lr=0.5"], 0.5  # the recipe the description states, and its budget
    assert compare.spec_from_args(args).description.startswith(
        "*Changed from the preset `gru-vs-lstm`:* `--minutes 0.5 --set lr=0.5`; the description below is the preset's.")


def test_named_corpora_keep_their_cache_keys():
    """The key of a run on named corpora is what it was before file corpora were keyed by their bytes, so no
    finished run of the committed reports' kind trains again (fp32 here: auto's meaning is the machine's)."""
    spec = compare.GridSpec(cells=["gru", "lstm"], base={**compare.BOOK_RECIPE, "precision": "fp32"},
                            data=[compare.DataVariant("tm", ["timemachine"]),
                                  compare.DataVariant("both", compare.WELLS, heldout_from=["timemachine"])])
    assert [p.key for p in compare.expand_grid(spec)] == ["b76453ba77b5", "16e6ee45b550", "99e963887d86",
                                                          "210618d56bb0"]  # computed by the code of d5b776e


def test_a_rerun_refused_for_a_foreign_file_keeps_the_cached_result(tmp_path, tiny_text, capsys):
    """--rerun of a point whose folder holds a file deeprnn did not write: train refused it, but only after
    compare had deleted the point's summary.json, so the next plain compare trained the finished run again."""
    out = tmp_path / "out"
    argv = ["compare", "--layers", "1", "--hiddens", "8", "--corpus", f"tiny={tiny_text}", "--epochs", "1",
            "--out", str(out), *_set_flags(TINY_SET)]
    assert main(argv) == 0
    (run,) = (out / "runs").iterdir()
    (run / "best" / "mine.txt").write_text("my notes\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*argv, "--rerun"]) == 2
    assert capsys.readouterr().err == (f"deeprnn: error: cannot overwrite run directory {run}: {run}/best/mine.txt "
                                       "was not written by deeprnn; move it away or use another --runs-dir\n")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    (run / "best" / "mine.txt").unlink()
    assert main(argv) == 0
    assert "0 trained, 1 from the cache" in capsys.readouterr().out


def test_a_point_another_process_is_training_is_refused_before_anything_changes(tmp_path, tiny_text, capsys,
                                                                                lock_holder):
    """A second compare of a grid whose point was still training rewrote the point's compare.json (and its
    data/) before the run's lock refused it; now nothing in the point's folder changes."""
    out = tmp_path / "out"
    argv = ["compare", "--layers", "1", "--hiddens", "8", "--corpus", f"tiny={tiny_text}", "--epochs", "1",
            "--out", str(out), *_set_flags(TINY_SET)]
    assert main(argv) == 0
    (run,) = (out / "runs").iterdir()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    holder = lock_holder(run)
    capsys.readouterr()
    assert main([*argv, "--rerun"]) == 2
    assert capsys.readouterr().err == (f"deeprnn: error: run directory {run} is in use by another deeprnn process "
                                       f"(pid {holder.pid}); wait for it to finish, or stop it, and try again\n")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".deeprnn.pid"} == {
        k: v for k, v in before.items() if k != ".deeprnn.pid"}
