"""Fine-tuning from a checkpoint (--init-from, --extend-vocab, --freeze-layers) and word-level models."""

import csv
import dataclasses
import json
import math

import pytest
import torch

from deeprnn.checkpoint import load_checkpoint
from deeprnn.cli import main
from deeprnn.errors import ConfigError
from deeprnn.finetune import freeze_layers, grow_model
from deeprnn.models import ModelConfig, build_model
from deeprnn.train import TrainConfig, train
from deeprnn.vocab import EOL, join_words, split_words

QUIET = dict(progress=False, log=lambda *_: None)


def tiny(run_dir, **kw) -> TrainConfig:
    base = dict(corpus=["timemachine"], num_layers=2, num_hiddens=24, batch_size=8, num_steps=10,
                max_tokens=4000, val_fraction=0.02, test_fraction=0.02, num_epochs=2, lr=1e-2,
                eval_batch_size=8, eval_num_steps=50, sample_every=0, num_preds=5, precision="fp32",
                dropout=0.0, run_dir=str(run_dir), seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("parent") / "run"
    summary = train(tiny(run), **QUIET)
    return run, summary


def val_losses(run):
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["val_loss"]) for r in csv.DictReader(f)]


def test_finetune_starts_at_parents_heldout_loss(parent, tmp_path):
    run, summary = parent
    parent_best = math.log(summary["best_val_ppl"])
    # Same data, a learning rate too small to move the weights: the child's first evaluation is
    # the parent's held-out loss.
    child = tiny(tmp_path / "child", lr=1e-12, max_steps=1, num_hiddens=99)  # model fields come from the parent
    train(child, init_from=str(run), **QUIET)
    assert val_losses(tmp_path / "child")[0] == pytest.approx(parent_best, abs=1e-5)
    ck = load_checkpoint(tmp_path / "child", prefer="last")
    assert ck.meta["parent"] == str(run / "best")
    assert ck.model.config.num_hiddens == 24


def test_unknown_characters_are_counted(parent, tmp_path, shared_data):
    run, _ = parent
    lines = []
    cfg = tiny(tmp_path / "c", corpus=["tinyshakespeare"], normalization="raw", max_tokens=3000, max_steps=1)
    train(cfg, init_from=str(run), progress=False, log=lines.append)
    text = (shared_data / "tinyshakespeare.txt").read_text()
    train_text = text[: int(len(text) * 0.96)]
    known = set("abcdefghijklmnopqrstuvwxyz ")
    expected_unknown = sum(1 for ch in text if ch not in known)
    distinct = len(set(text) - known)
    msg = next(line for line in lines if "map to <unk>" in line)
    assert f"{expected_unknown:,} tokens of the new corpus are not in the parent's vocabulary" in msg
    assert f"({distinct} distinct;" in msg
    assert train_text  # the split itself is covered in tests/test_corpus.py


def test_extend_vocab_keeps_old_rows(parent, tmp_path):
    run, _ = parent
    lines = []
    cfg = tiny(tmp_path / "e", corpus=["tinyshakespeare"], normalization="raw", max_tokens=3000, max_steps=1,
               lr=1e-12)
    train(cfg, init_from=str(run), extend_vocab=True, progress=False, log=lines.append)
    old = load_checkpoint(run)
    new = load_checkpoint(tmp_path / "e", prefer="last")
    assert new.vocab.idx_to_token[: len(old.vocab)] == old.vocab.idx_to_token
    added = len(new.vocab) - len(old.vocab)
    assert any(f"vocabulary extended by {added} tokens" in line for line in lines)
    # After zero-size steps every old row is as the parent left it; new rows exist.
    osd, nsd = old.model.state_dict(), new.model.state_dict()
    w_old, w_new = osd["output.weight"], nsd["output.weight"]
    assert w_new.shape[0] == len(new.vocab)
    torch.testing.assert_close(w_new[: len(old.vocab)], w_old, atol=1e-9, rtol=0)


