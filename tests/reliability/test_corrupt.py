"""Truncated, bit-flipped, foreign-version and mismatched checkpoints: a clear CheckpointError, never
a crash and never silently wrong weights."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeprnn import __version__
from deeprnn.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from deeprnn.cli import main
from deeprnn.errors import CheckpointError
from deeprnn.train import TrainConfig, train

FILES = ("model.safetensors", "train_state.safetensors", "checkpoint.json")


@pytest.fixture(scope="module")
def run(small_corpus, tmp_path_factory) -> Path:
    """A real 3-step run: best/ and last/ with weights, optimiser state and RNG."""
    out = tmp_path_factory.mktemp("corrupt") / "run"
    cfg = TrainConfig(corpus=[str(small_corpus)], run_dir=str(out), max_steps=3, num_layers=1, num_hiddens=16,
                      batch_size=4, num_steps=8, eval_batch_size=4, eval_num_steps=64, sample_every=0,
                      num_preds=5, precision="fp32", dropout=0.0)
    train(cfg, progress=False, log=lambda *_: None)
    return out


@pytest.fixture
def ckpt(run, tmp_path) -> Path:
    """A private copy of the run's last/ checkpoint to damage."""
    return Path(shutil.copytree(run / "last", tmp_path / "ckpt"))


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def refused(ckpt: Path, capsys, match: str) -> None:
    """load_checkpoint raises CheckpointError matching ``match``; the CLI says it in one line, exit 2."""
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(ckpt)
    assert "\n" not in str(err.value)
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--num-preds", "3"]) == 2
    err_lines = capsys.readouterr().err.splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("deeprnn: error: "), err_lines


