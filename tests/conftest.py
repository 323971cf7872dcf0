"""Shared fixtures. Tests are offline: named corpora resolve to ``../shared/data``."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_data_dir(monkeypatch):
    """Point the corpus cache at the shared test data so no test touches the network."""
    monkeypatch.setenv("DEEPRNN_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("DEEPRNN_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU spinning threads slow them 10x:
    a module that uses this runs on one torch thread (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained run (best/, last/, metrics.csv, curve.png, summary.json, config.json), trained
    once per session and shared by the tests that only read it (serve, browser)."""
    from deeprnn.train import TrainConfig, train

    path = tmp_path_factory.mktemp("tiny-run") / "tiny-lstm"
    # One thread: the tiny LSTM's evaluation is ~10x slower on two threads when the cores are busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DEEPRNN_OFFLINE", "1")
            mp.setenv("MPLBACKEND", "Agg")
            train(TrainConfig(num_layers=1, num_hiddens=16, batch_size=4, num_steps=8, max_tokens=2000, max_steps=5,
                              eval_batch_size=4, sample_every=0, precision="fp32", run_dir=str(path)), progress=False)
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture
def ext(monkeypatch):
    """The compiled kernels (``deeprnn.models.native``), or a skip where they cannot be built; a failure
    instead where ``DEEPRNN_REQUIRE_NATIVE`` is set (CI: a silent skip would hide a broken build)."""
    from deeprnn.models import native

    monkeypatch.delenv(native.ENV, raising=False)
    module = native.load()
    if module is None:
        reason = f"the C++ kernels cannot be built here: {native._failure}"
        if os.environ.get("DEEPRNN_REQUIRE_NATIVE"):
            pytest.fail(reason + "; DEEPRNN_REQUIRE_NATIVE is set, so this is a failure, not a skip")
        pytest.skip(reason)
    return module


@pytest.fixture
def lock_holder():
    """``hold(run_dir)``: another process that holds the run's lock (``rundir.run_lock``) until the test ends; it
    returns that process (its ``pid`` is what a refusal names). ``release()`` kills it sooner, as a SIGKILL would."""
    import contextlib
    import subprocess
    import sys
    import textwrap

    held = []

    def hold(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from deeprnn.rundir import run_lock
            with run_lock(Path({str(run_dir)!r})):
                print("held", flush=True)
                sys.stdin.read()
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        held.append(proc)
        assert proc.stdout.readline() == "held\n"
        return proc

    def release() -> None:
        for proc in held:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()

    hold.release = release
    yield hold
    release()