def test_grow_model_is_bit_identical_on_old_rows():
    torch.manual_seed(0)
    for impl in ("concise", "scratch"):
        for inp in ("one_hot", "embedding"):
            m = build_model(ModelConfig(vocab_size=6, cell="lstm", num_layers=2, num_hiddens=5, impl=impl, input=inp))
            g = grow_model(m, 9)
            assert g.config.vocab_size == 9
            for name, p in m.state_dict().items():
                q = g.state_dict()[name]
                sl = tuple(slice(0, s) for s in p.shape)
                assert torch.equal(q[sl], p), (impl, inp, name)
            # The old tokens' logits are unchanged when fed old tokens (one-hot: new columns unused).
            X = torch.randint(0, 6, (2, 4))
            m.eval(), g.eval()
            with torch.no_grad():
                torch.testing.assert_close(g(X)[0][..., :6], m(X)[0])


def test_freeze_layers(parent, tmp_path):
    run, _ = parent
    lines: list[str] = []
    summary = train(tiny(tmp_path / "f", max_steps=3), init_from=str(run), freeze_layers=1, progress=False,
                    log=lines.append)
    total = load_checkpoint(run).model.num_params()
    trainable = total - 28 * 24 - 4 * 24 * (24 + 24) - 2 * 4 * 24  # the embedding and layer 0 are frozen
    assert (summary["parameters"], summary["trainable_parameters"]) == (total, trainable)  # it said the trainable
    model_line = next(line for line in lines if line.startswith("model: "))
    assert f", {total:,} parameters ({trainable:,} trainable); " in model_line
    before = load_checkpoint(run).model.state_dict()
    after = load_checkpoint(tmp_path / "f", prefer="last").model.state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.endswith("_l0") or name.startswith("embedding."):
            assert same, name
        elif name.startswith("rnn.") or name.startswith("output."):
            assert not same, name
    m = build_model(ModelConfig(vocab_size=6, cell="gru", num_layers=2, num_hiddens=5, impl="scratch"))
    assert freeze_layers(m, 1) == ["layers.0.W_xh", "layers.0.W_hh", "layers.0.b_h", "layers.0.b_hn"]
    with pytest.raises(ConfigError, match=r"^freeze_layers must be in \[0, num_layers=2\], got 3$"):
        freeze_layers(m, 3)


def test_freezing_below_a_tied_output_layer_leaves_it_trainable(tmp_path):
    """With --tie-weights the embedding is the output layer's weight: freezing it with the lowest layers froze
    the output layer as well, without a word (8,476 of 17,820 parameters trainable, the output weight not among
    them). It stays trainable now, and the log says why."""
    tied = build_model(ModelConfig(vocab_size=6, cell="lstm", num_layers=2, num_hiddens=4, input="embedding",
                                   tie_weights=True))
    assert freeze_layers(tied, 1) == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    assert tied.output.weight.requires_grad and tied.output.weight is tied.embedding.weight
    parent_run = tmp_path / "tied"
    train(tiny(parent_run, max_steps=2, input="embedding", tie_weights=True), progress=False, log=lambda *_: None)
    lines: list[str] = []
    train(tiny(tmp_path / "child", max_steps=2), init_from=str(parent_run), freeze_layers=1, progress=False,
          log=lines.append)
    assert "froze the 1 lowest layers (4 parameter tensors) (the embedding stays trainable: with --tie-weights it " \
           "is the output layer's weight too)" in lines
    before, after = (load_checkpoint(r, prefer="last").model.state_dict() for r in (parent_run, tmp_path / "child"))
    assert torch.equal(before["rnn.weight_hh_l0"], after["rnn.weight_hh_l0"])
    assert not torch.equal(before["output.weight"], after["output.weight"])
    # a resume freezes what the run froze: the record says the tied embedding trains; a run from before the rule
    # (no such record) resumes with it frozen, as it trained
    assert load_checkpoint(tmp_path / "child", prefer="last").meta["finetune"]["tied_embedding_trains"] is True
    child = dataclasses.replace(tiny(tmp_path / "child", max_steps=2), tie_weights=True, input="embedding")
    train(dataclasses.replace(child, max_steps=3), resume=True, progress=False, log=lambda *_: None)
    resumed = load_checkpoint(tmp_path / "child", prefer="last").model.state_dict()
    assert not torch.equal(after["output.weight"], resumed["output.weight"])
    old = build_model(ModelConfig(vocab_size=6, cell="lstm", num_layers=2, num_hiddens=4, input="embedding",
                                  tie_weights=True))
    assert "embedding.weight" in freeze_layers(old, 1, tied_trains=False) and not old.output.weight.requires_grad


