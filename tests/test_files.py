"""deeprnn.files: files written whole or not at all, with the permissions a plain open() gives."""

import os
import stat

import torch

from deeprnn.checkpoint import save_checkpoint
from deeprnn.files import UMASK, new_file_mode, write_text_atomic
from deeprnn.models import ModelConfig, build_model
from deeprnn.vocab import Vocab


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_checkpoints_get_the_permissions_open_and_mkdir_give(tmp_path):
    """tempfile's 0600 and 0700 were what report.md, results.csv, summary.json and a checkpoint folder were
    renamed into place with: readable by their owner only."""
    current = os.umask(0o022)
    os.umask(current)
    assert UMASK == current
    write_text_atomic(tmp_path / "report.md", "± UTF-8\n")
    with open(tmp_path / "plain.md", "w") as f:
        f.write("x")
    assert mode(tmp_path / "report.md") == mode(tmp_path / "plain.md") == new_file_mode() == 0o666 & ~current
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "± UTF-8\n"
    vocab = Vocab("abc")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(vocab), cell="gru", num_hiddens=4))
    save_checkpoint(tmp_path / "best", model=model, vocab=vocab, meta={})
    (tmp_path / "made").mkdir()
    assert mode(tmp_path / "best") == mode(tmp_path / "made") == new_file_mode("dir") == 0o777 & ~current
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
