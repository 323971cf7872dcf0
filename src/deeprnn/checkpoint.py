"""Checkpoints as data, never code: tensors in safetensors, everything else in JSON.

A checkpoint is a directory::

    best/                      # or last/
      model.safetensors        # the LanguageModel's state_dict
      train_state.safetensors  # optimiser tensors, RNG states, carried hidden state (optional)
      checkpoint.json          # format, versions, configs, vocab, position, metrics, file SHA-256s
                               # and its own SHA-256 (``meta_sha256``)

It is written into a temporary sibling directory, every file fsynced, then renamed over the old one,
so a crash (even ``kill -9``) at any moment leaves either the old or the new checkpoint, never a mix
(between the two renames the old one sits in ``.NAME.old``, which loading falls back to). A full
disk raises :class:`CheckpointError` and leaves the old checkpoint as it was. Loading checks every
SHA-256 before parsing anything and never unpickles: a corrupt, truncated, foreign or newer-format
checkpoint is a :class:`CheckpointError`, never a crash or silently wrong weights.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from deeprnn import __version__
from deeprnn.errors import CheckpointError, ConfigError
from deeprnn.fields import check_types, is_number, shorten
from deeprnn.files import new_file_mode

FORMAT = "deeprnn-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
META_FILE = "checkpoint.json"
FILES = frozenset({MODEL_FILE, STATE_FILE, META_FILE})  # everything save_checkpoint writes
META_DIGEST = "meta_sha256"  # key in checkpoint.json: SHA-256 of the rest of it (see _meta_digest)


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns. ``model`` is built and loaded, on ``map_location``."""

    path: Path
    meta: dict[str, Any]
    model: torch.nn.Module
    vocab: Any
    train_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def train_config(self) -> dict[str, Any]:
        return self.meta.get("train_config", {})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``checkpoint.json``'s content in canonical form (sorted keys, no spaces)."""
    return _sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Delete temp directories a killed save of ``name`` left behind (one writer per run)."""
    for stale in parent.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser ``state_dict`` into tensors (for safetensors) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    """Inverse of :func:`optimizer_to_flat`; loads into ``optimizer`` in place."""
    try:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if not key.startswith("optim."):
                continue
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
        for idx, values in meta.get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"optimizer state does not match this model/optimizer: {e}") from None


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies for tensors that share storage (tied embedding/output weights): safetensors refuses
    aliases, and loading the two equal copies into one tied parameter restores the tie."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    vocab: Any,
    meta: dict[str, Any],
    train_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint directory atomically; returns its path.

    ``meta`` must be JSON-serialisable; ``model_config`` is taken from ``model.config``.
    Raises :class:`CheckpointError` (the previous checkpoint intact) when the disk is full or
    the directory cannot be written.
    """
    if len(vocab) != model.config.vocab_size:  # load_checkpoint would refuse what this wrote
        raise CheckpointError(f"cannot save {path}: the model predicts {model.config.vocab_size} tokens but the "
                              f"vocabulary has {len(vocab)}; save the vocabulary the model was built for")
    path = Path(path)
    parent = path.parent
    model_sd = _unshared({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    model_bytes = st_save(model_sd)
    state_bytes = st_save({k: v.detach().cpu().contiguous() for k, v in (train_tensors or {}).items()})
    full_meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "deeprnn_version": __version__,
        "model_config": dataclasses.asdict(model.config),
        "vocab": vocab.to_dict(),
        **meta,
        "files": {MODEL_FILE: _sha256(model_bytes), STATE_FILE: _sha256(state_bytes)},
    }
    # The JSON carries its own checksum too, so a flipped bit in the vocabulary or the config is
    # caught like one in the tensors (computed on the JSON round trip that loading will see).
    full_meta = json.loads(json.dumps(full_meta))
    full_meta[META_DIGEST] = _meta_digest(full_meta)
    meta_bytes = json.dumps(full_meta, indent=1, sort_keys=True).encode()
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
        tmp.chmod(new_file_mode("dir"))  # mkdtemp's 0700 would make best/ and last/ the owner's alone
        _write_file(tmp / MODEL_FILE, model_bytes)
        _write_file(tmp / STATE_FILE, state_bytes)
        _write_file(tmp / META_FILE, meta_bytes)
        _fsync_dir(tmp)
        old = None
        if path.exists():
            # Two renames: old -> trash, tmp -> path. Between them `path` is missing, never half
            # written; load_checkpoint falls back to the trash copy if it finds one.
            old = parent / f".{path.name}.old"
            if old.exists():
                _carry_foreign(old, path)  # a save killed after the swap: the user's files are still there
                shutil.rmtree(old)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            _carry_foreign(old, path)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on device while saving checkpoint {path}; the previous checkpoint "
                "is intact: free some disk space and resume"
            ) from None
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    return path


