"""The command line: train -> generate -> evaluate -> info, and one-line errors for bad input."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from deeprnn.cli import CHOICES, PRESETS, build_parser, build_train_config, main
from deeprnn.errors import ConfigError
from deeprnn.train import TrainConfig

TINY = ["--num-layers", "1", "--num-hiddens", "16", "--batch-size", "4", "--num-steps", "8",
        "--max-tokens", "2000", "--max-steps", "6", "--eval-batch-size", "4", "--sample-every", "0",
        "--precision", "fp32", "--quiet"]


@pytest.fixture
def trained(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "held-out test perplexity" in out
    return run


def one_error_line(capsys, code_expected, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == code_expected, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_train_generate_evaluate_info(trained, capsys):
    assert main(["generate", str(trained), "--prefix", "time traveller", "--num-preds", "20",
                 "--strategy", "greedy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("time traveller") and len(out.rstrip("\n")) == len("time traveller") + 20

    assert main(["generate", str(trained), "--num-preds", "10", "--num-samples", "3", "--seed", "1",
                 "--json"]) == 0
    samples = json.loads(capsys.readouterr().out)["samples"]
    assert len(samples) == 3 and all(s.startswith("time traveller") for s in samples)

    # Scored as training scored its test split (streams of 4, windows of 128): the same tokens, the same loss.
    assert main(["evaluate", str(trained), "--split", "test", "--batch-size", "4", "--num-steps", "128",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((trained / "summary.json").read_text())
    assert result["split"] == "test"
    assert (result["tokens"], result["loss_nats"], result["perplexity"]) == (
        summary["test_tokens"], summary["test_loss"], summary["test_ppl"])
    assert result["bits_per_token"] == pytest.approx(result["loss_nats"] / 0.6931471805599453)

    assert main(["info", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "concise lstm 1x16" in out and "trained from scratch" in out


def test_evaluate_train_split_is_the_text_trained_on(trained, capsys):
    """The run kept the first 2,000 training tokens (--max-tokens); 'train' scores exactly those: one
    stream of 1,999 predictions. The held-out splits stay whole, as training scored them."""
    assert main(["evaluate", str(trained), "--split", "train", "--batch-size", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 1999
    assert main(["evaluate", str(trained), "--split", "valid", "--batch-size", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 8529  # 5% of the 170,580 characters


def test_evaluate_reads_the_runs_file_in_the_runs_encoding(tmp_path, capsys):
    """A run trained on a latin-1 file with --encoding is evaluated without repeating it. Byte 0x81 is
    latin-1's U+0081 but undefined in Windows-1252, which is what deeprnn guesses for a file that is not
    UTF-8; evaluate used to guess, and stop at that byte."""
    text = ("the caf\u00e9 on the corner \u0081 sold postcards of the time machine " * 60).encode("latin-1")
    (tmp_path / "cafe.txt").write_bytes(text)
    run = tmp_path / "run"
    argv = ["train", *TINY, "--corpus", str(tmp_path / "cafe.txt"), "--encoding", "latin-1",
            "--normalization", "raw", "--run-dir", str(run)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "valid", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["tokens"], result["unknown_tokens"]) == (180, 0)  # 4 streams, as the run scored (64: 128)


def test_evaluate_counts_what_it_scored(trained, tmp_path, capsys):
    """The unknown tokens are counted among the tokens scored (over the whole split they outnumbered them:
    "1,196 tokens (1,200 unknown)"), a text mostly outside the vocabulary is warned of, --json's batch_size is the
    streams used (a short split takes fewer), and a text normalisation leaves empty does not suggest another
    normalisation, which evaluate cannot take."""
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("the time machine 1234567890 " * 20)  # d2l: 339 characters, every one in the vocabulary
    assert main(["evaluate", str(trained), "--corpus", str(mixed), "--split", "all", "--batch-size", "100000",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (result["batch_size"], result["tokens"], result["unknown_tokens"], err) == (169, 338, 0, "")
    odd = tmp_path / "odd.txt"
    odd.write_text("\u00e9\u00e8" * 300)  # no letter a-z: d2l leaves nothing
    line = one_error_line(capsys, 2, ["evaluate", str(trained), "--corpus", str(odd), "--split", "all"])
    assert line == (f"deeprnn: error: {str(odd)!r} has no tokens after 'd2l' normalisation, the one the model was "
                    "trained with; pass a text in the model's alphabet")
    # a raw model knows the characters of its text only: an unknown one is a token, scored as <unk>
    (tmp_path / "ab.txt").write_text("abba baab " * 300)
    run = tmp_path / "ab"
    assert main(["train", *TINY, "--corpus", str(tmp_path / "ab.txt"), "--normalization", "raw",
                 "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--corpus", str(odd), "--split", "all", "--batch-size", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert (result["tokens"], result["unknown_tokens"]) == (4 * 149, 4 * 149)  # the first token and 3 left over
    assert err == ("deeprnn: warning: 596 of the 596 tokens scored are <unk> (outside the model's vocabulary); the "
                   "perplexity says little about this text\n")


def test_resume_continues_and_extends_budget(trained, capsys):
    assert main(["train", "--resume", str(trained), "--max-steps", "9", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "done (max_steps): 9 steps" in out


def test_errors_are_one_line(tmp_path, trained, capsys):
    line = one_error_line(capsys, 2, ["train", *TINY, "--run-dir", str(trained)])
    assert line == (f"deeprnn: error: run directory {trained} already exists; pass --resume {trained} to continue it, "
                    "--overwrite to replace it, or choose another --run-dir")

    line = one_error_line(capsys, 2, ["generate", str(tmp_path / "missing")])
    assert line == f"deeprnn: error: no such run or checkpoint: {tmp_path / 'missing'}"

    line = one_error_line(capsys, 2, ["train", "--corpus", str(tmp_path / "nope.txt"), "--run-dir",
                                      str(tmp_path / "r2")])
    assert line == f"deeprnn: error: no such file: {str(tmp_path / 'nope.txt')!r}; check the path"

    line = one_error_line(capsys, 2, ["generate", str(trained), "--prefix", "Time Traveller!"])
    assert line == ("deeprnn: error: prefix has characters not in the vocabulary: 'T', '!' (the model was trained on "
                    "'d2l'-normalised text; normalised so, the prefix is 'time traveller': pass that); use --unk "
                    "replace to map them to <unk>")

    line = one_error_line(capsys, 2, ["train", *TINY, "--lr", "-1", "--run-dir", str(tmp_path / "r3")])
    assert line == "deeprnn: error: lr must be > 0, got -1.0"

    line = one_error_line(capsys, 2, ["train", "--resume", str(trained), "--num-hiddens", "32"])
    assert line == (f"deeprnn: error: num_hiddens differs from the run in {trained} (16 there, 32 now); resume without "
                    "changing it, or start a new run")

    small = tmp_path / "small.txt"
    small.write_text("abc def " * 5)
    line = one_error_line(capsys, 2, ["train", "--corpus", str(small), "--run-dir", str(tmp_path / "r4"),
                                      "--quiet"])
    assert line == ("deeprnn: error: the training split has 35 tokens (the corpus has 39) but batch_size=32 and "
                    "num_steps=64 need at least 2112 (batch_size*num_steps + num_steps); use more text or smaller sizes")


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deeprnn train: error: unrecognized arguments: --no-such-flag (see deeprnn train --help)"]
    with pytest.raises(SystemExit):
        main(["train", "--cell", "transformer"])
    assert "invalid choice: 'transformer'" in capsys.readouterr().err


def test_config_file(tmp_path, capsys):
    good = tmp_path / "c.toml"
    good.write_text('[train]\nnum_layers = 1\nnum_hiddens = 12\nbatch_size = 4\nnum_steps = 8\nmax_steps = 2\n'
                    'max_tokens = 2000\neval_batch_size = 4\nsample_every = 0\nprecision = "fp32"\n')
    # flags win over the file
    assert main(["train", "--config", str(good), "--num-hiddens", "10", "--run-dir", str(tmp_path / "r"),
                 "--quiet"]) == 0
    capsys.readouterr()
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["num_hiddens"] == 10 and cfg["num_layers"] == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("num_layerz = 2\n")
    line = one_error_line(capsys, 2, ["train", "--config", str(bad)])
    assert line == f"deeprnn: error: {bad}: unknown key 'num_layerz'; see deeprnn train --help for the options"
    bad.write_text('num_layers = "two"\n')
    line = one_error_line(capsys, 2, ["train", "--config", str(bad)])
    assert line == f"deeprnn: error: {bad}: num_layers must be of type int, got str 'two'"
    bad.write_text('source_weights = ["two", 1]\n')
    line = one_error_line(capsys, 2, ["train", "--config", str(bad)])
    assert line == f"deeprnn: error: {bad}: source_weights must be a list of numbers, got ['two', 1]"
    # "train" that is not a table was an AttributeError traceback; keys beside [train] were silently ignored
    for text, problem in [("train = 5\n", "'train' must be a table ([train]), got int 5"),
                          ('train = "x"\n', "'train' must be a table ([train]), got str 'x'"),
                          ("[[train]]\nnum_layers = 1\n", "'train' must be a table ([train]), got list "
                                                            "[{'num_layers': 1}]"),
                          ("num_hiddens = 8\n[train]\nnum_layers = 1\n",
                           "'num_hiddens' is outside the [train] table, where it would be ignored; put every option "
                           "under [train], or all of them at the top level"),
                          ('[train]\nnum_layers = 1\n[model]\ncell = "gru"\n',
                           "'model' is outside the [train] table, where it would be ignored; put every option "
                           "under [train], or all of them at the top level")]:
        bad.write_text(text)
        assert one_error_line(capsys, 2, ["train", "--config", str(bad)]) == f"deeprnn: error: {bad}: {problem}"


@pytest.mark.parametrize("argv, message", [
    (["--momentum", "0.9"], "--momentum 0.9 has no effect with optimizer 'adam' (the default); it is read only with "
                            "optimizer 'sgd': drop it, or set --optimizer"),
    (["--optimizer", "sgd", "--beta2", "0.95"], "--beta2 0.95 has no effect with optimizer 'sgd'; it is read only "
                                                "with optimizer 'adam' or 'adamw': drop it, or set --optimizer"),
    (["--ema-start", "100"], "--ema-start 100 has no effect with ema_decay 0.0 (the default); it is read only with "
                             "ema_decay > 0 (a weight average, e.g. 0.998): drop it, or set --ema-decay"),
    (["--preset", "tm-cpu", "--lr-gamma", "0.3"], "--lr-gamma 0.3 has no effect with schedule 'constant' (--preset "
                                                  "tm-cpu's); it is read only with schedule 'step' or 'plateau': drop "
                                                  "it, or set --schedule"),
    (["--schedule", "step", "--min-lr-ratio", "0.1"], "--min-lr-ratio 0.1 has no effect with schedule 'step'; it is "
                                                      "read only with schedule 'cosine' or 'wsd': drop it, or set "
                                                      "--schedule"),
    (["--residual", "--num-layers", "1"], "--residual has no effect with num_layers 1; it is read only with "
                                          "num_layers > 1 (the connections join stacked layers): drop it, or set "
                                          "--num-layers"),
    (["--warmup-steps", "5", "--schedule", "plateau"], "--warmup-steps 5 has no effect with schedule 'plateau'; it "
                                                       "is read only with schedule 'constant' or 'cosine' or 'wsd': "
                                                       "drop it, or set --schedule"),
])
def test_an_option_the_run_would_not_read_is_refused(tmp_path, capsys, argv, message):
    """--momentum with Adam used to train as if it were not there; now the one line says so, before any text is
    read."""
    run = tmp_path / "run"
    assert one_error_line(capsys, 2, ["train", *argv, "--run-dir", str(run)]) == f"deeprnn: error: {message}"
    assert not run.exists()


def test_an_option_unused_by_a_config_file_or_a_preset(tmp_path, capsys):
    """A config file's key is the user's too; a preset's own settings give way to the flags that make them
    unused (tm-cpu's Adam beta2 under --optimizer sgd), and a default value is no contradiction."""
    conf = tmp_path / "c.toml"
    conf.write_text('optimizer = "sgd"\nbeta1 = 0.8\n')
    assert one_error_line(capsys, 2, ["train", "--config", str(conf)]) == (
        f"deeprnn: error: {conf}: beta1 = 0.8 has no effect with optimizer 'sgd' (from {conf}); it is read only with "
        "optimizer 'adam' or 'adamw': remove it, or set optimizer")
    args = build_parser().parse_args(["train", "--preset", "tm-cpu", "--optimizer", "sgd", "--lr", "1",
                                      "--momentum", "0.9", "--beta1", "0.9"])
    cfg = build_train_config(args)
    assert (cfg.optimizer, cfg.beta2, cfg.momentum) == ("sgd", 0.95, 0.9)
    assert [name for name, _, _ in cfg.unused_options()] == ["beta2"]  # the preset's, so not refused
    # from Python the fields stay the user's to set: only the command line refuses
    assert TrainConfig(momentum=0.5, ema_start=3).unused_options() == [
        ("momentum", "optimizer", "'sgd'"), ("ema_start", "ema_decay", "> 0 (a weight average, e.g. 0.998)")]


def test_source_weights_from_file_and_flag(tmp_path, capsys):
    """A list of numbers from TOML (ints become floats) and from ``--source-weights``; a bad count is one line."""
    from deeprnn.cli import config_from_mapping

    assert config_from_mapping({"source_weights": [2, 0.5]}, "c.toml") == {"source_weights": [2.0, 0.5]}
    line = one_error_line(capsys, 2, ["train", "--source-weights", "2", "1", "--max-steps", "1",
                                      "--run-dir", str(tmp_path / "r")])
    assert line == ("deeprnn: error: source_weights has 2 values but the corpus has 1 sources (timemachine); "
                    "give one weight per source, in that order")
    line = one_error_line(capsys, 2, ["train", "--source-weights", "0", "--run-dir", str(tmp_path / "r2")])
    assert line == "deeprnn: error: source_weights must be a list of numbers in (0, 1,000] (one per source), got [0.0]"


def test_corpora_lists_names(capsys):
    assert main(["corpora"]) == 0
    out = capsys.readouterr().out
    for name in ("timemachine", "war-of-the-worlds", "tinyshakespeare"):
        assert name in out


def test_corpora_says_cached_only_for_a_file(tmp_path, capsys):
    """A directory of the corpus file's name in the cache directory was reported "cached", and training then
    said the corpus was not there."""
    from deeprnn.corpus import NAMED_CORPORA

    (tmp_path / NAMED_CORPORA["tinyshakespeare"].filename).mkdir()
    (tmp_path / NAMED_CORPORA["war-of-the-worlds"].filename).write_text("text")
    assert main(["corpora", "--data-dir", str(tmp_path)]) == 0
    status = {ln.split()[0]: ln.split()[1] for ln in capsys.readouterr().out.splitlines()[1:]}
    assert (status["tinyshakespeare"], status["war-of-the-worlds"], status["timemachine"]) == (
        "not", "cached", "bundled")
    # A damaged copy (its checksum fails, as training then says) was listed as cached too. The War of the
    # Worlds has no checksum: Gutenberg re-encodes it.
    (tmp_path / NAMED_CORPORA["tinyshakespeare"].filename).rmdir()
    (tmp_path / NAMED_CORPORA["tinyshakespeare"].filename).write_text("First Citizen:\n")
    assert main(["corpora", "--data-dir", str(tmp_path)]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert "corrupt (delete it)" in lines["tinyshakespeare"] and " cached " in lines["war-of-the-worlds"]


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-m", "deeprnn", "train", "--dry-run", "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "held-out test perplexity" in r.stdout
    r = subprocess.run([sys.executable, "-m", "deeprnn", "--version"], capture_output=True, text=True)
    assert r.stdout.startswith("deeprnn ")


def test_dry_run_shrinks_the_job_but_keeps_the_flags_typed(tmp_path):
    """--dry-run put the tiny preset over the flags given with it: --num-hiddens 24 trained 16 units, and
    --precision bf16 (refused on a CPU without AVX-512) trained in fp32, so it checked another setup."""
    from deeprnn.cli import build_parser, build_train_config

    cfg = build_train_config(build_parser().parse_args(
        ["train", "--dry-run", "--preset", "d2l-9.3", "--num-hiddens", "24", "--precision", "bf16"]))
    assert (cfg.num_hiddens, cfg.precision) == (24, "bf16")  # typed
    assert (cfg.num_layers, cfg.batch_size, cfg.max_steps) == (1, 4, 5)  # the tiny preset over d2l-9.3's sizes
    # the sizes and budget, not the precision the run would use (the tiny preset's fp32 replaced a preset's bf16)
    cfg = build_train_config(build_parser().parse_args(["train", "--dry-run", "--preset", "shakespeare-gpu"]))
    assert (cfg.precision, cfg.num_hiddens, cfg.max_steps) == ("bf16", 16, 5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_configuration(name):
    """A preset is a TrainConfig that passes validation (model fields included) before any text is read."""
    cfg = TrainConfig(**PRESETS[name])
    cfg.validate()
    values = dataclasses.asdict(cfg)
    assert {k: values[k] for k in PRESETS[name]} == PRESETS[name]


# The logs docs/quality.md quotes for each CPU twin's figures (benchmarks/results/; each log's second line is the
# configuration it trained). A changed preset no longer has those figures: measure it again.
TWIN_LOGS = {
    "tm-cpu-fp32": [f"quality-tm-cpu-fp32-b24-pshuffle-avx2-seed{seed}-2026-11-28.txt" for seed in range(4)],
    "tm-wells-cpu-fp32": ["quality-exploration-avx2-2026-11-28/tm-wells-fp32-dropout0.1-wd0.1-2threads.txt"]
                         + [f"quality-tm-wells-cpu-fp32-avx2-seed{seed}-2026-11-28.txt" for seed in (1, 2, 3)],
    "shakespeare-cpu-fp32": [f"quality-shakespeare-cpu-fp32-b24-pshuffle-avx2-seed{seed}-2026-11-28.txt"
                             for seed in range(4)],
}


@pytest.mark.parametrize("name", sorted(TWIN_LOGS))
def test_each_cpu_twin_is_the_configuration_its_quoted_runs_trained(name):
    results = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "results")
    for log in TWIN_LOGS[name]:
        with open(os.path.join(results, log), encoding="utf-8") as f:
            text = f.read()
        line = text.splitlines()[1]
        assert line.startswith("preset "), log
        logged = json.loads(line.split(": ", 1)[1])
        if logged["precision"] == "auto" and ", cpu, fp32 (auto); " in text:  # auto meant fp32 on that CPU
            logged["precision"] = "fp32"
        assert TrainConfig(**logged) == TrainConfig(**{**PRESETS[name], "seed": logged["seed"]}), log


def test_a_bf16_tuned_preset_names_its_fp32_twin_where_bf16_is_emulated(monkeypatch, capsys, tmp_path):
    """tm-cpu was tuned where bf16 is native. On a CPU without it (its "auto" is float32 there, several times
    slower per step) a run of it says which preset is tuned for such a CPU; nowhere else."""
    import deeprnn.precision
    from deeprnn.cli import FP32_TWINS, preset_note

    note = ("note: tm-cpu was tuned on a CPU with native bfloat16 (AVX-512); this one has none, so it trains in "
            "float32, several times slower per step; --preset tm-cpu-fp32 is tuned for such a CPU (docs/quality.md)")
    cfg = TrainConfig(**{**PRESETS["tm-cpu"], "device": "cpu"})
    monkeypatch.setattr(deeprnn.precision, "native_bf16", lambda device: False)
    assert preset_note("tm-cpu", cfg) == note
    assert preset_note("tm-cpu", dataclasses.replace(cfg, precision="fp32")) is None  # asked for float32
    assert preset_note("tm-cpu-fp32", TrainConfig(**{**PRESETS["tm-cpu-fp32"], "device": "cpu"})) is None
    assert preset_note(None, cfg) is None
    assert FP32_TWINS == {"tm-cpu": "tm-cpu-fp32", "tm-wells-cpu": "tm-wells-cpu-fp32",
                          "shakespeare-cpu": "shakespeare-cpu-fp32"}
    same = ("corpus", "heldout_from", "source_weights", "normalization", "val_fraction", "test_fraction",
            "eval_batch_size", "eval_num_steps", "time_budget")  # a twin has its preset's text, split, scoring, budget
    for parent, twin in FP32_TWINS.items():
        assert PRESETS[twin]["precision"] == "fp32" and PRESETS[parent]["precision"] == "auto"
        assert {k: PRESETS[twin].get(k) for k in same} == {k: PRESETS[parent].get(k) for k in same}
        if parent != "tm-cpu":
            assert preset_note(parent, TrainConfig(**{**PRESETS[parent], "device": "cpu"})) == (
                note.replace("tm-cpu", parent))
    assert preset_note("shakespeare-gpu", TrainConfig(**PRESETS["shakespeare-gpu"])) is None
    tiny = [a for a in TINY if a not in ("--precision", "fp32", "--quiet")]
    assert main(["train", "--preset", "tm-cpu", *tiny, "--device", "cpu", "--run-dir", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == note
    assert main(["train", "--preset", "tm-cpu", *tiny, "--precision", "fp32", "--device", "cpu",
                 "--run-dir", str(tmp_path / "q")]) == 0
    assert "note:" not in capsys.readouterr().out  # float32 asked for
    monkeypatch.setattr(deeprnn.precision, "native_bf16", lambda device: True)
    assert preset_note("tm-cpu", cfg) is None


def test_run_dir_mistakes_are_one_line(tmp_path, trained, capsys):
    """A file as --run-dir (it used to be a NotADirectoryError traceback), a folder that holds no run, and a
    run's checkpoint folder given to --resume: one line each, exit 2, nothing changed."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra in ([], ["--overwrite"]):
        line = one_error_line(capsys, 2, ["train", *TINY, "--run-dir", str(afile), *extra])
        assert line == f"deeprnn: error: run directory {afile} is a file, not a directory; choose another --run-dir"
    assert afile.read_text() == "x"

    proj = tmp_path / "proj"
    (proj / "best").mkdir(parents=True)
    (proj / "config.json").write_text('{"my": "settings"}')
    (proj / "best" / "draft.txt").write_text("drafts")
    line = one_error_line(capsys, 2, ["train", *TINY, "--run-dir", str(proj), "--overwrite"])
    assert line == (f"deeprnn: error: run directory {proj} is not empty and holds no deeprnn run; "
                    "choose a new or empty --run-dir")
    assert (proj / "config.json").read_text() == '{"my": "settings"}'
    assert (proj / "best" / "draft.txt").read_text() == "drafts"

    line = one_error_line(capsys, 2, ["train", "--resume", str(trained / "best"), "--max-steps", "9", "--quiet"])
    assert line == (f"deeprnn: error: {trained / 'best'} is a checkpoint inside the run {trained}; --resume takes "
                    f"the run directory and continues from its last checkpoint: --resume {trained}")
    assert sorted(p.name for p in (trained / "best").iterdir()) == [
        "checkpoint.json", "model.safetensors", "train_state.safetensors"]


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "temperature must be > 0, got 0.0; use --strategy greedy for the most likely text"),
    (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["--num-preds", "-1"], "num_preds must be >= 0, got -1"),
    (["--prefix", "time traveller!"], "prefix has characters not in the vocabulary: '!' (the model was trained on "
                                      "'d2l'-normalised text; normalised so, the prefix is 'time traveller': pass "
                                      "that); use --unk replace to map them to <unk>"),
])
def test_generate_checks_everything_before_writing(trained, capsys, args, message):
    """Bad arguments print nothing to stdout (the prefix used to come out first, glued to the error)."""
    code = main(["generate", str(trained), *args])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == f"deeprnn: error: {message}\n"


def _child(args, **kw):
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "deeprnn", *args], env=env, **kw)


def test_unseeded_sampling_tells_the_seed_that_draws_it_again(trained, capsys, monkeypatch):
    """Without --seed, the seed drawn is in --json's output and, at a terminal, on a line of stderr before the
    text; passed back, it draws the same samples. Greedy and beam search draw nothing: null, and no line."""
    argv = ["generate", str(trained), "--num-preds", "30", "--num-samples", "2"]
    assert main([*argv, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert isinstance(first["seed"], int) and 0 <= first["seed"] < 2**53
    assert main([*argv, "--json", "--seed", str(first["seed"])]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main([*argv[:2], "--strategy", "greedy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seed"] is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    seed = int(err.split()[2])
    assert err == f"deeprnn: seed {seed} (--seed {seed} draws this text again)\n"
    assert main([*argv, "--seed", str(seed)]) == 0
    assert capsys.readouterr() == (out, "")
    assert main([*argv, "--strategy", "greedy"]) == 0 and capsys.readouterr().err == ""


def test_unk_warning_comes_before_the_text(trained):
    """With stdout and stderr on one terminal the warning is a line of its own, before the generated text."""
    child = _child(["generate", str(trained), "--prefix", "Time", "--unk", "replace", "--num-preds", "5",
                    "--strategy", "greedy"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out
    warning, text, rest = out.split("\n")
    assert warning == "deeprnn: warning: prefix characters not in the vocabulary were fed as <unk>: 'T'"
    assert text.startswith("Time") and len(text) == 4 + 5 and rest == ""


def test_closed_pipe_exits_quietly(trained):
    """``deeprnn generate ... | head -c 20``: status 141 (128 + SIGPIPE) and nothing on stderr, as a shell
    tool would; it used to end with a BrokenPipeError traceback."""
    child = _child(["generate", str(trained), "--num-preds", "100000"], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
    head = child.stdout.read(20)
    child.stdout.close()
    _, err = child.communicate(timeout=120)
    assert head.startswith(b"time traveller") and len(head) == 20
    assert child.returncode == 141 and err == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
@pytest.mark.parametrize("command", [["evaluate", "--split", "valid"], ["generate", "--num-preds", "50"]])
def test_write_error_on_stdout_is_one_line(trained, command):
    """Output to a full device: one line and status 1, not an OSError traceback or an interpreter warning."""
    with open("/dev/full", "w") as full:
        child = _child([command[0], str(trained), *command[1:]], stdout=full, stderr=subprocess.PIPE, text=True)
        _, err = child.communicate(timeout=120)
    assert child.returncode == 1
    assert err == "deeprnn: error: cannot write the output: No space left on device\n"


def test_text_the_outputs_encoding_cannot_write_is_one_line(trained, monkeypatch):
    """A prefix (or a raw model's text) with characters standard output's encoding lacks: one line and status
    1; the UnicodeEncodeError (a ValueError, not an OSError) escaped as a traceback."""
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")
    child = _child(["generate", str(trained), "--prefix", "t\u00efme", "--unk", "replace", "--num-preds", "5",
                    "--strategy", "greedy"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 1 and out == b""
    assert err.decode("ascii").splitlines()[-1] == (
        "deeprnn: error: cannot write the output: standard output's encoding (ascii) cannot write '\\xef'; set "
        "PYTHONIOENCODING=utf-8")


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra, message", [
    (["--init-from", "{run}"], "--resume continues the run in {run} from its own weights and --init-from starts a new "
                               "run from other weights: pass only one of them"),
    (["--overwrite"], "--resume continues the run in {run} and --overwrite replaces it: drop --overwrite to continue "
                      "it, or drop --resume to start it over"),
    (["--dry-run"], "--dry-run starts a new tiny run and cannot continue the run in {run}: drop --dry-run, or drop "
                    "--resume and give --run-dir a new directory"),
    (["--preset", "tiny"], "--resume continues the run in {run} with its own configuration, which --preset would not "
                           "change: drop --preset (flags such as --max-steps still apply)"),
    (["--config", "c.toml"], "--resume continues the run in {run} with its own configuration, which --config would "
                             "not change: drop --config (flags such as --max-steps still apply)"),
    (["--run-dir", "elsewhere"], "--resume continues the run in {run}, in place, and --run-dir names another "
                                 "directory (elsewhere): drop --run-dir (to start a new run from its weights "
                                 "instead, use --init-from)"),
])
def test_resume_with_a_contradicting_flag_is_refused(trained, capsys, extra, message):
    """--init-from, --overwrite, --dry-run, --preset, --config and another --run-dir used to be ignored silently
    under --resume (which then trained on, in place)."""
    before = _files(trained)
    argv = ["train", "--resume", str(trained), "--max-steps", "9", *[a.format(run=trained) for a in extra]]
    line = one_error_line(capsys, 2, argv)
    assert line == "deeprnn: error: " + message.format(run=trained)
    assert _files(trained) == before


def test_resume_with_its_own_run_dir_is_allowed(trained, capsys):
    """--run-dir naming the resumed run itself (another spelling of the same path) contradicts nothing."""
    same = str(trained / ".." / trained.name)
    line = one_error_line(capsys, 2, ["train", "--resume", str(trained), "--run-dir", same])
    assert line == (f"deeprnn: error: the run in {trained} is already at step 6, at or past max_steps 6: nothing to "
                    "train; resume with --max-steps above 6 to train on")


@pytest.mark.parametrize("target", ["{run}", "{run}/best"])
def test_fine_tuning_a_run_into_itself_is_refused(trained, capsys, target):
    """--init-from RUN --run-dir RUN --overwrite used to delete the parent and leave a run whose lineage is
    itself."""
    before = _files(trained)
    line = one_error_line(capsys, 2, ["train", "--init-from", target.format(run=trained), "--run-dir", str(trained),
                                      "--overwrite", "--max-steps", "2"])
    assert line == (f"deeprnn: error: --init-from {target.format(run=trained)} would fine-tune the run in {trained} "
                    "into itself, replacing the weights it starts from: give --run-dir a new directory")
    assert _files(trained) == before


def test_a_run_that_stopped_before_its_first_checkpoint_can_be_started_again(tmp_path, capsys):
    """A new run that died before its first checkpoint (a crash, a closed pipe) leaves config.json only:
    --resume has nothing to continue, so the refusal says to --overwrite it, and that works."""
    run = tmp_path / "r"
    assert main(["train", *TINY, "--run-dir", str(run), "--max-steps", "1"]) == 0
    for name in ("best", "last", "summary.json", "metrics.csv"):
        path = run / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    capsys.readouterr()
    line = one_error_line(capsys, 2, ["train", *TINY, "--run-dir", str(run), "--max-steps", "1"])
    assert line == (f"deeprnn: error: run directory {run} holds a run that stopped before its first checkpoint; "
                    "pass --overwrite to start it again, or choose another --run-dir")
    assert main(["train", *TINY, "--run-dir", str(run), "--max-steps", "1", "--overwrite"]) == 0
    assert (run / "best" / "checkpoint.json").is_file()


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """An allocation that fails (here the CPU allocator's error, raised where the model is built) is one line
    naming the flags that shrink the model, exit 1; the run directory is not created."""
    import deeprnn.models

    def no_memory(*_, **__):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 16000000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(deeprnn.models, "build_model", no_memory)
    line = one_error_line(capsys, 1, ["train", *TINY, "--run-dir", str(tmp_path / "r")])
    assert line == ("deeprnn: error: out of memory: the model or batch does not fit on this device; use a smaller "
                    "--num-hiddens, --num-layers or --batch-size")
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr(deeprnn.models, "build_model", lambda *_, **__: 1 / 0)  # any other error still raises
    with pytest.raises(ZeroDivisionError):
        main(["train", *TINY, "--run-dir", str(tmp_path / "r")])


def test_out_of_memory_in_generate_names_generates_flags(trained, capsys, monkeypatch):
    """``generate --num-samples 100000000`` was told to use a smaller --batch-size, a flag generate lacks."""
    import deeprnn.generate

    def no_memory(*_, **__):
        raise MemoryError()

    monkeypatch.setattr(deeprnn.generate, "generate", no_memory)
    line = one_error_line(capsys, 1, ["generate", str(trained), "--num-samples", "100000000"])
    assert line == ("deeprnn: error: out of memory: the batch of samples does not fit on this device; ask for fewer "
                    "--num-samples or --num-preds, or a smaller --beam-width")  # the samples' tokens are held whole


def test_samples_too_many_for_the_memory_are_one_line(trained, capsys, monkeypatch):
    """The same, from generate's own check: the operating system's out-of-memory killer ended it before."""
    import deeprnn.generate

    monkeypatch.setattr(deeprnn.generate, "_free_memory", lambda dev: 2**30)
    line = one_error_line(capsys, 1, ["generate", str(trained), "--num-samples", "100000000"])
    assert line == ("deeprnn: error: out of memory: the batch of samples does not fit on this device; ask for fewer "
                    "--num-samples or --num-preds, or a smaller --beam-width")


def test_the_terminal_log_handler_writes_to_stderr_as_it_is_now(monkeypatch):
    """The handler ``deeprnn`` adds at a terminal: bound to the stream of its making, it failed ("--- Logging
    error ---") once a test's captured stderr had closed, and so did every later deeprnn log line."""
    import io
    import logging

    from deeprnn.cli import StderrHandler

    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("deeprnn: %(message)s"))
    for text in ("building the C++ kernels", "done"):
        now = io.StringIO()
        monkeypatch.setattr(sys, "stderr", now)
        handler.emit(logging.makeLogRecord({"msg": text}))
        assert now.getvalue() == f"deeprnn: {text}\n"


def test_an_empty_run_dir_is_refused(tmp_path, capsys, monkeypatch):
    """``--run-dir ""`` trained into runs/<name> without a word; compare refuses an empty --out the same way."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, 2, ["train", *TINY, "--run-dir", " "])
    assert line == "deeprnn: error: run_dir is empty; name a directory, or drop --run-dir for the default (runs/<name>)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["train", "--data-dir", ""], "data_dir is empty; name a directory, or drop --data-dir for the default "
                                  "($DEEPRNN_DATA_DIR, else ~/.cache/deeprnn)"),
    (["corpora", "--data-dir", ""], "--data-dir is empty; name a directory, or drop it for the default "
                                    "($DEEPRNN_DATA_DIR, else ~/.cache/deeprnn)"),  # it listed "cache directory: ."
    (["corpora", "--data-dir", "{file}"], "the corpus cache {file} is a file, not a directory; pass a directory to "
                                          "--data-dir (or $DEEPRNN_DATA_DIR)"),  # listed as "not downloaded yet"
    (["info", ""], "the run or checkpoint path is empty; name a run directory or a checkpoint"),  # ". holds no ..."
    (["evaluate", " "], "the run or checkpoint path is empty; name a run directory or a checkpoint"),
])
def test_an_empty_or_wrong_kind_of_path_is_refused(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").write_text("mine\n")
    argv = [a.replace("{file}", str(tmp_path / "notes")) for a in argv]
    line = one_error_line(capsys, 2, argv)
    assert line == "deeprnn: error: " + message.replace("{file}", str(tmp_path / "notes"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


@pytest.mark.parametrize("where", ["_main", "cmd_info"])
def test_ctrl_c_while_starting_up_or_in_a_command_is_one_line(capsys, monkeypatch, where):
    """Ctrl-C while torch was still being imported (before the command ran) used to print the import's
    traceback; one handler, around everything, now says it in one line, there and inside a command."""
    import deeprnn.cli

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(deeprnn.cli, where, interrupted)
    assert main(["info", "x"]) == 130
    assert capsys.readouterr().err == "deeprnn: interrupted\n"
    assert not isinstance(sys.stdout, deeprnn.cli._Stdout)  # _main put the stdout it wrapped back


def test_nproc_checks_the_configuration_before_launching(tmp_path, capsys, monkeypatch):
    """``--nproc 2`` with a bad flag used to launch torchrun, whose ranks each printed the error before
    torchrun's own traceback (exit 1): the configuration is now checked first, one line, exit 2."""
    import deeprnn.cli

    launched = []
    monkeypatch.setattr(deeprnn.cli, "_launch_torchrun", lambda *a: launched.append(a) or 0)
    line = one_error_line(capsys, 2, ["train", *TINY, "--nproc", "2", "--num-layers", "0",
                                      "--run-dir", str(tmp_path / "r")])
    assert line == "deeprnn: error: num_layers must be >= 1, got 0"
    assert launched == [] and not (tmp_path / "r").exists()
    argv = ["train", *TINY, "--nproc", "2", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 0 and launched == [(2, argv)]  # a good configuration is launched as it was given


def fake_torchrun(monkeypatch, outcome):
    """Replace torchrun's agent with ``outcome(launch args, environment)``, which plays the ranks."""
    import torch.distributed.run

    seen = {}

    def run(launch):
        seen.update(args=launch, env=dict(os.environ), sigint=signal.getsignal(signal.SIGINT))
        signal.signal(signal.SIGINT, lambda *_: None)  # as torchrun's agent does, never restoring it
        outcome(os.environ)

    monkeypatch.setattr(torch.distributed.run, "run", run)
    return seen


def rank_fails(rank: int, line: str, code: int, peer: bool = False):
    """What rank ``rank`` of a launched run does on failure: ``cli._fail`` in its own process."""
    import deeprnn.cli

    def fail(env):
        saved = os.environ.get("RANK")
        os.environ["RANK"] = str(rank)
        try:
            assert deeprnn.cli._fail(line, code, peer=peer) == code
        finally:
            os.environ.pop("RANK") if saved is None else os.environ.__setitem__("RANK", saved)
    return fail


def child_failed(*exits: tuple[int, int]):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    return ChildFailedError("deeprnn", {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code,
                                                             error_file="")
                                        for rank, code in exits})


NPROC_RUN = ["train", *TINY, "--nproc", "2"]


@pytest.mark.parametrize("ranks, exits, expected", [
    # rank 0's own error; rank 1 lost contact with it: the own error, rank 0's status
    ([(0, "deeprnn: error: run directory r already exists", 2, False),
      (1, "deeprnn: error: rank 1 lost contact with another rank (x); …", 1, True)],
     [(0, 2), (1, 1)], ("deeprnn: error: run directory r already exists", 2)),
    # the same error on both ranks: one line
    ([(1, "deeprnn: error: the training split has 30 tokens", 2, False),
      (0, "deeprnn: error: the training split has 30 tokens", 2, False)],
     [(0, 2), (1, 2)], ("deeprnn: error: the training split has 30 tokens", 2)),
    # rank 1 killed, rank 0 lost contact with it: the killed rank, as a shell reports a signal
    ([(0, "deeprnn: error: rank 0 lost contact with another rank (y); …", 1, True)],
     [(1, -9), (0, 1)], ("deeprnn: error: rank 1 was killed by SIGKILL", 137)),
    # a rank interrupted (by its own SIGTERM): rank 0's resume line
    ([(0, "deeprnn: SIGTERM received: checkpoint saved; resume with: deeprnn train --resume r", 143, False),
      (1, "deeprnn: SIGTERM received: checkpoint saved; resume with: deeprnn train --resume r", 143, False)],
     [(1, 143), (0, 143)],
     ("deeprnn: SIGTERM received: checkpoint saved; resume with: deeprnn train --resume r", 143)),
    # a rank that printed a traceback (a bug) leaves no line: its status only
    ([], [(0, 1), (1, 1)], (None, 1)),
])
def test_nproc_failure_is_one_line_and_the_failing_ranks_status(monkeypatch, capsys, tmp_path, ranks, exits,
                                                                 expected):
    """torchrun's agent ended a failed run with ~40 lines of ``ChildFailedError`` traceback and exit 1 after
    each rank's own line: the launcher now prints the one line that says what went wrong, with its status."""
    def outcome(env):
        for rank, line, code, peer in ranks:
            rank_fails(rank, line, code, peer)(env)
        raise child_failed(*exits)

    seen = fake_torchrun(monkeypatch, outcome)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = signal.getsignal(signal.SIGINT)
    line, code = expected
    assert main([*NPROC_RUN, "--run-dir", str(tmp_path / "r")]) == code
    assert capsys.readouterr().err == (f"{line}\n" if line else "")
    assert signal.getsignal(signal.SIGINT) is before  # the agent's handler is gone again
    assert "DEEPRNN_RANK_REPORTS" not in os.environ and "OMP_NUM_THREADS" not in os.environ
    reports = Path(seen["env"]["DEEPRNN_RANK_REPORTS"])
    assert not reports.exists()  # the ranks' reports went with the launch
    # torchrun's arguments: this command without --nproc, each rank its share of the cores
    import torch

    assert seen["args"].nproc_per_node == "2" and seen["args"].standalone and seen["args"].module
    assert seen["args"].training_script == "deeprnn"
    assert seen["args"].training_script_args == ["train", *TINY, "--run-dir", str(tmp_path / "r")]
    assert seen["env"]["OMP_NUM_THREADS"] == str(max(1, torch.get_num_threads() // 2))


def test_nproc_keeps_the_users_thread_count_and_reports_an_interrupt(monkeypatch, capsys, tmp_path):
    """Ctrl-C reaches torchrun's agent (SignalException): the ranks' resume line, or 'interrupted' if no rank
    got to say anything."""
    from torch.distributed.elastic.multiprocessing import SignalException

    def interrupted(say: bool):
        def outcome(env):
            if say:
                rank_fails(0, "deeprnn: SIGINT received: checkpoint saved; resume with: x", 130)(env)
            raise SignalException("agent got signal 2", sigval=signal.SIGINT)
        return outcome

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    seen = fake_torchrun(monkeypatch, interrupted(True))
    assert main([*NPROC_RUN, "--run-dir", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == "deeprnn: SIGINT received: checkpoint saved; resume with: x\n"
    assert seen["env"]["OMP_NUM_THREADS"] == "3" and os.environ["OMP_NUM_THREADS"] == "3"
    fake_torchrun(monkeypatch, interrupted(False))
    assert main([*NPROC_RUN, "--run-dir", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == "deeprnn: interrupted\n"


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_nproc_below_one_is_refused(tmp_path, capsys, nproc):
    """--nproc 0 and -1 used to train one process silently."""
    line = one_error_line(capsys, 2, ["train", *TINY, "--nproc", nproc, "--run-dir", str(tmp_path / "r")])
    assert line == f"deeprnn: error: --nproc must be >= 1 (processes to launch), got {nproc}"
    assert not (tmp_path / "r").exists()


def test_config_file_range_errors_name_the_file(tmp_path, capsys):
    """A value out of range in the file is prefixed with the file's name, like its other errors; a flag's own
    error is not (the file is fine); a directory is said to be one."""
    conf = tmp_path / "c.toml"
    conf.write_text("dropout = 2\n")
    line = one_error_line(capsys, 2, ["train", "--config", str(conf)])
    assert line == f"deeprnn: error: {conf}: dropout must be in [0, 1), got 2.0"
    conf.write_text("val_fraction = 0.5\n")  # fine alone; with the flag below the two leave no training text
    line = one_error_line(capsys, 2, ["train", "--config", str(conf), "--test-fraction", "0.5"])
    assert line == f"deeprnn: error: {conf}: val_fraction + test_fraction must be < 1 to leave training text"
    conf.write_text("dropout = 0.1\n")
    line = one_error_line(capsys, 2, ["train", "--config", str(conf), "--lr", "-1"])
    assert line == "deeprnn: error: lr must be > 0, got -1.0"
    line = one_error_line(capsys, 2, ["train", "--config", str(tmp_path)])
    assert line == f"deeprnn: error: config file {tmp_path} is a directory; pass the .toml file inside it"


@pytest.mark.parametrize("argv, flag", [
    (["train", "--num-hidden", "1"], "--num-hidden 1"),  # --num-hiddens
    (["train", "--epoch", "1"], "--epoch 1"),  # --epochs
    (["generate", "run", "--temp", "0.5"], "--temp 0.5"),  # --temperature
    (["evaluate", "run", "--dynamic", "0.1"], "--dynamic 0.1"),  # --dynamic-lr, --dynamic-rule, --dynamic-decay
])
def test_abbreviated_flags_are_refused(capsys, argv, flag):
    """argparse used to take a unique prefix of a flag, so a typo could pick another flag without a word."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    prog = f"deeprnn {argv[0]}"
    assert capsys.readouterr().err == f"{prog}: error: unrecognized arguments: {flag} (see {prog} --help)\n"


def _parsers():
    from deeprnn.cli import build_parser

    root = build_parser()
    return [root, *root._subparsers._group_actions[0].choices.values()]


def test_every_parser_refuses_abbreviations():
    assert [p.prog for p in _parsers() if p.allow_abbrev] == []


def test_help_shows_each_default_once():
    """``(default: num_hiddens) (default: None)``: a flag whose help says its default got a second one."""
    import re

    for parser in _parsers():
        text = " ".join(parser.format_help().split())
        assert not re.search(r"\(default[^)]*\) \(default", text), (parser.prog, text)
        # a default of None says nothing: each such flag says what leaving it out means
        assert "(default: None)" not in text and "['" not in text, (parser.prog, text)
    helps = {p.prog: " ".join(p.format_help().split()) for p in _parsers()}
    assert "embedding size (default: num_hiddens) --dropout" in helps["deeprnn train"]
    assert "(default runs/<name>) --on-nan" in helps["deeprnn train"]
    assert "stop after this many steps (default: no limit)" in helps["deeprnn train"]
    assert "named corpora, files or dirs (default: timemachine)" in helps["deeprnn train"]
    assert ("held-out evaluation, about 1 minute of training on 2 CPU cores with AVX-512, 3.5 to 6 without."
            in helps["deeprnn train"])
    for command in ("generate", "evaluate"):
        assert "--device DEVICE auto | cpu | cuda | cuda:N | mps (default: auto)" in helps[f"deeprnn {command}"]


@pytest.fixture
def word_run(tmp_path, capsys):
    """A tiny word-level run on a text without 'time' or 'traveller' (the default prefix)."""
    text = tmp_path / "cats.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log .\n" * 300)
    run = tmp_path / "words"
    assert main(["train", *TINY, "--corpus", str(text), "--token", "word", "--normalization", "raw",
                 "--run-dir", str(run)]) == 0
    capsys.readouterr()
    return run


def test_info_of_a_run_says_where_the_run_stands(trained, tmp_path, capsys):
    """info RUN shows the run's best/ checkpoint, whose step read as the run's length ("trained 3 steps" of a run
    of 12); a line now gives the run's own steps, whether it finished, and which checkpoint is shown."""
    from deeprnn.train import train

    assert main(["info", str(trained)]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("run ")]
    assert line == "run         6 steps, finished (max_steps); this is its best/ checkpoint (the lowest validation loss)"
    assert main(["info", str(trained / "last"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == {"dir": str(trained), "steps": 6, "finished": True,
                                                          "stop_reason": "max_steps", "checkpoint": "last"}
    cfg = dataclasses.replace(TrainConfig(**json.loads((trained / "config.json").read_text())),
                              run_dir=str(tmp_path / "paused"), max_steps=None, eval_every=2)
    train(cfg, progress=False, log=lambda *_: None, stop_after_steps=3)  # evaluated at 2, paused at 3
    assert main(["info", str(tmp_path / "paused")]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("run ")]
    assert line == (f"run         3 steps, unfinished: deeprnn train --resume {tmp_path / 'paused'} continues it; this "
                    "is its best/ checkpoint (the lowest validation loss)")


def test_info_reports_bits_per_word_for_word_models(trained, word_run, capsys):
    """As evaluate and train say it: bpc at character level, bits/word at word level (it said bits/token)."""
    for run, unit in ((trained, "bpc"), (word_run, "bits/word")):
        assert main(["info", str(run)]) == 0
        (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("validation")]
        assert re.fullmatch(rf"validation  perplexity \d+\.\d{{4}}, \d+\.\d{{4}} {re.escape(unit)}", line), line


@pytest.mark.parametrize("args, warning", [
    (["--strategy", "greedy", "--temperature", "0.5"], "--strategy greedy does not use --temperature; it is ignored"),
    # Ignored, so not checked either: 0 is no temperature a sampler could use, but greedy never reads it.
    (["--strategy", "greedy", "--temperature", "0", "--top-p", "2"],
     "--strategy greedy does not use --temperature, --top-p; they are ignored"),
    (["--strategy", "greedy", "--top-k", "3", "--top-p=0.9", "--seed", "1"],
     "--strategy greedy does not use --top-k, --top-p, --seed; they are ignored"),
    (["--strategy", "beam", "--top-k", "3", "--temperature", "1.0"],
     "--strategy beam does not use --temperature, --top-k; they are ignored"),
    (["--beam-width", "2"], "--strategy sample does not use --beam-width; it is ignored"),  # sample: the default
    (["--strategy", "sample", "--temperature", "0.5", "--top-k", "3", "--seed", "1"], None),
    (["--strategy", "beam", "--beam-width", "2"], None),
])
def test_generate_warns_about_options_its_strategy_ignores(trained, capsys, args, warning):
    """Options given explicitly (even at their default value) that the strategy does not read: one warning line
    on stderr, and the text is generated."""
    assert main(["generate", str(trained), "--num-preds", "5", *args]) == 0
    out, err = capsys.readouterr()
    line = out.splitlines()[0]
    # Five tokens after the prefix; a sampled <unk> prints as five characters.
    assert line.startswith("time traveller") and len(line[len("time traveller"):].replace("<unk>", "?")) == 5
    assert err == ("" if warning is None else f"deeprnn: warning: {warning}\n")


def test_ignored_option_warning_comes_before_the_text_and_never_with_an_error(trained, capsys):
    child = _child(["generate", str(trained), "--strategy", "greedy", "--temperature", "0.5", "--num-preds", "5"],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = child.communicate(timeout=120)
    assert child.returncode == 0, out
    warning, text, rest = out.split("\n")
    assert warning == "deeprnn: warning: --strategy greedy does not use --temperature; it is ignored"
    assert text.startswith("time traveller") and rest == ""
    # Bad input stays one line: nothing is generated, so nothing is ignored.
    line = one_error_line(capsys, 2, ["generate", str(trained), "--strategy", "greedy", "--temperature", "0.5",
                                      "--num-preds", "-1"])
    assert line == "deeprnn: error: num_preds must be >= 0, got -1"


@pytest.mark.parametrize("text, split, n, others", [("time traveller", "valid", 1, "test, all"),
                                                     ("ab", "all", 2, "valid, test")])
def test_evaluating_a_split_too_short_to_score_is_one_line(trained, tmp_path, capsys, text, split, n, others):
    """A split of fewer than 3 tokens cannot be scored: one line, not a division by zero (2 tokens got
    through the old check, "at least 2", and divided by zero)."""
    short = tmp_path / "short.txt"
    short.write_text(text)  # "time traveller": the 5% validation split is one of its 14 characters
    line = one_error_line(capsys, 2, ["evaluate", str(trained), "--corpus", str(short), "--split", split])
    assert line == (f"deeprnn: error: split {split!r} has {n} tokens; need at least 3 to score: use another --split "
                    f"({others}) or more text")


def test_evaluate_scores_as_the_run_did(tmp_path, capsys):
    """evaluate used 64 streams of 128 steps whatever the run had scored with (the quality presets: 8 x 512), so
    `evaluate RUN --split valid` did not give the run's own best validation perplexity."""
    import json as json_

    run = tmp_path / "run"
    assert main(["train", *TINY, "--eval-batch-size", "3", "--eval-num-steps", "20", "--run-dir", str(run)]) == 0
    best = json_.loads((run / "summary.json").read_text())["best_val_ppl"]
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "valid", "--json"]) == 0
    assert json_.loads(capsys.readouterr().out)["perplexity"] == best
    assert main(["evaluate", str(run), "--split", "valid", "--json", "--batch-size", "64", "--num-steps", "128"]) == 0
    assert json_.loads(capsys.readouterr().out)["perplexity"] != best  # other streams, another number


def test_evaluating_a_split_the_run_never_held_out_says_so(tmp_path, capsys):
    """The quality presets train with --test-fraction 0, so evaluate's default --split test had 0 tokens and was
    told to use "more text"."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--test-fraction", "0", "--run-dir", str(run)]) == 0
    line = one_error_line(capsys, 2, ["evaluate", str(run)])
    assert line == ("deeprnn: error: the run holds out no test text (--test-fraction 0 when it trained); use another "
                    "--split (valid, all)")


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_offered_choices_are_what_the_config_accepts(name):
    """Every value the command line offers for a string option passes the configuration's check, and a value
    it does not offer fails with a message that lists exactly the offered ones (one list, deeprnn.choices)."""
    base = {"dropout": 0.0, **({"cell": "gru", "impl": "scratch"} if name == "gru_variant" else {})}
    for value in CHOICES[name]:
        TrainConfig(**{**base, name: value}).validate()
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{**base, name: "bogus"}).validate()
    message = str(err.value)
    assert message.startswith(f"{name} must be ") and message.endswith("'bogus'")
    assert all(value in message for value in CHOICES[name]), message


@pytest.mark.parametrize("device", ["meta", "xpu"])
def test_a_device_torch_parses_but_deeprnn_cannot_use_is_one_line(tmp_path, capsys, device):
    """``--device meta`` passed the check and failed in autocast with a traceback, leaving a config.json that
    made the next attempt say the run "stopped before its first checkpoint"."""
    run = tmp_path / "run"
    line = one_error_line(capsys, 2, ["train", *TINY, "--run-dir", str(run), "--device", device])
    assert line == f"deeprnn: error: device must be auto, cpu, cuda, cuda:N or mps, got {device!r}"
    assert not run.exists()


@pytest.mark.parametrize("flag, what", [("--resume", "the run directory"), ("--init-from", "a run or checkpoint"),
                                        ("--config", "a .toml file")])
def test_an_empty_path_flag_is_refused(tmp_path, capsys, monkeypatch, flag, what):
    """``--resume ""`` (an unset shell variable) trained the whole default job into runs/<name>; ``--config ""``
    was ignored; ``--init-from ""`` said ". holds no deeprnn checkpoint"."""
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, 2, ["train", *TINY, flag, ""])
    assert line == f"deeprnn: error: {flag} is empty; name {what}, or drop {flag}"
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_run_whose_text_has_changed(tmp_path, capsys, shared_data):
    """evaluate scored an edited corpus file as if its splits were the run's own (test perplexity over 1,472
    tokens where the run had 640), while --resume refused the same text. Other text is scored when named."""
    from deeprnn.corpus import build_corpus

    book = (shared_data / "timemachine.txt").read_text()
    text = tmp_path / "t.txt"
    text.write_text(book[:6000])
    run = tmp_path / "run"
    assert main(["train", *TINY, "--corpus", str(text), "--run-dir", str(run)]) == 0
    assert main(["evaluate", str(run), "--split", "test", "--json"]) == 0
    before = build_corpus([str(text)]).tokens.numel()
    text.write_text(book[:9000])
    after = build_corpus([str(text)]).tokens.numel()
    capsys.readouterr()
    line = one_error_line(capsys, 2, ["evaluate", str(run), "--split", "test"])
    assert line == (f"deeprnn: error: the corpus has changed since the run in {run} started ({before:,} tokens "
                    f"then, {after:,} now); restore the text it was trained on to score its splits, or pass "
                    "--corpus FILE --split all to score that text")
    assert main(["evaluate", str(run), "--corpus", str(text), "--split", "all", "--json"]) == 0


def test_evaluate_on_other_text_cuts_it_whole(tmp_path, capsys, shared_data):
    """A run trained with --heldout-from A, evaluated on --corpus other.txt --split test: the run's heldout_from
    was applied to the new text, an error naming a source it lacks and a flag evaluate does not have."""
    import json as json_

    import torch

    from deeprnn.corpus import build_corpus

    book = (shared_data / "timemachine.txt").read_text()
    a, b, other = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "other.txt"
    a.write_text(book[:5000])
    b.write_text(book[5000:10000])
    other.write_text(book[10000:16000])
    run = tmp_path / "run"
    assert main(["train", *TINY, "--corpus", str(a), str(b), "--heldout-from", str(a), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--corpus", str(other), "--split", "test", "--json"]) == 0
    assert json_.loads(capsys.readouterr().out)["split"] == "test"
    from deeprnn.checkpoint import load_checkpoint
    from deeprnn.cli import checkpoint_split_tokens

    ck = load_checkpoint(run)
    whole = build_corpus([str(other)], vocab=ck.vocab).split((0.9, 0.05, 0.05)).test  # the last 5% of the text
    assert torch.equal(checkpoint_split_tokens(ck, "test", corpus=[str(other)]), whole)