CORRUPT = r"is corrupt (or was edited )?\(SHA-256 mismatch\)"


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", ["truncate-half", "truncate-empty", "flip-header", "flip-data", "garbage"])
def test_damaged_file_is_refused(ckpt, capsys, name, damage):
    f = ckpt / name
    size = f.stat().st_size
    if damage == "truncate-half":
        os.truncate(f, size // 2)
    elif damage == "truncate-empty":
        os.truncate(f, 0)
    elif damage == "flip-header":  # safetensors: 8-byte length, then the JSON header
        flip_bit(f, 12, 3)
    elif damage == "flip-data":
        flip_bit(f, size - 2, 0)
    else:
        f.write_bytes(os.urandom(size))
    path = re.escape(str(f))
    if name != "checkpoint.json":
        message = rf"checkpoint file {path} is corrupt \(SHA-256 mismatch\); use another checkpoint, e\.g\. the run's "
    elif damage == "flip-header":  # inside a string: still JSON, but not what the digest vouched for
        message = rf"{path} is corrupt or was edited \(SHA-256 mismatch\); use another checkpoint, e\.g\. the run's "
    else:  # cut short, random bytes, or its closing brace turned to "|"
        message = rf"{path} is not a deeprnn checkpoint \(not valid JSON\); it may be corrupt or a file from another "
    refused(ckpt, capsys, "^" + message)


@pytest.mark.parametrize("name", FILES)
def test_missing_file_is_refused(ckpt, capsys, name):
    (ckpt / name).unlink()
    if name == "checkpoint.json":
        refused(ckpt, capsys, r"holds no deeprnn checkpoint \(no checkpoint\.json in it, nor in best/ or last/\)")
    else:
        refused(ckpt, capsys, "checkpoint file missing: .*" + name.replace(".", r"\."))


@pytest.mark.parametrize("name, kind", [("checkpoint.json", "directory"), ("model.safetensors", "directory"),
                                        ("model.safetensors", "symlink-loop"), ("checkpoint.json", "symlink-loop")])
def test_a_file_that_cannot_be_read_is_refused(ckpt, capsys, name, kind):
    """A directory or a symlink loop where a checkpoint file should be: an IsADirectoryError or OSError
    traceback in generate, info and serve's model scan before; now one line naming the file."""
    (ckpt / name).unlink()
    if kind == "directory":
        (ckpt / name).mkdir()
    else:
        (ckpt / "a").symlink_to(ckpt / "b")
        (ckpt / "b").symlink_to(ckpt / "a")
        (ckpt / name).symlink_to(ckpt / "a")
    why = "Is a directory" if kind == "directory" else "Too many levels of symbolic links"
    refused(ckpt, capsys, rf"^cannot read checkpoint file {ckpt / name}: {why}$")


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_run_path_that_is_a_broken_link_is_refused(tmp_path, capsys, kind):
    """A link that leads nowhere where the run should be: "no such run" hid that the path is there."""
    link = tmp_path / "run"
    if kind == "dangling":
        link.symlink_to(tmp_path / "gone")
    else:
        link.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(link)
    refused(link, capsys, rf"^{link} is a symbolic link to nothing \(or a loop of links\); point it at a run$")


@pytest.mark.parametrize("body", [b"[]", b"{}", b'{"format": "deeprnn-checkpoint"}', b"null", b"\xff\xfe"])
def test_json_that_is_not_a_checkpoint(ckpt, capsys, body):
    (ckpt / "checkpoint.json").write_bytes(body)
    path = re.escape(str(ckpt / "checkpoint.json"))
    refused(ckpt, capsys, {b"[]": rf"^{path} is not a deeprnn checkpoint \(format field missing\)$",
                           b"{}": rf"^{path} is not a deeprnn checkpoint \(format field missing\)$",
                           b"null": rf"^{path} is not a deeprnn checkpoint \(format field missing\)$",
                           b'{"format": "deeprnn-checkpoint"}': rf"^{path}: checkpoint format version None is not "
                                                                 "supported",
                           b"\xff\xfe": rf"^{path} is not a deeprnn checkpoint \(not valid JSON\)"}[body])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(FILES), where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_single_bit_flip_is_caught(run, which, where, bit):
    """Bit rot anywhere in any file: a CheckpointError, never a crash and never different data.

    The one flip that loads is one that does not change the content: a last digit of a float in
    the JSON whose other spelling parses to the same number (``...885`` -> ``...884``)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(shutil.copytree(run / "last", Path(tmp) / "ckpt"))
        f = ckpt / which
        flip_bit(f, int(where * f.stat().st_size), bit)
        try:
            ck = load_checkpoint(ckpt)
        except CheckpointError:
            return
        good = load_checkpoint(run / "last")
        assert which == "checkpoint.json" and ck.meta == good.meta
        assert all(torch.equal(v, good.model.state_dict()[k]) for k, v in ck.model.state_dict().items())
        assert ck.train_tensors.keys() == good.train_tensors.keys()


def test_a_flipped_bit_in_the_digests_own_name_is_caught(ckpt, capsys):
    """Found by the property test above: ``meta_sha256`` -> ``meta^sha256`` read as a checkpoint without a
    digest, which was accepted as one from before digests (there is none) and loaded with a stray key."""
    f = ckpt / "checkpoint.json"
    flip_bit(f, f.read_bytes().index(b"meta_sha256") + 4, 0)  # '_' (0x5f) -> '^' (0x5e)
    assert b"meta^sha256" in f.read_bytes()
    refused(ckpt, capsys, CORRUPT)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, str(FORMAT_VERSION), None])
def test_other_format_version_is_a_clear_error(ckpt, capsys, edit_meta, version):
    edit_meta(ckpt, lambda meta: meta.update(format_version=version))
    refused(ckpt, capsys, rf"^{re.escape(str(ckpt / 'checkpoint.json'))}: checkpoint format version {version} is "
                          rf"not supported by deeprnn {__version__} "
                          rf"\(expects {FORMAT_VERSION}\); use the deeprnn version that wrote it$")


def test_other_deeprnn_version_same_format_loads(ckpt, edit_meta, capsys):
    """Compatibility follows the format version, not the package version (documented)."""
    edit_meta(ckpt, lambda meta: meta.update(deeprnn_version="9.9.9"))
    ck = load_checkpoint(ckpt)
    assert ck.meta["deeprnn_version"] == "9.9.9"
    assert main(["info", str(ckpt)]) == 0
    assert "(deeprnn 9.9.9)" in capsys.readouterr().out


def test_weights_for_another_config_are_refused(ckpt, capsys, edit_meta):
    edit_meta(ckpt, lambda meta: meta["model_config"].update(num_hiddens=32))
    refused(ckpt, capsys, r"weights in .* do not fit the model config: ")


@pytest.mark.parametrize("edit, diff", [
    # some 16 TB of float32 weights declared: the model used to be built before its weights were compared
    (lambda mc: mc.update(num_hiddens=1_000_000), "embedding.weight: (28, 16) stored, (28, 1000000) declared"),
    (lambda mc: mc.update(num_layers=2), "tensors ['rnn.bias_hh_l1', 'rnn.bias_ih_l1', 'rnn.weight_hh_l1'] in only "
                                         "one of the two"),
])
def test_declared_shapes_are_compared_before_the_model_is_built(ckpt, capsys, edit_meta, edit, diff):
    edit_meta(ckpt, lambda meta: edit(meta["model_config"]))
    refused(ckpt, capsys, rf"^weights in {ckpt} do not fit the model config: {re.escape(diff)}$")


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta["model_config"].update(cell="transformer"),
     "has an invalid model config or vocabulary: cell must be one of rnn_tanh, rnn_relu, gru, lstm; got 'transformer'"),
    # these two said "…: ModelConfig.__init__() got an unexpected keyword argument 'wormholes'" and "…: 'model_config'"
    (lambda meta: meta["model_config"].update(wormholes=3),
     f"has a model_config field this deeprnn ({__version__}) does not know, 'wormholes'; it was written by a newer "
     "deeprnn (upgrade) or edited"),
    (lambda meta: meta.pop("model_config"), "lacks model_config; it is corrupt or was edited"),
    (lambda meta: meta.update(vocab={"idx_to_token": ["a", "a"]}),
     "has an invalid model config or vocabulary: not a deeprnn vocabulary (bad or missing field 'format'); save it "
     "with Vocab.save"),
], ids=["bad-cell", "unknown-field", "no-config", "bad-vocab"])
def test_invalid_config_or_vocab_is_refused(ckpt, capsys, edit_meta, edit, message):
    edit_meta(ckpt, edit)
    refused(ckpt, capsys, f"^{re.escape(str(ckpt / 'checkpoint.json'))} {re.escape(message)}$")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(parent=5), r"has an invalid 'parent' field \(5\)"),
    (lambda m: m["position"].update(step="7"), r"has an invalid 'position' field \(\{.*\"step\": \"7\", .*…\)"),
    (lambda m: m["loader"].update(batch=-1), r"has an invalid 'loader' field \(\{\"batch\": -1, \"epoch\": 0\}\)"),
    (lambda m: m["metrics"].update(val_ppl="x"), r"has an invalid 'metrics' field \(\{\"elapsed_s\": .*…\)"),
    (lambda m: m["plateau"].update(best=[]),
     r"has an invalid 'plateau' field \(\{\"bad\": 0, \"best\": \[\], \"scale\": 1.0\}\)"),
    (lambda m: m.update(evals_done=True), r"has an invalid 'evals_done' field \(true\)"),
    (lambda m: m["data"].pop("sha256"), r"has an invalid 'data' field \(\{\"tokens\": \d+\}\)"),
    (lambda m: m["model_config"].update(residual="yes"),
     r"has an invalid model_config: residual must be of type bool, got str 'yes'"),
    (lambda m: m["train_config"].update(lr="fast"),
     r"has an invalid train_config: lr must be of type float, got str 'fast'"),
    (lambda m: m["train_config"].update(corpus=3),
     r"has an invalid train_config: corpus must be a list of strings, got 3"),
    (lambda m: m["train_config"].update(ar_alpha=10**30),
     r"has an invalid train_config: ar_alpha must be a number of magnitude < 2\*\*63, got 10{30}"),
], ids=["parent", "position", "loader", "metrics", "plateau", "counter", "data", "model-bool", "train-float", "train-list",
        "train-huge"])
def test_a_field_of_the_wrong_type_is_refused(ckpt, capsys, edit_meta, edit, message):
    """A ``checkpoint.json`` edited and re-checksummed (or written by another tool) used to end in a
    ``TypeError`` traceback in ``info``, ``evaluate`` or ``--resume``: read_meta now checks what they read."""
    edit_meta(ckpt, edit)
    refused(ckpt, capsys, rf"^{ckpt}/checkpoint.json {message}; it is corrupt or was edited$")
    assert main(["info", str(ckpt)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_resume_refuses_a_training_state_it_cannot_use(run, tmp_path, edit_meta, capsys):
    """A position without its train_time, or a carried state for another batch size: one line, not a KeyError
    or a shape error from inside the model."""
    for name, edit, message in [
        ("lacks", lambda m: m["position"].pop("train_time"), "{ck}/checkpoint.json lacks position.train_time"),
        ("batch", lambda m: m["train_config"].update(batch_size=8),
         "{ck} carries a hidden state of shape (1, 4, 16) where the run needs (1, 8, 16) (layers, batch, hidden "
         "units)")]:
        copy = Path(shutil.copytree(run, tmp_path / name))
        edit_meta(copy / "last", edit)
        capsys.readouterr()
        assert main(["train", "--resume", str(copy), "--max-steps", "5", "--quiet"]) == 2
        ck = copy / "last"
        assert capsys.readouterr().err == f"deeprnn: error: {message.format(ck=ck)}; it is corrupt or was edited\n"


def test_info_fills_in_the_model_fields_an_older_checkpoint_left_out(ckpt, capsys, edit_meta):
    """``info`` read the model fields from the JSON itself (KeyError for one left out); it now shows the
    model that was loaded, with the default for what is missing, as load_checkpoint builds it."""
    edit_meta(ckpt, lambda meta: meta["model_config"].pop("impl"))
    assert main(["info", str(ckpt)]) == 0
    assert "\nmodel       concise lstm 1x16, input embedding, " in capsys.readouterr().out


def test_vocabulary_smaller_than_the_model_is_refused(ckpt, capsys, edit_meta):
    """A valid vocabulary of another size than the output layer: ``evaluate`` used to score with it anyway."""
    edit_meta(ckpt, lambda meta: meta["vocab"].update(idx_to_token=meta["vocab"]["idx_to_token"][:5]))
    refused(ckpt, capsys, r"has an invalid model config or vocabulary: the model predicts \d+ tokens but the "
                          r"vocabulary has 5$")
    assert main(["evaluate", str(ckpt)]) == 2
    assert "the vocabulary has 5" in capsys.readouterr().err


def test_resume_from_weights_without_training_state(run, tmp_path, capsys):
    """An exported model (weights only) is not a run to resume: say to fine-tune from it instead."""
    src = load_checkpoint(run, prefer="last")
    target = tmp_path / "exported"
    save_checkpoint(target / "last", model=src.model, vocab=src.vocab, meta={"train_config": src.train_config})
    cfg = TrainConfig(**{**src.train_config, "run_dir": str(target)})
    with pytest.raises(CheckpointError, match=r"holds weights but no training state to resume; fine-tune from it "
                                              r"with --init-from instead$"):
        train(cfg, resume=True, progress=False, log=lambda *_: None)
    assert main(["train", "--resume", str(target), "--quiet"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_crash_between_the_two_renames_falls_back_to_the_old_copy(run, tmp_path):
    """save renames last/ -> .last.old, then the new one -> last/; a crash in between loses nothing."""
    r = Path(shutil.copytree(run, tmp_path / "run"))
    os.rename(r / "last", r / ".last.old")
    ck = load_checkpoint(r, prefer="last")
    assert ck.path == r / ".last.old"
    want = load_checkpoint(run, prefer="last").model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in ck.model.state_dict().items())
    # ... and resuming from there carries on and writes a proper last/ again.
    cfg = dataclasses.replace(TrainConfig(**load_checkpoint(r, prefer="last").train_config),
                              run_dir=str(r), max_steps=5)
    assert train(cfg, resume=True, progress=False, log=lambda *_: None)["steps"] == 5
    assert load_checkpoint(r / "last").meta["position"]["step"] == 5


def test_saving_over_a_checkpoint_keeps_a_users_files_in_it(ckpt):
    """Someone's notes in best/ survive every later save into it, and a save killed after its swap left
    them in the trash copy: the next save brings them back. The checkpoint itself is the new one."""
    ck = load_checkpoint(ckpt)
    (ckpt / "notes.txt").write_text("lr 2 was too high\n")
    (ckpt / "plots").mkdir()
    (ckpt / "plots" / "a.png").write_bytes(b"png")
    for step in (7, 8):
        save_checkpoint(ckpt, model=ck.model, vocab=ck.vocab, meta={"position": {"step": step}})
        assert load_checkpoint(ckpt).meta["position"]["step"] == step
        assert (ckpt / "notes.txt").read_text() == "lr 2 was too high\n"
        assert (ckpt / "plots" / "a.png").read_bytes() == b"png"
    trash = ckpt.parent / f".{ckpt.name}.old"
    os.rename(ckpt / "notes.txt", trash.parent / "notes.tmp")
    trash.mkdir()
    os.rename(trash.parent / "notes.tmp", trash / "notes.txt")  # as a save killed before its last step leaves it
    save_checkpoint(ckpt, model=ck.model, vocab=ck.vocab, meta={"position": {"step": 9}})
    assert (ckpt / "notes.txt").read_text() == "lr 2 was too high\n" and not trash.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint.json", "model.safetensors", "notes.txt", "plots",
                                                      "train_state.safetensors"]


def _other_checkpoint(ckpt: Path, dest: Path, edit_meta, shift: float) -> Path:
    """A well-formed checkpoint like ``ckpt`` with other weights: what the next save of a training run writes."""
    import hashlib

    from safetensors.torch import load_file, save_file

    other = Path(shutil.copytree(ckpt, dest))
    weights = load_file(other / "model.safetensors")
    save_file({k: v + shift for k, v in weights.items()}, other / "model.safetensors")
    digest = hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest()
    edit_meta(other, lambda m: m["files"].update({"model.safetensors": digest}))
    return other


@pytest.mark.parametrize("saves", [1, 3])
def test_a_checkpoint_replaced_while_it_is_read_is_read_again(ckpt, tmp_path, monkeypatch, edit_meta, saves):
    """``generate`` or ``info`` of a run still training: a save between the reads of checkpoint.json and of the
    tensors read as "corrupt (SHA-256 mismatch)", 6 times in 7 in a real race, and a user might delete a good
    checkpoint for it. Now a checkpoint.json that changed meanwhile means read again (3 reads in all)."""
    from deeprnn import checkpoint as ck

    nexts = [_other_checkpoint(ckpt, tmp_path / f"save{i}", edit_meta, shift=i + 1) for i in range(saves)]
    real = ck.load_tensors

    def a_save_lands(ckpt_dir, name, meta):
        if nexts and name == "model.safetensors":  # as training does: a new directory renamed into place
            shutil.rmtree(ckpt)
            shutil.copytree(nexts.pop(0), ckpt)
        return real(ckpt_dir, name, meta)

    monkeypatch.setattr(ck, "load_tensors", a_save_lands)
    if saves == 1:
        loaded = load_checkpoint(ckpt)  # the second read: the new checkpoint, whole
        assert loaded.meta["files"]["model.safetensors"] == json.loads(
            (tmp_path / "save0" / "checkpoint.json").read_text())["files"]["model.safetensors"]
    else:
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(ckpt)
        assert str(e.value) == (f"{ckpt} changed each time it was read (is a run still training into it?); try "
                                "again, or read it once the run stops")
    # Real damage (nothing changes between the reads) is still reported at once, as it is.
    monkeypatch.setattr(ck, "load_tensors", real)
    flip_bit(ckpt / "model.safetensors", 200)
    with pytest.raises(CheckpointError, match=r"^checkpoint file .*model\.safetensors is corrupt \(SHA-256 mismatch\)"):
        load_checkpoint(ckpt)
