"""Bad input: one clear line on stderr, exit status 2, and a typed exception from the library.

Each case runs the real command line (``deeprnn.cli.main``) and, where the check lives in the
library, the library call a program would make, asserting the ``DeepRNNError`` subclass.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from deeprnn.checkpoint import save_checkpoint
from deeprnn.cli import main
from deeprnn.corpus import build_corpus
from deeprnn.errors import ConfigError, CorpusError, VocabError
from deeprnn.generate import generate
from deeprnn.models import ModelConfig, build_model
from deeprnn.train import TrainConfig, train
from deeprnn.vocab import Vocab


def train_argv(corpus, tmp_path, flags, *extra) -> list[str]:
    return ["train", "--corpus", str(corpus), "--run-dir", str(tmp_path / "run"), *flags(max_steps=2), *extra]


# --- corpus files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"   \n\t\r\n  \n"], ids=["empty", "whitespace"])
def test_empty_or_whitespace_corpus(tmp_path, cli_error, flags, content):
    f = tmp_path / "empty.txt"
    f.write_bytes(content)
    line = cli_error(train_argv(f, tmp_path, flags))
    assert line == f"deeprnn: error: {str(f)!r} is empty; pass a file with some text"
    with pytest.raises(CorpusError, match=f"^{re.escape(repr(str(f)))} is empty; pass a file with some text$"):
        build_corpus([str(f)])
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


def test_corpus_with_no_letters_left_after_normalisation(tmp_path, cli_error, flags):
    f = tmp_path / "digits.txt"
    f.write_text("1234 5678 90 --- !!!\n")
    line = cli_error(train_argv(f, tmp_path, flags))
    assert line == (f"deeprnn: error: {str(f)!r} has no tokens after 'd2l' normalisation; pass another text or "
                    "normalisation")


def test_corpus_shorter_than_one_batch_states_the_minimum(tmp_path, cli_error, flags):
    f = tmp_path / "short.txt"
    f.write_text("the time machine by h g wells\n")  # 28 characters: fewer than 4*8 + 8
    line = cli_error(train_argv(f, tmp_path, flags))
    message = ("the training split has 26 tokens (the corpus has 29) but batch_size=4 and num_steps=8 need at least 40 "
               "(batch_size*num_steps + num_steps); use more text or smaller sizes")
    assert line == f"deeprnn: error: {message}"
    cfg = TrainConfig(corpus=[str(f)], run_dir=str(tmp_path / "lib"), **{**_tiny(), "max_steps": 2})
    with pytest.raises(CorpusError) as err:
        train(cfg, progress=False, log=lambda *_: None)
    assert str(err.value) == message


def _tiny():
    return dict(num_layers=1, num_hiddens=16, batch_size=4, num_steps=8, precision="fp32", sample_every=0)


def test_binary_file(tmp_path, cli_error, flags):
    f = tmp_path / "model.bin"
    f.write_bytes(bytes(range(256)) * 40)
    line = cli_error(train_argv(f, tmp_path, flags))
    message = (f"{f} looks binary (it contains NUL bytes); pass a text file, or its encoding with --encoding if it is "
               "UTF-16")
    assert line == f"deeprnn: error: {message}"
    with pytest.raises(CorpusError, match=f"^{re.escape(message)}$"):
        build_corpus([str(f)])


def test_invalid_utf8_without_encoding_says_to_pass_one(tmp_path, cli_error, flags):
    f = tmp_path / "latin.txt"
    # Bytes undefined in Windows-1252 too, so no encoding is guessed.
    f.write_bytes(("the time traveller " * 10).encode() + b"\x81\x8d\x8f\x90\x9d")
    line = cli_error(train_argv(f, tmp_path, flags))
    message = (f"{f} is not UTF-8 (byte 0x81 at offset 190) and does not look like Windows-1252 text; pass its "
               "encoding with --encoding (e.g. --encoding latin-1)")
    assert line == f"deeprnn: error: {message}"
    with pytest.raises(CorpusError, match=f"^{re.escape(message)}$"):
        build_corpus([str(f)])
    assert len(build_corpus([str(f)], encoding="latin-1")) == 189  # the fix the message gives works


def test_unknown_encoding_name(tmp_path, cli_error, flags):
    f = tmp_path / "a.txt"
    f.write_text("some text " * 20)
    line = cli_error(train_argv(f, tmp_path, flags, "--encoding", "klingon-8"))
    assert line == ("deeprnn: error: unknown encoding 'klingon-8'; pass a Python codec name such as utf-8 or cp1252 to "
                    "--encoding")


def test_fifty_megabyte_single_line_file_works(tmp_path, capsys):
    """No line-based reading: one 50 MB line trains (2 steps of a tiny model)."""
    f = tmp_path / "one_line.txt"
    unit = b"the quick brown fox jumps over the lazy dog "
    with open(f, "wb") as out:
        out.write(unit * (50_000_000 // len(unit) + 1))
    assert f.stat().st_size >= 50_000_000
    code = main(["train", "--corpus", str(f), "--run-dir", str(tmp_path / "run"), "--max-steps", "2",
                 "--num-layers", "1", "--num-hiddens", "16", "--batch-size", "4", "--num-steps", "8",
                 "--max-tokens", "2000", "--val-fraction", "0.00001", "--test-fraction", "0.00001",
                 "--eval-batch-size", "4", "--sample-every", "0", "--num-preds", "5", "--precision", "fp32",
                 "--quiet"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "done (max_steps): 2 steps" in out.out and out.err == ""


# --- paths and names -------------------------------------------------------------------------------


def test_nonexistent_paths(tmp_path, cli_error, flags):
    missing = tmp_path / "nope"
    line = cli_error(train_argv(tmp_path / "nope.txt", tmp_path, flags))
    assert line == f"deeprnn: error: no such file: {str(tmp_path / 'nope.txt')!r}; check the path"
    for command in ("generate", "evaluate", "info"):
        assert cli_error([command, str(missing)]) == f"deeprnn: error: no such run or checkpoint: {missing}"
    assert cli_error(["train", "--resume", str(missing)]) == f"deeprnn: error: no such run or checkpoint: {missing}"
    line = cli_error(["train", "--config", str(tmp_path / "c.toml")])
    assert line == f"deeprnn: error: config file {tmp_path / 'c.toml'} does not exist"
    line = cli_error(train_argv(tmp_path / "nope.txt", tmp_path, flags, "--init-from", str(missing)))
    assert line == f"deeprnn: error: no such run or checkpoint: {missing}"
    nope = re.escape(repr(str(tmp_path / "nope.txt")))
    with pytest.raises(CorpusError, match=f"^no such file: {nope}; check the path$"):
        build_corpus([str(tmp_path / "nope.txt")])


def test_directory_without_text(tmp_path, cli_error, flags):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x00\x01")
    (d / "notes.md").write_text("not a .txt")
    line = cli_error(train_argv(d, tmp_path, flags))
    assert line == f"deeprnn: error: directory {str(d)!r} has no .txt files; put the texts there as .txt files"
    with pytest.raises(CorpusError, match=f"^directory {re.escape(repr(str(d)))} has no .txt files; "):
        build_corpus([str(d)])


def test_an_empty_file_in_a_directory_corpus_is_named_with_its_directory(tmp_path, cli_error, flags):
    """``touch texts/notes.txt`` beside the texts: the one line says the directory is why the file was read (it
    said "pass a file with some text", of a file the command never named)."""
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("the time machine " * 500)
    (d / "b.txt").write_text("")
    message = (f"{str(d / 'b.txt')!r} is empty, and every .txt file in directory {str(d)!r} is read as part of the "
               "corpus; put text in it, or move it out of the directory")
    assert cli_error(train_argv(d, tmp_path, flags)) == f"deeprnn: error: {message}"
    with pytest.raises(CorpusError) as err:
        build_corpus([str(d)])
    assert str(err.value) == message
    (d / "b.txt").unlink()
    assert build_corpus([str(d)]).spans[0][0] == str(d / "a.txt")


def test_unknown_corpus_name(tmp_path, cli_error, flags):
    line = cli_error(["train", "--corpus", "timemachin", "--run-dir", str(tmp_path / "r"), *flags()])
    message = ("unknown corpus 'timemachin'; known corpora: timemachine, war-of-the-worlds, tinyshakespeare (or pass a "
               "file or directory path)")
    assert line == f"deeprnn: error: {message}"
    with pytest.raises(CorpusError, match=f"^{re.escape(message)}$"):
        build_corpus(["timemachin"])


@pytest.mark.parametrize("flag, value", [("--cell", "transformer"), ("--optimizer", "rmsprop"),
                                         ("--impl", "jax"), ("--schedule", "linear"), ("--on-nan", "ignore")])
def test_unknown_choice_names(cli_error, flag, value):
    line = cli_error(["train", flag, value])
    assert line.startswith(f"deeprnn train: error: argument {flag}: invalid choice: '{value}'")


def test_unknown_names_in_the_library():
    with pytest.raises(ConfigError, match=r"^cell must be one of rnn_tanh, rnn_relu, gru, lstm; got 'transformer'"):
        ModelConfig(vocab_size=5, cell="transformer").validate()
    with pytest.raises(ConfigError, match=r"^optimizer must be one of sgd, adam, adamw, got 'rmsprop'"):
        TrainConfig(optimizer="rmsprop").validate()
    with pytest.raises(ConfigError, match=r"^strategy must be one of greedy, sample, beam"):
        generate(build_model(ModelConfig(vocab_size=3, cell="gru", num_layers=1, num_hiddens=4)), Vocab("ab"), "a", 1,
                 strategy="nucleus")


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(lr="fast"), "lr must be of type float, got str 'fast'"),
    (lambda: TrainConfig(batch_size=None), "batch_size must be of type int, got NoneType None"),
    (lambda: TrainConfig(corpus="timemachine"), "corpus must be a list of strings, got 'timemachine'"),
    (lambda: TrainConfig(ar_alpha=10**30), f"ar_alpha must be a number of magnitude < 2**63, got {10**30}"),
    (lambda: ModelConfig(vocab_size=5, cell="gru", residual="yes"), "residual must be of type bool, got str 'yes'"),
    (lambda: ModelConfig(vocab_size=5, cell="lstm", tie_weights="no"),
     "tie_weights must be of type bool, got str 'no'"),
], ids=["str-for-float", "none-for-int", "str-for-list", "huge-int-for-float", "str-for-bool", "switch-checked-first"])
def test_wrong_types_in_the_library(make, message):
    """A wrong type used to fail later as a TypeError from a comparison, torch or the C++ kernels (a
    ``tie_weights="no"`` counted as on and was refused for needing an embedding)."""
    with pytest.raises(ConfigError) as err:
        make().validate()
    assert str(err.value) == message


# --- out-of-range hyperparameters ------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--num-layers", "0", "num_layers must be >= 1, got 0"),
    ("--num-hiddens", "0", "num_hiddens must be >= 1, got 0"),
    ("--num-hiddens", "-16", "num_hiddens must be >= 1, got -16"),
    ("--lr", "0", "lr must be > 0, got 0.0"),
    ("--lr", "nan", "lr must be > 0, got nan"),
    ("--dropout", "1", "dropout must be in [0, 1), got 1.0"),
    ("--dropout", "-0.1", "dropout must be in [0, 1), got -0.1"),
    ("--batch-size", "0", "batch_size must be >= 1, got 0"),
    ("--num-steps", "-5", "num_steps must be >= 1, got -5"),
    ("--clip", "-1", "clip must be >= 0 (0 disables clipping), got -1.0"),
    # inf passed, and config.json and the checkpoints held a bare Infinity, which is not JSON
    ("--clip", "inf", "clip must be finite (0 disables clipping), got inf"),
    ("--time-budget", "inf", "time_budget must be finite (leave it out for no time limit), got inf"),
    ("--ar-alpha", "inf", "ar_alpha must be >= 0 and finite, got inf"),
    ("--weight-decay", "inf", "weight_decay must be >= 0 and finite, got inf"),
    ("--num-epochs", "0", "num_epochs must be >= 1, got 0"),
    ("--max-steps", "0", "max_steps must be >= 1, got 0"),
    ("--num-preds", "-1", "num_preds must be >= 0, got -1"),
    # a huge sample never finished at the end of training, before summary.json was written
    ("--num-preds", "10001", "num_preds must be <= 10,000 (the sample printed during training; deeprnn generate "
                             "writes longer text), got 10,001"),
    ("--max-tokens", "-3", "max_tokens must be >= 2, got -3"),
    ("--eval-num-steps", "0", "eval_num_steps must be >= 1, got 0"),
    ("--val-fraction", "1.5", "val_fraction must be in [0, 1), got 1.5"),
    ("--seed", "-1", "seed must be an integer in [0, 2**63), got -1"),
    ("--seed", str(2**63), f"seed must be an integer in [0, 2**63), got {2**63}"),
    ("--num-hiddens", "99999999999999999999", "num_hiddens must be <= 1,048,576, got 99,999,999,999,999,999,999"),
    ("--forget-bias", "nan", "forget_bias must be a finite number, got nan"),
])
def test_out_of_range_training_values(cli_error, tmp_path, flag, value, message):
    line = cli_error(["train", "--run-dir", str(tmp_path / "r"), flag, value])
    assert line == f"deeprnn: error: {message}"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--zoneout-cell", "1"], "zoneout_cell must be in [0, 1), got 1.0"),
    (["--zoneout-cell", "0.3"],
     "zoneout_cell and zoneout_hidden have no torch.nn form; use impl='scratch' or set both to 0"),
    (["--zoneout-hidden", "0.05", "--impl", "scratch", "--cell", "gru"],
     "zoneout_cell and zoneout_hidden apply to cell='lstm' (cell is 'gru'); set both to 0"),
    (["--zoneout-cell", "0.3", "--impl", "scratch", "--layer-norm"],
     "zoneout_cell and zoneout_hidden do not combine with layer_norm; set both to 0 or layer_norm=False"),
])
def test_zoneout_where_it_does_not_apply(cli_error, tmp_path, flags, message):
    line = cli_error(["train", "--run-dir", str(tmp_path / "r"), *flags])
    assert line == f"deeprnn: error: {message}"
    assert not (tmp_path / "r").exists()


def test_partial_shuffle_with_random_sampling(cli_error, tmp_path):
    line = cli_error(["train", "--run-dir", str(tmp_path / "r"), "--partial-shuffle", "--sampling", "random"])
    assert line == ("deeprnn: error: partial_shuffle needs sampling='sequential' "
                    "(random sampling already shuffles its windows)")
    assert not (tmp_path / "r").exists()


def test_wrongly_typed_flag_value(cli_error):
    line = cli_error(["train", "--num-layers", "two"])
    assert line == "deeprnn train: error: argument --num-layers: invalid int value: 'two' (see deeprnn train --help)"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of an untrained tiny model: generation's argument checks do not need training."""
    vocab = Vocab("the time traveller for so it will be convenient to speak of him")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(vocab), cell="lstm", num_layers=1, num_hiddens=8))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(path, model=model, vocab=vocab, meta={})
    return path


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "temperature must be > 0, got 0.0; use --strategy greedy for the most likely text"),
    (["--temperature", "-1"], "temperature must be > 0, got -1.0"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-p", "1.01"], "top_p must be in (0, 1], got 1.01"),
    (["--top-k", "0"], "top_k must be >= 1, got 0"),
    (["--num-preds", "-1"], "num_preds must be >= 0, got -1"),
    (["--num-samples", "0"], "num_samples must be >= 1, got 0"),
    (["--beam-width", "0", "--strategy", "beam"], "beam_width must be >= 1, got 0"),
    (["--beam-width", "100000", "--strategy", "beam"], "beam_width must be <= 1,024, got 100,000"),  # silently slow
    (["--prefix", ""], "prefix must be a non-empty string (it seeds the model's state), got ''"),
])
def test_out_of_range_generation_values(checkpoint, cli_error, args, message):
    line = cli_error(["generate", str(checkpoint), *args])
    assert line == f"deeprnn: error: {message}"


