"""Fixtures for the reliability suite: a small corpus, tiny configs, one-line-error checks.

Everything here is sized so the whole suite runs in well under two minutes on a busy 2-core
machine: 1 layer x 16 hidden units, batch 4, windows of 8, a ~6,000-character corpus, fp32.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from deeprnn.cli import main
from deeprnn.train import TrainConfig

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"

TINY = dict(num_layers=1, num_hiddens=16, batch_size=4, num_steps=8, max_tokens=2000, eval_batch_size=4,
            eval_num_steps=64, sample_every=0, num_preds=5, precision="fp32", dropout=0.0, seed=0)


def tiny_flags(**overrides) -> list[str]:
    """The TINY config as command-line flags (``--quiet`` included)."""
    values = {**TINY, **overrides}
    flags = []
    for k, v in values.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    return [*flags, "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every reliability test runs on one torch thread (``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """About 6,000 characters of The Time Machine (d2l-normalised: 27 distinct characters)."""
    text = (SRC / "deeprnn" / "data" / "timemachine.txt").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(text[:6300], encoding="utf-8")
    return path


@pytest.fixture
def tiny_cfg(small_corpus, tmp_path):
    """``tiny_cfg(**overrides) -> TrainConfig`` writing to ``tmp_path / "run"``."""

    def make(**kw) -> TrainConfig:
        base = dict(corpus=[str(small_corpus)], run_dir=str(tmp_path / "run"), max_steps=6, **TINY)
        base.update(kw)
        return TrainConfig(**base)

    return make


@pytest.fixture
def cli_error(capsys):
    """``cli_error(argv) -> line``: run the CLI, expect exit status 2 and exactly one stderr line.

    Usage errors found by argparse exit through ``SystemExit(2)``; errors found later return 2.
    """

    def run(argv: list[str], code: int = 2) -> str:
        capsys.readouterr()
        try:
            got = main(argv)
        except SystemExit as e:
            got = e.code
        err = capsys.readouterr().err
        assert got == code, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].strip(), err
        assert lines[0].startswith("deeprnn"), lines[0]
        return lines[0]

    return run


def subprocess_env() -> dict[str, str]:
    """Environment for ``python -m deeprnn`` children: offline, one thread, headless plots."""
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", DEEPRNN_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


PYTHON = sys.executable


@pytest.fixture
def flags():
    """``flags(**overrides) -> list[str]``: the tiny config as command-line flags."""
    return tiny_flags


@pytest.fixture
def child_env() -> dict[str, str]:
    return subprocess_env()


def rewrite_meta(ckpt: Path, edit) -> None:
    """Edit a checkpoint's JSON as a well-formed writer would: ``edit(meta)``, then a fresh checksum."""
    import json

    from deeprnn.checkpoint import META_DIGEST, META_FILE, _meta_digest

    meta = json.loads((ckpt / META_FILE).read_text())
    meta.pop(META_DIGEST, None)
    edit(meta)
    meta[META_DIGEST] = _meta_digest(meta)
    (ckpt / META_FILE).write_text(json.dumps(meta))


@pytest.fixture
def edit_meta():
    """``edit_meta(ckpt_dir, fn)``: see :func:`rewrite_meta`."""
    return rewrite_meta