def _carry_foreign(src: Path, dst: Path) -> None:
    """Move what is not a checkpoint file (someone's notes put into ``best/``) from a replaced checkpoint
    directory into the new one, so that a save never deletes a user's file; a name the new directory
    already has is left alone."""
    if not dst.is_dir():
        return
    for entry in src.iterdir():
        if entry.name not in FILES and not (dst / entry.name).exists():
            os.rename(entry, dst / entry.name)


def is_own_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is a directory holding only what :func:`save_checkpoint` writes, with a
    ``checkpoint.json`` in deeprnn's format: a directory that may be removed without losing anyone's files."""
    try:
        names = {p.name for p in path.iterdir()}
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return names <= FILES and isinstance(meta, dict) and meta.get("format") == FORMAT


def resolve_checkpoint(run_or_ckpt: str | os.PathLike, prefer: str = "best") -> Path:
    """Map a run directory or a checkpoint directory to a checkpoint directory.

    A run directory resolves to ``best/`` (or ``last/`` with ``prefer="last"``), falling back
    to the other one.
    """
    if not os.fspath(run_or_ckpt).strip():  # an unset shell variable: Path("") is the current directory
        raise CheckpointError("the run or checkpoint path is empty; name a run directory or a checkpoint")
    p = Path(run_or_ckpt)
    if not p.exists():
        if p.is_symlink():
            raise CheckpointError(f"{p} is a symbolic link to nothing (or a loop of links); point it at a run")
        raise CheckpointError(f"no such run or checkpoint: {p}")
    if p.is_file() and p.name in (META_FILE, MODEL_FILE, STATE_FILE):
        p = p.parent
    if p.is_file():
        raise CheckpointError(
            f"{p} is a file, not a deeprnn checkpoint directory (expected a run directory or a "
            f"directory holding {META_FILE})"
        )
    if _present(p / META_FILE):
        return p
    order = ["best", "last"] if prefer == "best" else ["last", "best"]
    for name in order:
        cand = p / name
        if _present(cand / META_FILE):
            return cand
        old = p / f".{name}.old"
        if _present(old / META_FILE):  # crashed between the two renames of a save
            return old
    raise CheckpointError(f"{p} holds no deeprnn checkpoint (no {META_FILE} in it, nor in best/ or last/)")


def holds_checkpoint(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds a checkpoint (its ``checkpoint.json``, even a damaged one)."""
    return _present(ckpt_dir / META_FILE)


def _present(path: Path) -> bool:
    """Whether ``path`` is there, counting a link that leads nowhere, so that reading it names the fault."""
    return path.exists() or path.is_symlink()


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except OSError as e:  # a directory in its place, a symlink loop, no permission
        raise CheckpointError(f"cannot read checkpoint file {path}: {e.strerror or e}") from None