def test_prefix_outside_the_vocabulary(checkpoint, cli_error):
    line = cli_error(["generate", str(checkpoint), "--prefix", "Time Machine?"])
    assert line == ("deeprnn: error: prefix has characters not in the vocabulary: 'T', 'M', '?'; "
                    "use --unk replace to map them to <unk>")
    from deeprnn.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    with pytest.raises(VocabError, match="prefix has characters not in the vocabulary"):
        generate(ck.model, ck.vocab, "Time Machine?", 5)


# --- config files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    ("num_layerz = 2\n", "unknown key 'num_layerz'; see deeprnn train --help for the options"),
    ("[train]\nlearning_rate = 0.1\n", "unknown key 'learning_rate'; see deeprnn train --help for the options"),
    # flags that are not keys: --help lists them, so "see --help" went in a circle
    ('preset = "tiny"\n', "'preset' is not a config file key: pass --preset on the command line"),
    ('init-from = "runs/a"\n', "'init-from' is not a config file key: pass --init-from on the command line"),
    ("epochs = 3\n", "unknown key 'epochs'; the key is num_epochs"),
    ('num_layers = "two"\n', "num_layers must be of type int, got str 'two'"),
    ("num_layers = 2.5\n", "num_layers must be of type int, got float 2.5"),
    ("lr = true\n", "lr must be of type float, got bool True"),
    ('tie_weights = "yes"\n', "tie_weights must be of type bool, got str 'yes'"),
    ("corpus = 3\n", "corpus must be a list of strings, got 3"),
    ('cell = "transformer"\n', "cell must be one of rnn_tanh, rnn_relu, gru, lstm, got 'transformer'"),
])
def test_config_file_unknown_keys_and_wrong_types(tmp_path, cli_error, body, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(body)
    assert cli_error(["train", "--config", str(cfg)]) == f"deeprnn: error: {cfg}: {message}"


def test_config_file_that_is_not_toml(tmp_path, cli_error):
    cfg = tmp_path / "c.toml"
    cfg.write_text("num_layers = = 2\n")
    line = cli_error(["train", "--config", str(cfg)])
    assert line.startswith(f"deeprnn: error: config file {cfg} is not valid TOML: ")
    cfg.write_bytes(b"\xff\xfe\x00binary")
    assert cli_error(["train", "--config", str(cfg)]).startswith(f"deeprnn: error: config file {cfg} is not valid")


def test_config_file_out_of_range_value(tmp_path, cli_error):
    """Named after the file like the file's other errors (it used to be the bare field message)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nnum_hiddens = 0\n")
    assert cli_error(["train", "--config", str(cfg)]) == f"deeprnn: error: {cfg}: num_hiddens must be >= 1, got 0"


# --- resuming with another vocabulary --------------------------------------------------------------


def test_resume_with_another_vocabulary(tmp_path, cli_error, flags, capsys):
    text = tmp_path / "book.txt"
    text.write_text("the time traveller for so it will be convenient to speak of him " * 20)
    run = tmp_path / "run"
    assert main(["train", "--corpus", str(text), "--run-dir", str(run), *flags(max_steps=2)]) == 0
    capsys.readouterr()
    # The file changed under the run: new characters mean another vocabulary.
    text.write_text("xyzzy quux 0123 jumped over the lazy dog " * 20)
    line = cli_error(["train", "--resume", str(run), "--max-steps", "4", "--quiet"])
    assert line == (f"deeprnn: error: the corpus has changed since the run in {run} started (new tokens 'd', 'g', "
                    "'j', …; tokens gone 'b', 'c', 'f', …); resume with the text the run was trained on, or start "
                    "a new run")
    cfg = TrainConfig(**{**json.loads((run / "config.json").read_text()), "max_steps": 4})
    with pytest.raises(VocabError):
        train(cfg, resume=True, progress=False, log=lambda *_: None)
    # Another corpus named on the command line is refused before any text is read.
    other = tmp_path / "other.txt"
    other.write_text("abc " * 100)
    line = cli_error(["train", "--resume", str(run), "--corpus", str(other), "--quiet"])
    assert line.startswith("deeprnn: error: corpus differs from the run in ")



# --- bf16 where torch.nn.LSTM cannot run it (a CPU without AVX-512) -----------------------------------------


def test_evaluate_in_bf16_where_the_lstm_cannot(cli_error, checkpoint, monkeypatch):
    import deeprnn.precision as precision_mod

    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    line = cli_error(["evaluate", str(checkpoint), "--precision", "bf16"])
    assert line == ("deeprnn: error: precision 'bf16' with torch.nn.LSTM (impl 'concise') needs a CPU with AVX-512, "
                    "which this one lacks; use --precision fp32 (the default) or auto")


def _paused_tiny_run(tiny_cfg, tmp_path):
    """A tiny run of 4 steps paused after 2 (``last/`` holds its training state); its directory."""
    train(tiny_cfg(max_steps=4, eval_every=2), progress=False, log=lambda *_: None, stop_after_steps=2)
    return tmp_path / "run"


def test_resuming_a_bf16_lstm_run_where_bf16_cannot_run(tiny_cfg, edit_meta, monkeypatch, tmp_path):
    """A concise LSTM run that trained in bf16 (auto on an AVX-512 machine) cannot go on in bf16 on a CPU without
    it, and fp32 would change the computation: one line that says where to resume it."""
    import deeprnn.precision as precision_mod

    run = _paused_tiny_run(tiny_cfg, tmp_path)
    edit_meta(run / "last", lambda meta: meta["train_config"].update(precision="bf16"))
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    msg = (f"precision 'bf16' with torch.nn.LSTM (impl 'concise') needs a CPU with AVX-512, which this one lacks; "
           f"the run in {run} trained in bf16: resume it on a machine with AVX-512 or a GPU")
    with pytest.raises(ConfigError) as err:
        train(tiny_cfg(max_steps=4, eval_every=2, precision="auto"), resume=True, progress=False,
              log=lambda *_: None)
    assert str(err.value) == msg


def test_resume_compares_a_field_the_run_predates_with_its_default(tiny_cfg, edit_meta, tmp_path):
    """A run saved before partial_shuffle existed trained without it: resuming with it is refused, without it
    goes on."""
    run = _paused_tiny_run(tiny_cfg, tmp_path)
    edit_meta(run / "last", lambda meta: meta["train_config"].pop("partial_shuffle"))
    with pytest.raises(ConfigError) as err:
        train(tiny_cfg(max_steps=4, eval_every=2, partial_shuffle=True), resume=True, progress=False,
              log=lambda *_: None)
    assert str(err.value) == (f"partial_shuffle differs from the run in {run} (False there, True now); "
                              "resume without changing it, or start a new run")
    summary = train(tiny_cfg(max_steps=4, eval_every=2), resume=True, progress=False, log=lambda *_: None)
    assert summary["steps"] == 4


def test_a_device_is_not_a_corpus(tmp_path, cli_error, flags):
    """``--corpus /dev/zero`` read until memory ran out, and was then told to shrink the model."""
    line = cli_error(train_argv("/dev/zero", tmp_path, flags))
    assert line == "deeprnn: error: '/dev/zero' is a device, not a text file; pass a file, or save the text to one"
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_vocabulary_does_not_fit_its_model_is_not_saved(tmp_path):
    """save_checkpoint wrote it, and load_checkpoint then refused it."""
    from deeprnn.errors import CheckpointError

    model = build_model(ModelConfig(vocab_size=28, cell="gru", num_hiddens=8))
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / "ck", model=model, vocab=Vocab("abc"), meta={})
    assert str(err.value) == (f"cannot save {tmp_path / 'ck'}: the model predicts 28 tokens but the vocabulary has "
                              f"{len(Vocab('abc'))}; save the vocabulary the model was built for")
    assert not (tmp_path / "ck").exists()


def test_a_loaded_model_is_in_eval_mode(tmp_path):
    """Two forwards of a loaded model differed by dropout; training and generation set their own modes."""
    from deeprnn.checkpoint import load_checkpoint

    vocab = Vocab("the time traveller")
    model = build_model(ModelConfig(vocab_size=len(vocab), cell="lstm", num_layers=2, num_hiddens=8, dropout=0.5))
    save_checkpoint(tmp_path / "ck", model=model, vocab=vocab, meta={})
    ck = load_checkpoint(tmp_path / "ck")
    assert not ck.model.training
    X = torch.zeros(2, 5, dtype=torch.long)
    assert torch.equal(ck.model(X)[0], ck.model(X)[0])


def test_each_api_says_which_models_it_takes():
    """deeprnn's generate with the book's RNNModel was a TypeError about begin_state's arguments; the book's
    predict_ch8 with a deeprnn model was a reshape error."""
    from torch import nn

    from deeprnn import d2l

    vocab = Vocab("the time traveller")
    book_net = d2l.RNNModel(nn.LSTM(len(vocab), 8), len(vocab))
    with pytest.raises(ConfigError) as err:
        generate(book_net, vocab, "the", 5)
    assert str(err.value) == ("model is the book's RNNModel; generate from it with d2l.predict_ch8(prefix, num_preds, "
                              "net, vocab, device), or pass a deeprnn model (a checkpoint's .model)")
    ours = build_model(ModelConfig(vocab_size=len(vocab), cell="lstm", num_hiddens=8))
    with pytest.raises(TypeError) as err:
        d2l.predict_ch8("the", 5, ours, vocab, "cpu")
    assert str(err.value) == ("predict_ch8 takes the book's models (RNNModel, RNNModelScratch); generate from a "
                              "deeprnn model with deeprnn.generate.generate(model, vocab, prefix, num_preds)")
