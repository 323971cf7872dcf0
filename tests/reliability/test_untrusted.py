"""Untrusted files: nothing is ever unpickled, and config files cannot aim writes outside the run.

The payload is a pickle whose ``__reduce__`` creates a marker file when unpickled; whatever
deeprnn is given, the marker must never appear.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle  # the test builds the hostile files; src/ itself never imports pickle
import shutil
from pathlib import Path

import pytest
import torch

from deeprnn.checkpoint import load_checkpoint, save_checkpoint
from deeprnn.cli import build_parser, build_train_config
from deeprnn.errors import CheckpointError, ConfigError
from deeprnn.models import ModelConfig, build_model
from deeprnn.vocab import Vocab

SRC = Path(__file__).resolve().parents[2] / "src" / "deeprnn"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def hostile(marker, tmp_path) -> dict[str, bytes]:
    """The same payload as a raw pickle and as a ``torch.save`` archive (a pickle in a zip)."""
    raw = pickle.dumps({"state_dict": _Payload(marker)})
    torch_file = tmp_path / "payload.pt"
    torch.save({"model": _Payload(marker)}, torch_file)
    assert not marker.exists()
    # Sanity: the payload really works when unpickled, so its absence later means something.
    pickle.loads(raw)
    assert marker.exists()
    marker.unlink()
    return {"pickle": raw, "torch.save": torch_file.read_bytes()}


@pytest.fixture
def good_ckpt(tmp_path) -> Path:
    vocab = Vocab("hello world")
    model = build_model(ModelConfig(vocab_size=len(vocab), cell="gru", num_layers=1, num_hiddens=4))
    return save_checkpoint(tmp_path / "good", model=model, vocab=vocab, meta={})


CLI_CALLS = (["generate"], ["info"], ["evaluate"], ["train", "--resume"], ["train", "--init-from"])


def cli_refuses(cli_error, path: Path) -> list[str]:
    """The error line of each of CLI_CALLS on ``path``."""
    extra = {"--init-from": ["--corpus", "x.txt"]}
    return [cli_error([*argv, str(path), *extra.get(argv[-1], [])]) for argv in CLI_CALLS]


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("victim", ["model.safetensors", "train_state.safetensors", "checkpoint.json"])
def test_pickle_in_place_of_a_checkpoint_file_is_refused(tmp_path, good_ckpt, hostile, marker, cli_error,
                                                         kind, victim):
    ckpt = tmp_path / "evil"
    shutil.copytree(good_ckpt, ckpt)
    (ckpt / victim).write_bytes(hostile[kind])
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)
    for argv, line in zip(CLI_CALLS, cli_refuses(cli_error, ckpt)):
        if argv[:2] == ["train", "--resume"]:  # refused before anything is read: not a run directory
            assert line == (f"deeprnn: error: {ckpt} is a checkpoint directory, not a run; --resume takes a run "
                            f"directory (to train on from these weights: --init-from {ckpt})")
        else:
            assert line.startswith("deeprnn: error: ") and ("corrupt" in line or "not a deeprnn checkpoint" in line)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_pickle_with_a_matching_checksum_is_still_refused(tmp_path, good_ckpt, hostile, marker, kind, edit_meta):
    """Someone who also fixes up checkpoint.json: the checksums pass, the safetensors parser refuses."""
    ckpt = tmp_path / "evil"
    shutil.copytree(good_ckpt, ckpt)
    (ckpt / "model.safetensors").write_bytes(hostile[kind])
    sha = hashlib.sha256(hostile[kind]).hexdigest()
    edit_meta(ckpt, lambda meta: meta["files"].update({"model.safetensors": sha}))
    with pytest.raises(CheckpointError, match=r"model.safetensors cannot be read"):
        load_checkpoint(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors", "checkpoint.json", "best.ckpt"])
def test_a_lone_pickle_file_is_refused(tmp_path, hostile, marker, cli_error, name):
    f = tmp_path / "download" / name
    f.parent.mkdir()
    f.write_bytes(hostile["torch.save"])
    message = {
        "model.pt": f"{f} is a file, not a deeprnn checkpoint directory (expected a run directory or a directory "
                    "holding checkpoint.json)",
        "best.ckpt": f"{f} is a file, not a deeprnn checkpoint directory (expected a run directory or a directory "
                     "holding checkpoint.json)",
        "model.safetensors": f"{f.parent} holds no deeprnn checkpoint (no checkpoint.json in it, nor in best/ or last/)",
        "checkpoint.json": f"{f} is not a deeprnn checkpoint (not valid JSON); it may be corrupt or a file from another "
                           "program (pickles are never loaded)",
    }[name]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(f)
    assert str(err.value) == message
    for line in cli_refuses(cli_error, f):
        assert line == f"deeprnn: error: {message}"
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
            yield node, owner, name


def test_source_never_unpickles():
    """No pickle-family import anywhere in src/, and any torch.load passes weights_only=True."""
    banned = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            problems += [f"{path.name}:{node.lineno} imports {n}" for n in names if n in banned]
        for node, owner, name in _calls(tree):
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                flag = kw.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if owner in ("np", "numpy") and name == "load":
                flag = kw.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    problems.append(f"{path.name}:{node.lineno} numpy.load may unpickle")
    # The same, as plain text, for anything the AST walk would miss (e.g. `from torch import load`).
    for path in files:
        text = path.read_text(encoding="utf-8")
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code and "weights_only=True" not in code:
                problems.append(f"{path.name}:{i} {line.strip()}")
            if "from torch import" in code and " load" in code:
                problems.append(f"{path.name}:{i} {line.strip()}")
    assert problems == []


# --- paths from config files -----------------------------------------------------------------------


def _cfg_from(tmp_path: Path, run_dir: str):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[train]\nrun_dir = {json.dumps(run_dir)}\n")
    return build_train_config(build_parser().parse_args(["train", "--config", str(cfg)]))


@pytest.mark.parametrize("run_dir", ["/tmp/elsewhere", "../outside", "runs/../../outside", "~/runs/x", "..",
                                     "runs/a/../../../x", ""])
def test_config_file_run_dir_cannot_escape(tmp_path, monkeypatch, cli_error, run_dir):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match=r"run_dir must be a relative path inside the current directory"):
        _cfg_from(tmp_path, run_dir)
    cfg = tmp_path / "c.toml"
    line = cli_error(["train", "--config", str(cfg)])
    assert line.startswith(f"deeprnn: error: {cfg}: run_dir must be a relative path inside the current directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "work"] and not any(work.iterdir())


def test_config_file_run_dir_cannot_escape_through_a_symlink(tmp_path, monkeypatch, cli_error):
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    (work / "runs").symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(work)
    with pytest.raises(ConfigError, match=r"leads outside the current directory through a symbolic link"):
        _cfg_from(tmp_path, "runs/mine")
    assert not any(outside.iterdir())


def test_config_file_run_dir_inside_is_fine_and_flags_may_go_anywhere(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert _cfg_from(tmp_path, "runs/exp1").run_dir == "runs/exp1"
    assert _cfg_from(tmp_path, "./runs/./exp2").run_dir == "./runs/./exp2"
    # A path typed on the command line is the user's own choice, and wins over the file.
    cfg = tmp_path / "c.toml"
    args = build_parser().parse_args(["train", "--config", str(cfg), "--run-dir", str(tmp_path / "abs")])
    assert build_train_config(args).run_dir == str(tmp_path / "abs")
