"""A run's directory: creating it without clobbering anyone's files, recognising what deeprnn wrote there,
the lock held while a process trains it, and its ``metrics.csv`` and ``curve.png``.

What a run directory holds::

    RUN/
      config.json  metrics.csv  curve.png  summary.json     (RUN_FILES)
      best/  last/                                           (CHECKPOINT_DIRS, with .best.old/ and .last.old/
                                                              between a save's two renames; deeprnn.checkpoint's files)
      .deeprnn.lock  .deeprnn.pid                            (while a process trains it: run_lock)
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from deeprnn.errors import CheckpointError
from deeprnn.files import write_text_atomic

if TYPE_CHECKING:
    from deeprnn.train import TrainConfig


def default_run_name(cfg: TrainConfig) -> str:
    """``runs/<cell>-<L>x<H>-<timestamp>``'s last part: where a run without ``--run-dir`` goes."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.cell}-{cfg.num_layers}x{cfg.num_hiddens}-{stamp}"


# What a run writes at the top of its directory, and the checkpoint directories it saves (each holding only
# deeprnn.checkpoint's files). ``--overwrite`` removes these and nothing else.
RUN_FILES = ("config.json", "metrics.csv", "curve.png", "summary.json")
CHECKPOINT_DIRS = ("best", "last", ".best.old", ".last.old")
# Keys that mark a JSON file as deeprnn's own (older runs may lack newer keys, never these).
_OWN_JSON_KEYS = {
    "config.json": {"corpus", "cell", "num_layers", "num_hiddens", "run_dir"},
    "summary.json": {"run_dir", "stop_reason", "steps"},
    "compare.json": {"key", "label", "config"},  # deeprnn compare's record of the run it trained here
}


def _is_own_file(path: Path) -> bool:
    """Whether ``path``, a name a run writes, holds what deeprnn writes there (checked by content)."""
    try:
        if path.name == "curve.png":
            with open(path, "rb") as f:
                return f.read(8) == b"\x89PNG\r\n\x1a\n"
        if path.name == "metrics.csv":
            with open(path, newline="") as f:
                return f.readline().startswith("step,epoch,tokens,")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and _OWN_JSON_KEYS[path.name] <= data.keys()


def _is_own(path: Path) -> bool:
    from deeprnn.checkpoint import is_own_checkpoint_dir

    return is_own_checkpoint_dir(path) if path.name in CHECKPOINT_DIRS else _is_own_file(path)


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a deeprnn run: a config, summary or checkpoint deeprnn wrote (or
    ``deeprnn compare``'s record of one). A folder holding none of them is never cleared."""
    return any(_is_own(run_dir / n) for n in ("config.json", "summary.json", "compare.json", *CHECKPOINT_DIRS))


LOCK_FILE = ".deeprnn.lock"  # in a run directory: held by the process that trains it (run_lock)
PID_FILE = ".deeprnn.pid"  # beside it while the lock is held: which process holds it, for the message


@contextlib.contextmanager
def run_lock(run_dir: Path, *, resume: bool = False):
    """Hold ``run_dir``'s lock while the block runs: a second process that would train the same run (a
    ``--resume`` or ``--overwrite`` of a run still training) gets a CheckpointError naming the first one's pid.

    The lock is the operating system's (``flock``; ``msvcrt`` on Windows, through ``filelock``), so a process
    that dies, even by SIGKILL, holds none. The lock file stays, as removing a lock file races with the next
    process that opens it; the pid goes in a file of its own (filelock 3 empties the lock file on every try,
    and filelock 4's fallback for filesystems without ``flock`` keeps its own record there), removed on
    release. Where the filesystem cannot lock at all, one warning, and the run trains unlocked, as before."""
    import warnings

    from filelock import FileLock, Timeout

    lock = FileLock(run_dir / LOCK_FILE, timeout=0)
    try:
        with warnings.catch_warnings():  # filelock 4 on a filesystem without flock: its soft lock, quietly
            warnings.simplefilter("ignore", UserWarning)
            lock.acquire()
    except Timeout:
        try:
            pid = (run_dir / PID_FILE).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            pid = ""
        who = f" (pid {pid})" if pid.isdigit() else ""
        raise CheckpointError(f"run directory {run_dir} is in use by another deeprnn process{who}; wait for it to "
                              "finish, or stop it, and try again") from None
    except NotImplementedError:  # filelock 3 on a filesystem without flock
        warnings.warn(f"deeprnn: {run_dir} is on a filesystem without file locks; nothing stops a second process "
                      "from training this run at the same time", RuntimeWarning, stacklevel=3)
        yield
        return
    except OSError as e:
        fix = "check its permissions" if resume else "check its permissions or choose another --run-dir"
        raise CheckpointError(f"cannot write to run directory {run_dir}: {e.strerror or e}; {fix}") from None
    try:
        with contextlib.suppress(OSError):  # only for the message
            (run_dir / PID_FILE).write_text(str(os.getpid()), encoding="ascii")
        yield
    finally:
        with contextlib.suppress(OSError):
            (run_dir / PID_FILE).unlink(missing_ok=True)
        lock.release()


def prepare_run_dir(cfg: TrainConfig, *, overwrite: bool = False, resume: bool = False,
                    held: contextlib.ExitStack | None = None) -> Path:
    """Create the run directory, refusing to clobber an existing run unless asked.

    A non-empty directory that holds no deeprnn run (:func:`holds_run`) is refused even with
    ``overwrite``; with ``overwrite`` a run's own files (:data:`RUN_FILES`, :data:`CHECKPOINT_DIRS`) are
    removed, after checking that each one is deeprnn's; anything else in the directory stays. With ``held``,
    the directory's lock (:func:`run_lock`) is taken into it, before anything is removed.
    """
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path("runs") / default_run_name(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} is a file, not a directory; choose another --run-dir")
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume: run directory {run_dir} does not exist")
        return run_dir
    locked = False
    if run_dir.exists() and any(p.name not in (LOCK_FILE, PID_FILE) for p in run_dir.iterdir()):
        if not holds_run(run_dir):
            raise CheckpointError(
                f"run directory {run_dir} is not empty and holds no deeprnn run; choose a new or empty --run-dir"
            )
        if not overwrite:
            from deeprnn.checkpoint import resolve_checkpoint

            try:
                resolve_checkpoint(run_dir)  # what --resume would continue from
            except CheckpointError:
                raise CheckpointError(
                    f"run directory {run_dir} holds a run that stopped before its first checkpoint; pass "
                    "--overwrite to start it again, or choose another --run-dir"
                ) from None
            raise CheckpointError(
                f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it, "
                "--overwrite to replace it, or choose another --run-dir"
            )
        import shutil

        if held is not None:  # a run still training is not removed under it
            held.enter_context(run_lock(run_dir))
            locked = True
        # Only remove what a run writes, and only once every such name is known to be deeprnn's.
        present = check_overwritable(run_dir)
        for p in present:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create run directory {run_dir}: {e.strerror or e}; "
                              "choose another --run-dir") from None
    if held is not None and not locked:
        held.enter_context(run_lock(run_dir))
    return run_dir