def _read_verified(path: Path, expected: str | None) -> bytes:
    data = _read_file(path)
    if expected is not None and _sha256(data) != expected:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt (SHA-256 mismatch); use another checkpoint, "
            "e.g. the run's last/ or best/"
        )
    return data


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """Read and check ``checkpoint.json`` of a checkpoint directory."""
    meta_path = ckpt_dir / META_FILE
    raw = _read_file(meta_path)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{meta_path} is not a deeprnn checkpoint (not valid JSON); it may be corrupt or a "
            "file from another program (pickles are never loaded)"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a deeprnn checkpoint (format field missing)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format version {version} is not supported by deeprnn {__version__} "
            f"(expects {FORMAT_VERSION}); use the deeprnn version that wrote it"
        )
    # Every checkpoint deeprnn wrote has one: a missing digest is damage too (a flipped bit in its key).
    expected = meta.pop(META_DIGEST, None)
    if expected != _meta_digest(meta):
        raise CheckpointError(
            f"{meta_path} is corrupt or was edited (SHA-256 mismatch); use another checkpoint, "
            "e.g. the run's last/ or best/"
        )
    # Every tensor file must carry its SHA-256: without one a flipped bit would load as garbage.
    files = meta.get("files")
    if not (isinstance(files, dict) and isinstance(files.get(MODEL_FILE), str)
            and all(isinstance(v, str) for v in files.values())):
        raise CheckpointError(f"{meta_path} lacks the SHA-256 of its tensor files; it is corrupt or was edited")
    for name, valid in _META_FIELDS.items():  # what the readers index into, checked once here
        if name in meta and not valid(meta[name]):
            raise CheckpointError(f"{meta_path} has an invalid {name!r} field ({shorten(json.dumps(meta[name]), 60)}); "
                                  "it is corrupt or was edited")
    from deeprnn.models import ModelConfig
    from deeprnn.train import TrainConfig

    for name, cls in (("model_config", ModelConfig), ("train_config", TrainConfig)):  # their fields' types
        try:
            check_types(cls, meta.get(name, {}))
        except ConfigError as e:
            raise CheckpointError(f"{meta_path} has an invalid {name}: {e}; it is corrupt or was edited") from None
    return meta


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _record(*, whole: bool = False, **fields: Callable[[object], bool]) -> Callable[[object], bool]:
    """A JSON object whose fields among these are valid; with ``whole``, every one of them is there (else a
    reader that needs one checks it is there)."""
    return lambda v: (isinstance(v, dict) and all(ok(v[k]) for k, ok in fields.items() if k in v)
                      and (not whole or fields.keys() <= v.keys()))


