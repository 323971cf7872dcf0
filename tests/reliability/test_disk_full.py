"""Disk full (ENOSPC) while saving: a clear error, the previous checkpoint intact, nothing half
written left behind, and the run resumable to the very same result."""

from __future__ import annotations

import csv
import dataclasses
import errno
import os

import pytest
import torch

import deeprnn.checkpoint as ckpt_mod
from deeprnn.checkpoint import load_checkpoint, save_checkpoint
from deeprnn.cli import main
from deeprnn.errors import CheckpointError
from deeprnn.models import ModelConfig, build_model
from deeprnn.train import train
from deeprnn.vocab import Vocab


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk_fills_after(monkeypatch):
    """``disk_fills_after(n)``: the first ``n`` file writes of checkpoints succeed, later ones fail."""

    def install(n: int):
        real = ckpt_mod._write_file
        count = {"n": 0}

        def write(path, data):
            count["n"] += 1
            if count["n"] > n:
                enospc()
            real(path, data)

        monkeypatch.setattr(ckpt_mod, "_write_file", write)
        return count

    return install


def model_and_vocab(seed: int):
    torch.manual_seed(seed)
    vocab = Vocab("hello world")
    return build_model(ModelConfig(vocab_size=len(vocab), cell="lstm", num_layers=1, num_hiddens=8)), vocab


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fail_at", ["model", "state", "json", "fsync", "mkdtemp"])
def test_enospc_keeps_the_previous_checkpoint(tmp_path, monkeypatch, disk_fills_after, fail_at):
    old_model, vocab = model_and_vocab(0)
    save_checkpoint(tmp_path / "last", model=old_model, vocab=vocab, meta={"version": 1})
    new_model, _ = model_and_vocab(1)
    before = {k: v.clone() for k, v in new_model.state_dict().items()}
    if fail_at == "fsync":
        monkeypatch.setattr(ckpt_mod.os, "fsync", enospc)
    elif fail_at == "mkdtemp":
        monkeypatch.setattr(ckpt_mod.tempfile, "mkdtemp", enospc)
    else:
        disk_fills_after({"model": 0, "state": 1, "json": 2}[fail_at])
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / "last", model=new_model, vocab=vocab, meta={"version": 2})
    assert str(err.value) == (f"no space left on device while saving checkpoint {tmp_path / 'last'}; the previous "
                               "checkpoint is intact: free some disk space and resume")
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path / "last")
    assert ck.meta["version"] == 1 and same_weights(ck.model, old_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temp directory left behind
    # The in-memory model is untouched and saves fine once there is space again.
    assert all(torch.equal(v, before[k]) for k, v in new_model.state_dict().items())
    save_checkpoint(tmp_path / "last", model=new_model, vocab=vocab, meta={"version": 2})
    assert load_checkpoint(tmp_path / "last").meta["version"] == 2


def test_other_write_errors_are_clear_too(tmp_path, monkeypatch):
    model, vocab = model_and_vocab(0)
    monkeypatch.setattr(ckpt_mod, "_write_file",
                        lambda *_: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(CheckpointError, match=r"^cannot write checkpoint .*last: Permission denied$"):
        save_checkpoint(tmp_path / "last", model=model, vocab=vocab, meta={})


def rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_disk_full_during_training_then_resume_gives_the_uninterrupted_result(
        tiny_cfg, tmp_path, disk_fills_after, monkeypatch, capsys, flags, small_corpus):
    """ENOSPC at the second evaluation's save: the CLI says so in one line (exit 2); last/ is the
    first evaluation's; after space is freed, --resume ends exactly where a clean run ends."""
    clean = tiny_cfg(run_dir=str(tmp_path / "clean"), max_steps=9, eval_every=3)
    train(clean, progress=False, log=lambda *_: None)

    disk_fills_after(6)  # step 3 saves best/ and last/ (3 files each); every later write fails
    run = tmp_path / "full"
    argv = ["train", "--corpus", str(small_corpus), "--run-dir", str(run),
            *flags(max_steps=9, eval_every=3)]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"deeprnn: error: no space left on device while saving checkpoint {run / 'best'}; the "
                   "previous checkpoint is intact: free some disk space and resume"]  # step 6 improved
    assert load_checkpoint(run, prefer="last").meta["position"]["step"] == 3  # .last.old fallback or last/
    monkeypatch.undo()  # space freed
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    capsys.readouterr()
    a, b = load_checkpoint(tmp_path / "clean", prefer="last"), load_checkpoint(run, prefer="last")
    assert a.meta["position"]["step"] == b.meta["position"]["step"] == 9
    assert same_weights(a.model, b.model)
    assert rows(tmp_path / "clean")[-1]["val_loss"] == rows(run)[-1]["val_loss"]
    assert dataclasses.asdict(clean)["lr"] == b.train_config["lr"]