def check_overwritable(run_dir: Path, instead: str = "choose another --run-dir", damaged_ok=()) -> list[Path]:
    """The run files and checkpoint folders in ``run_dir`` that overwriting it removes, once each is known
    to be deeprnn's; else a ``CheckpointError`` naming the first that is not (``instead``: the other way out).
    The names in ``damaged_ok`` are not checked (compare's damaged summary.json: its cache entry, dropped)."""
    from deeprnn.checkpoint import FILES

    present = [run_dir / n for n in (*RUN_FILES, *CHECKPOINT_DIRS) if (run_dir / n).exists()]
    for p in present:
        if p.name not in damaged_ok and not _is_own(p):
            foreign = sorted({q.name for q in p.iterdir()} - FILES) if p.is_dir() else []
            what = p / foreign[0] if foreign else p
            raise CheckpointError(f"cannot overwrite run directory {run_dir}: {what} was not written by deeprnn; "
                                  f"move it away or {instead}")
    return present


# ----------------------------------------------------------------------------------------------
# metrics.csv and curve.png

PLOT_EVERY_S = 30.0  # at most one redraw of curve.png in this many seconds of training
METRIC_FIELDS = ["step", "epoch", "tokens", "elapsed_s", "lr", "train_loss", "train_ppl",
                 "val_loss", "val_ppl", "val_bpc", "tokens_per_s"]


def write_plot(metrics_csv: Path, out_png: Path, title: str = "") -> None:
    """Training and validation perplexity against epoch (the book's animator, saved as PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    if not rows:
        return
    ep = [float(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    # An overflowed perplexity is "inf" in metrics.csv: no point on a log axis.
    tr = [(e, float(r["train_ppl"])) for e, r in zip(ep, rows) if _finite_text(r["train_ppl"])]
    va = [(e, float(r["val_ppl"])) for e, r in zip(ep, rows) if _finite_text(r["val_ppl"])]
    if tr:
        ax.plot(*zip(*tr), label="train perplexity")
    if va:
        ax.plot(*zip(*va), label="validation perplexity")
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if tr or va:
        ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, out_png)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def _finite_text(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of ``metrics.csv`` past ``step``, the step of the checkpoint a run resumes from: a process
    killed between writing an evaluation's row and saving ``last/`` leaves a row that the resumed run writes
    again. Every other byte stays. Returns the number of rows dropped."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header, *rows = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError, ValueError):  # none yet, or not ours to edit
        return 0
    if not header.startswith("step,"):
        return 0
    steps = [row.split(",", 1)[0] for row in rows]
    keep = [row for row, first in zip(rows, steps) if not (first.isdigit() and int(first) > step)]
    if len(keep) < len(rows):
        write_text_atomic(path, header + "".join(keep), newline="")
    return len(rows) - len(keep)


def holds_metrics(run_dir: Path) -> bool:
    """Whether ``run_dir/metrics.csv`` is a metrics file deeprnn wrote (a file, with its header)."""
    return _is_own_file(run_dir / "metrics.csv")


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