def test_finetune_flags_need_init_from(tmp_path):
    with pytest.raises(ConfigError, match=r"^--extend-vocab and --freeze-layers need --init-from RUN_OR_CHECKPOINT$"):
        train(tiny(tmp_path / "x"), extend_vocab=True, **QUIET)


def test_model_flags_that_differ_from_the_parent_are_refused(parent, tmp_path, capsys):
    """--init-from keeps the parent's model, so a model flag that would change it is one line, exit 2, and
    nothing is trained; flags equal to the parent's are fine."""
    run, _ = parent
    child = tmp_path / "child"
    argv = ["train", "--init-from", str(run), "--corpus", "timemachine", "--run-dir", str(child)]
    assert main([*argv, "--num-hiddens", "512", "--cell", "gru"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"deeprnn: error: --num-hiddens 512 differs from the model in {run} (24 there); fine-tuning "
                    "keeps the parent's model: drop --num-hiddens, or train a new model without --init-from")
    assert not child.exists()
    # ... and so is one from a config file or a preset (they were ignored without a word)
    config = tmp_path / "ft.toml"
    config.write_text('[train]\nnum_hiddens = 512\n')
    assert main([*argv, "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"deeprnn: error: num_hiddens = 512 in {config} differs from the model in {run} (24 there); "
                    f"fine-tuning keeps the parent's model: remove it from {config}, or train a new model without "
                    "--init-from")
    assert main([*argv, "--preset", "d2l-9.3"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"deeprnn: error: --preset d2l-9.3 sets num_hiddens 256, which differs from the model in {run} "
                    "(24 there); fine-tuning keeps the parent's model: drop --preset, or train a new model without "
                    "--init-from")
    assert not child.exists()
    assert main([*argv, "--num-hiddens", "24", "--max-steps", "1", "--max-tokens", "4000", "--batch-size", "8",
                 "--num-steps", "10", "--val-fraction", "0.02", "--test-fraction", "0.02", "--eval-batch-size", "8",
                 "--quiet"]) == 0


def test_info_shows_lineage(parent, tmp_path, capsys):
    run, _ = parent
    train(tiny(tmp_path / "child", max_steps=1), init_from=str(run), **QUIET)
    assert main(["info", str(tmp_path / "child")]) == 0
    out = capsys.readouterr().out
    assert f"lineage     {run / 'best'}" in out


def test_lineage_is_recorded_by_absolute_path(parent, tmp_path, capsys, monkeypatch):
    """A run fine-tuned with a relative --init-from recorded the path as typed: info from another directory lost
    the lineage after it, without a word."""
    import os

    run, _ = parent
    monkeypatch.chdir(tmp_path)
    train(tiny(tmp_path / "child", max_steps=1), init_from=os.path.relpath(run), **QUIET)
    train(tiny(tmp_path / "grandchild", max_steps=1), init_from="child", **QUIET)
    monkeypatch.chdir(run.parent)
    assert main(["info", str(tmp_path / "grandchild")]) == 0
    out = capsys.readouterr().out
    assert f"lineage     {tmp_path / 'child' / 'best'} <- {run / 'best'}\n" in out
    (tmp_path / "child").rename(tmp_path / "moved")
    assert main(["info", str(tmp_path / "grandchild")]) == 0
    assert (f"lineage     {tmp_path / 'child' / 'best'} (not found from here: its own lineage is unknown)"
            in capsys.readouterr().out)
    assert main(["info", str(tmp_path / "grandchild"), "--json"]) == 0  # paths, for programs
    info = json.loads(capsys.readouterr().out)
    assert (info["lineage"], info["lineage_complete"]) == ([str(tmp_path / "child" / "best")], False)


# --- word level ------------------------------------------------------------------------------


def test_word_tokenisation_round_trip():
    text = "Well, said he, don't (you) know? Yes.\nNew line: 3.5% done!"
    words = split_words(text)
    assert words[:6] == ["Well", ",", "said", "he", ",", "don't"]
    assert EOL in words and words[words.index(EOL) + 1] == "New"
    assert join_words(words) == "Well, said he, don't (you) know? Yes.\nNew line: 3.5% done!"


def test_word_level_model_learns(tmp_path):
    cfg = tiny(tmp_path / "w", token="word", input="embedding", tie_weights=True, num_hiddens=32, max_tokens=None,
               val_fraction=0.05, test_fraction=0.05, num_epochs=3, num_steps=12, batch_size=16, lr=5e-3,
               min_freq=3)
    summary = train(cfg, **QUIET)
    losses = val_losses(tmp_path / "w")
    assert losses[-1] < losses[0]
    ck = load_checkpoint(tmp_path / "w")
    assert ck.vocab.token == "word" and ck.model.config.tie_weights
    assert summary["best_val_ppl"] < len(ck.vocab)  # far better than uniform over the vocabulary
    from deeprnn.generate import generate

    out = generate(ck.model, ck.vocab, "the time", 5)[0]
    assert out.startswith("the time ") and len(out.split()) == 7


@pytest.mark.parametrize("k", [3, -1])
def test_freeze_layers_outside_the_parents_depth_is_refused_before_any_text_is_read(parent, tmp_path, k):
    """The parent has 2 layers. Checked against its checkpoint before the corpus is read (here a file that does
    not exist, which would be the error otherwise) and before any fine-tuning line is printed."""
    run, _ = parent
    lines = []
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path / "f", corpus=[str(tmp_path / "missing.txt")]), init_from=str(run), freeze_layers=k,
              progress=False, log=lines.append)
    assert str(e.value) == (f"--freeze-layers must be in [0, 2] (the number of layers of the model in {run}), "
                            f"got {k}")
    assert lines == [] and not (tmp_path / "f").exists()


def test_a_finetune_reads_its_text_as_the_parent_did(tmp_path, capsys):
    """--init-from of a raw word-level run trained the child on d2l text (the default) without a word, and a
    --token left out was refused without saying what to pass; now both come from the parent unless given."""
    import json

    text = tmp_path / "t.txt"
    text.write_text("The Time Traveller, who was here.\nHe said: so it was!\n" * 60)
    small = ["--num-hiddens", "8", "--num-layers", "1", "--batch-size", "4", "--num-steps", "8", "--max-steps", "1",
             "--sample-every", "0", "--eval-batch-size", "4", "--quiet"]
    parent = tmp_path / "parent"
    assert main(["train", "--corpus", str(text), "--token", "word", "--normalization", "raw", "--run-dir", str(parent),
                 *small]) == 0
    child = tmp_path / "child"
    assert main(["train", "--init-from", str(parent), "--corpus", str(text), "--run-dir", str(child), *small]) == 0
    config = json.loads((child / "config.json").read_text())
    assert (config["token"], config["normalization"]) == ("word", "raw")
    capsys.readouterr()
    assert main(["train", "--init-from", str(parent), "--corpus", str(text), "--token", "char",
                 "--run-dir", str(tmp_path / "c2"), *small]) == 2
    assert capsys.readouterr().err == ("deeprnn: error: token must match the parent checkpoint's ('word') when "
                                       "fine-tuning; pass --token word, or train a new model without --init-from\n")
    lower = tmp_path / "lower"  # a flag that is given wins: lowercase text is still the parent's kind of words
    assert main(["train", "--init-from", str(parent), "--corpus", str(text), "--normalization", "lower",
                 "--run-dir", str(lower), *small]) == 0
    assert json.loads((lower / "config.json").read_text())["normalization"] == "lower"