def _values(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    """A JSON object whose every value is valid."""
    return lambda v: isinstance(v, dict) and all(valid(x) for x in v.values())


def _or_none(valid: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: v is None or valid(v)


def _is(kind: type) -> Callable[[object], bool]:
    return lambda v: isinstance(v, kind)


# The records a resume reads, each field with its check (train.resume requires every one of them).
RESUME_RECORDS: dict[str, dict[str, Callable[[object], bool]]] = {
    "position": {"step": _count, "epoch": _count, "tokens": _count, "train_time": is_number},
    "loader": {"epoch": _count, "batch": _count},
}

# checkpoint.json's fields beyond the format's own (each optional: a weights-only export has few of them)
_META_FIELDS: dict[str, Callable[[object], bool]] = {
    "model_config": _is(dict), "vocab": _is(dict), "train_config": _is(dict), "optimizer": _is(dict),
    "plateau": _record(best=_or_none(is_number), bad=_count, scale=is_number),
    "metrics": _or_none(_values(_or_none(is_number))), "finetune": _or_none(_is(dict)),
    "parent": _or_none(_is(str)), "deeprnn_version": _or_none(_is(str)),
    **{name: _record(**fields) for name, fields in RESUME_RECORDS.items()},
    "data": _record(whole=True, tokens=_count, sha256=_is(str)),  # compared whole on resume
    "interval": lambda v: _record(whole=True, loss_sum=is_number, count=_count, tokens=_count, time=is_number)(v)
    and ("ranks" not in v or isinstance(v["ranks"], list) and all(  # each rank's [loss sum, count, tokens]
        isinstance(r, list) and len(r) == 3 and is_number(r[0]) and _count(r[1]) and _count(r[2])
        for r in v["ranks"])),
    "best_val": _or_none(is_number), "lr_scale": is_number,
    "bad_evals": _count, "evals_done": _count, "nan_rollbacks": _count,
}


def load_tensors(ckpt_dir: Path, name: str, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, after checking its SHA-256 against ``meta``."""
    expected = meta["files"].get(name)
    if expected is None:
        raise CheckpointError(f"{ckpt_dir / META_FILE} has no SHA-256 for {name}; it is corrupt or was edited")
    data = _read_verified(ckpt_dir / name, expected)
    try:
        return st_load(data)
    except (SafetensorError, Exception) as e:  # safetensors raises several types on garbage
        raise CheckpointError(f"checkpoint file {ckpt_dir / name} cannot be read: {e}") from None


READ_ATTEMPTS = 3  # load_checkpoint's reads of a checkpoint that a running training keeps replacing


def _meta_seen(run_or_ckpt: str | os.PathLike, prefer: str) -> tuple[Path, bytes] | None:
    """Which checkpoint ``run_or_ckpt`` names now, and its ``checkpoint.json``: what a save replaces."""
    try:
        ckpt_dir = resolve_checkpoint(run_or_ckpt, prefer=prefer)
        return ckpt_dir, (ckpt_dir / META_FILE).read_bytes()
    except (CheckpointError, OSError):
        return None


def load_checkpoint(run_or_ckpt: str | os.PathLike, map_location: str | torch.device = "cpu",
                    prefer: str = "best") -> Checkpoint:
    """Load a checkpoint (or a run's best/last) onto ``map_location``; never unpickles. The model comes back in
    eval mode (dropout off); call ``.train()`` on it to train it.

    A run still training replaces ``best/`` and ``last/`` whole. A save that lands between the reads of
    ``checkpoint.json`` and of the tensors it vouches for would read as damage (a digest mismatch, a file
    missing): when ``checkpoint.json`` has changed since, the checkpoint is read again, up to
    :data:`READ_ATTEMPTS` times in all."""
    seen = _meta_seen(run_or_ckpt, prefer)
    for _ in range(READ_ATTEMPTS):
        try:
            return _load_checkpoint(run_or_ckpt, map_location, prefer)
        except CheckpointError:
            now = _meta_seen(run_or_ckpt, prefer)
            if now == seen:  # the same checkpoint as before the read: the fault is in it
                raise
            seen = now  # what the next read will find, unless another save lands
    where = seen[0] if seen else Path(run_or_ckpt)
    raise CheckpointError(f"{where} changed each time it was read (is a run still training into it?); try again, "
                          "or read it once the run stops")


def _load_checkpoint(run_or_ckpt: str | os.PathLike, map_location: str | torch.device, prefer: str) -> Checkpoint:
    from deeprnn.errors import VocabError
    from deeprnn.models import ModelConfig, build_model
    from deeprnn.vocab import Vocab

    ckpt_dir = resolve_checkpoint(run_or_ckpt, prefer=prefer)
    meta = read_meta(ckpt_dir)
    lacking = [name for name in ("model_config", "vocab") if name not in meta]
    if lacking:
        raise CheckpointError(f"{ckpt_dir / META_FILE} lacks {' and '.join(lacking)}; it is corrupt or was edited")
    unknown = sorted(meta["model_config"].keys() - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:  # a field that may change what the model computes: never dropped silently
        raise CheckpointError(f"{ckpt_dir / META_FILE} has a model_config field this deeprnn ({__version__}) does not "
                              f"know, {unknown[0]!r}; it was written by a newer deeprnn (upgrade) or edited")
    try:
        config = ModelConfig(**meta["model_config"])
        config.validate()
        vocab = Vocab.from_dict(meta["vocab"])
    except (KeyError, TypeError, ValueError, AttributeError, VocabError) as e:
        raise CheckpointError(f"{ckpt_dir / META_FILE} has an invalid model config or vocabulary: {e}") from None
    if config.vocab_size != len(vocab):  # every consumer indexes one with the other's ids
        raise CheckpointError(f"{ckpt_dir / META_FILE} has an invalid model config or vocabulary: the model predicts "
                              f"{config.vocab_size} tokens but the vocabulary has {len(vocab)}")
    sd = load_tensors(ckpt_dir, MODEL_FILE, meta)
    with torch.device("meta"):  # the declared model's shapes, before memory is spent on it (a forged config)
        declared = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in sd.items()}
    if declared != stored:
        diff = next((f"{k}: {stored[k]} stored, {declared[k]} declared" for k in declared
                     if k in stored and stored[k] != declared[k]), None) or \
            f"tensors {sorted(declared.keys() ^ stored.keys())[:3]} in only one of the two"
        raise CheckpointError(f"weights in {ckpt_dir} do not fit the model config: {diff}")
    model = build_model(config)
    model.load_state_dict(sd)
    model.to(map_location)
    model.eval()  # for inference, as loaded models are: dropout off (training calls .train() itself)
    train_tensors = load_tensors(ckpt_dir, STATE_FILE, meta) if STATE_FILE in meta["files"] else {}
    return Checkpoint(path=ckpt_dir, meta=meta, model=model, vocab=vocab, train_tensors=train_tensors)
