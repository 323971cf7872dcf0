"""Data parallelism on CPU with gloo, 2 ranks in real processes.

Two ranks with half the batch each train exactly like one process with the whole batch; a DDP run
resumes to the same losses; one rank's error ends every rank quickly with a one-line message; only
rank 0 writes. ``deeprnn train --nproc 2`` (torchrun underneath) runs once; the other runs start the
two ranks by hand with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), as a multi-node
job without the elastic agent would: cheaper on a busy machine, and with no agent to kill a survivor
the failure tests show deeprnn itself stops every rank. Runs are shared per module.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deeprnn.checkpoint import load_checkpoint
from deeprnn.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TIMEOUT = 120  # seconds per launch: far above the few seconds a launch takes; a hang fails the test

# Tiny, deterministic (fp32, no dropout), sequential partitioning with carried state, 12 steps of the
# 37 in an epoch, evaluated every 6: a pause at 6 resumes mid-epoch with a carried state.
BASE = dict(corpus=["timemachine"], num_layers=2, num_hiddens=16, batch_size=8, num_steps=10,
            max_tokens=3000, val_fraction=0.02, test_fraction=0.02, dropout=0.0, precision="fp32",
            sampling="sequential", schedule="constant", eval_every=6, max_steps=12, eval_batch_size=8,
            eval_num_steps=50, sample_every=0, num_preds=5, device="cpu", seed=3)
# SGD with a small clip so the global-norm clipping (after DDP's gradient average) is active.
OPTIMIZERS = {"sgd": dict(cell="gru", optimizer="sgd", lr=1.0, clip=0.1),
              "adam": dict(cell="lstm", optimizer="adam", lr=1e-2, clip=1.0)}
RUN_FILES = {"config.json", "metrics.csv", "curve.png", "summary.json", ".deeprnn.lock",  # rank 0's lock
             *(f"{c}/{f}" for c in ("best", "last")
               for f in ("checkpoint.json", "model.safetensors", "train_state.safetensors"))}


def flags(values: dict) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        name = "--" + key.replace("_", "-")
        out += [name, *value] if isinstance(value, list) else [name, str(value)]
    return out


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC")}
    env.update(OMP_NUM_THREADS="1", DEEPRNN_DATA_DIR=str(SHARED_DATA), DEEPRNN_OFFLINE="1", MPLBACKEND="Agg",
               DEEPRNN_DIST_TIMEOUT="60", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    # Each in its own session, so that a hung launch can be stopped as a whole (see finish).
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(*procs: subprocess.Popen) -> list[tuple[int, str, str]]:
    """Wait for every process; past TIMEOUT stop them all and fail: the test found a hang."""
    deadline = time.monotonic() + TIMEOUT
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun's agent then stops its workers (they run in sessions of their own).
        for sig, grace in ((signal.SIGTERM, 40), (signal.SIGKILL, 5)):
            for q in procs:
                if q.poll() is None:
                    os.killpg(q.pid, sig)
            for q in procs:
                try:
                    q.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
        pytest.fail(f"still running after {TIMEOUT} s (a hang?): {[q.args for q in procs]}")
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], cwd: Path, cwd1: Path | None = None, **env: str) -> list[subprocess.Popen]:
    """``deeprnn train ARGS`` as ranks 0 and 1 (rank 1 in ``cwd1`` when given)."""
    port = str(free_port())
    return [start([sys.executable, "-m", "deeprnn", "train", "--quiet", *args], d,
                  child_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port, **env))
            for r, d in enumerate((cwd, cwd1 or cwd))]


def two_ranks(args: list[str], cwd: Path, cwd1: Path | None = None, **env: str) -> list[tuple[int, str, str]]:
    """Run :func:`start_ranks` to the end; (rc, stdout, stderr) of each rank."""
    for _ in range(3):  # the free port can be taken before rank 0 binds it: then try another
        results = finish(*start_ranks(args, cwd, cwd1, **env))
        if not any("address already in use" in err.lower() for _, _, err in results):
            break
    return results


def ok(result: tuple[int, str, str]) -> str:
    rc, out, err = result
    assert rc == 0, f"exit {rc}\n{out}\n{err}"
    return out


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last").model.state_dict()


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------
# shared runs


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two straight 12-step runs, launched together: SGD through ``deeprnn train --nproc 2`` (torchrun)
    with the default run directory, Adam as two ranks started by hand."""
    sgd_cwd, adam_cwd = tmp_path_factory.mktemp("ddp_sgd"), tmp_path_factory.mktemp("ddp_adam")
    nproc = [sys.executable, "-m", "deeprnn", "train", "--nproc", "2", "--quiet", *flags({**BASE, **OPTIMIZERS["sgd"]})]
    procs = [start(nproc, sgd_cwd, child_env()),
             *start_ranks(flags({**BASE, **OPTIMIZERS["adam"], "run_dir": "run"}), adam_cwd)]
    results = finish(*procs)
    for r in results:
        ok(r)
    runs = list((sgd_cwd / "runs").iterdir())
    assert len(runs) == 1, runs  # one run directory, named by rank 0 for every rank
    return {"sgd": runs[0], "adam": adam_cwd / "run", "sgd_cwd": sgd_cwd, "sgd_out": results[0][1]}


# ----------------------------------------------------------------------------------------------
# tests


@pytest.fixture
def one_thread():
    """The in-process reference runs on one thread, like each rank (OMP_NUM_THREADS=1): on a busy
    2-core machine two spinning threads make a 2-second run take 20."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_two_ranks_with_half_batches_equal_one_process(tmp_path, ddp_runs, opt, one_thread):
    one = TrainConfig(**{**BASE, **OPTIMIZERS[opt]}, run_dir=str(tmp_path / "one"))
    train(one, progress=False, log=lambda *_: None)
    ddp, single = ddp_runs[opt], tmp_path / "one"

    wd, ws = weights(ddp), weights(single)
    assert wd.keys() == ws.keys()
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], msg=lambda m, k=k: f"{opt} {k}: {m}")
    # Sharded evaluation, summed over ranks, scores what one process scores; training moved.
    rd, rs = rows(ddp), rows(single)
    assert [r["step"] for r in rd] == [r["step"] for r in rs] == ["6", "12"]
    for a, b in zip(rd, rs):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-5)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-5)
        assert a["tokens"] == b["tokens"]
    assert float(rd[-1]["val_loss"]) < float(rd[0]["val_loss"])


def test_resume_under_ddp_gives_identical_losses(tmp_path, ddp_runs):
    """6 steps, stop, ``--resume`` to 12 (every rank loads the same checkpoint) == 12 straight."""
    for r in two_ranks(flags({**BASE, **OPTIMIZERS["adam"], "max_steps": 6, "run_dir": "run"}), tmp_path):
        ok(r)
    assert [r["step"] for r in rows(tmp_path / "run")] == ["6"]
    for r in two_ranks(["--resume", "run", "--max-steps", "12"], tmp_path):
        ok(r)

    straight, resumed = rows(ddp_runs["adam"]), rows(tmp_path / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for a, b in zip(straight, resumed):
        assert a["train_loss"] == b["train_loss"], a["step"]
        assert a["val_loss"] == b["val_loss"], a["step"]
    wa, wb = weights(ddp_runs["adam"]), weights(tmp_path / "run")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_a_pause_between_evaluations_resumes_each_ranks_interval(tmp_path, ddp_runs):
    """Paused at step 4 of 6 between evaluations (``train(stop_after_steps=4)`` on each rank: no flag does it),
    then ``--resume`` to 12: the sums of the interval's training loss, saved per rank, are taken back, so step 6's
    row is the straight run's (without them it held steps 5 and 6 alone)."""
    cfg = {**BASE, **OPTIMIZERS["adam"], "run_dir": "run"}
    code = ("import sys; from deeprnn.train import TrainConfig, train; "
            f"s = train(TrainConfig(**{cfg!r}), progress=False, log=lambda *_: None, stop_after_steps=4); "
            "sys.exit(s['stop_reason'] != 'paused')")
    port = str(free_port())
    for r in finish(*(start([sys.executable, "-c", code], tmp_path,
                            child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port)) for rank in (0, 1))):
        ok(r)
    assert not (tmp_path / "run" / "metrics.csv").exists() or rows(tmp_path / "run") == []  # not evaluated
    ranks = load_checkpoint(tmp_path / "run" / "last").meta["interval"]["ranks"]
    assert len(ranks) == 2 and ranks[0][0] != ranks[1][0]  # [loss sum, count, tokens]: each rank its own batches
    for r in two_ranks(["--resume", "run", "--max-steps", "12"], tmp_path):
        ok(r)
    straight, resumed = rows(ddp_runs["adam"]), rows(tmp_path / "run")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == ["6", "12"]
    for a, b in zip(straight, resumed):
        assert (a["train_loss"], a["val_loss"], a["tokens"]) == (b["train_loss"], b["val_loss"], b["tokens"])


def test_dropout_differs_by_rank_and_resumes_exactly(tmp_path):
    """With dropout each rank draws its own masks (its own generator, saved per rank), and resuming
    restores every rank's generator: 6 + 6 steps == 12 straight."""
    drop = {**BASE, **OPTIMIZERS["adam"], "dropout": 0.3}
    for r in two_ranks(flags({**drop, "run_dir": "straight"}), tmp_path):
        ok(r)
    for r in two_ranks(flags({**drop, "max_steps": 6, "run_dir": "run"}), tmp_path):
        ok(r)
    for r in two_ranks(["--resume", "run", "--max-steps", "12"], tmp_path):
        ok(r)
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "run")
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in straight]
    assert [r["val_loss"] for r in resumed] == [r["val_loss"] for r in straight]
    t = load_checkpoint(tmp_path / "run" / "last").train_tensors
    assert not torch.equal(t["rng.torch"], t["rng.torch.rank1"])  # rank 1's masks are its own


def test_checkpoint_holds_every_ranks_carried_state(ddp_runs):
    """The carried state is saved for the global batch, so any world size dividing B can resume."""
    ck = load_checkpoint(ddp_runs["adam"] / "last")
    h = ck.train_tensors["carry.h"]
    assert h.shape == (BASE["num_layers"], BASE["batch_size"], BASE["num_hiddens"])  # (L, B, H), not B/2
    assert not torch.equal(h[:, :4], h[:, 4:])  # both ranks' streams, not one rank's twice


def test_nproc_launcher_and_only_rank_0_writes(ddp_runs):
    cwd, out, run = ddp_runs["sgd_cwd"], ddp_runs["sgd_out"], ddp_runs["sgd"]
    assert files_under(cwd) == {f"runs/{run.name}/{f}" for f in RUN_FILES}  # nothing else, anywhere in cwd
    assert len(rows(run)) == 2  # one row per evaluation, written once
    assert out.count("done (max_steps): 12 steps") == 1  # only rank 0 reports
    assert out.count(f"run: runs/{run.name}") == 1


def deeprnn_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("deeprnn:")]


def test_bad_corpus_on_rank_1_stops_both_ranks(tmp_path):
    """Each rank in its own directory: the relative corpus path exists for rank 0 only. Both end at
    once (the process-group timeout is set far beyond the test's), each with one line on stderr."""
    cwd0, cwd1 = tmp_path / "rank0", tmp_path / "rank1"
    cwd0.mkdir(), cwd1.mkdir()
    (cwd0 / "corpus.txt").write_text((SHARED_DATA / "timemachine.txt").read_text()[:20000])
    args = flags({**BASE, **OPTIMIZERS["sgd"], "corpus": ["corpus.txt"], "max_steps": 4, "run_dir": "run"})
    (rc0, _, err0), (rc1, _, err1) = two_ranks(args, cwd0, cwd1, DEEPRNN_DIST_TIMEOUT="600")

    assert rc1 == 2 and "Traceback" not in err1, err1
    assert deeprnn_lines(err1) == ["deeprnn: error: no such file: 'corpus.txt'; check the path"]
    assert rc0 != 0 and "Traceback" not in err0, err0
    (line,) = deeprnn_lines(err0)
    assert line.startswith("deeprnn: error: rank 0 lost contact with another rank (Connection closed by peer")
    assert line.endswith("that rank's own message says what went wrong")
    assert not (cwd1 / "run").exists()


def nproc_launch(args: list[str], cwd: Path) -> subprocess.Popen:
    return start([sys.executable, "-m", "deeprnn", "train", "--nproc", "2", "--quiet", *args], cwd, child_env())


def test_nproc_failure_and_interrupt_are_one_line(tmp_path):
    """Under ``--nproc`` torchrun's agent used to follow the ranks' lines with its ``ChildFailedError``
    traceback (exit 1). A run directory that holds no run: rank 0's line alone, exit 2. Ctrl-C (to the
    launcher, which passes it on): rank 0's resume line alone, exit 130, and the run resumes."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.csv").write_text("mine\n")
    rc, _, err = finish(nproc_launch(flags({**BASE, **OPTIMIZERS["sgd"], "max_steps": 2, "run_dir": "bad"}),
                                     tmp_path))[0]
    assert (rc, err) == (2, "deeprnn: error: run directory bad is not empty and holds no deeprnn run; choose a "
                            "new or empty --run-dir\n")

    run = tmp_path / "run"
    p = nproc_launch(flags({**BASE, **OPTIMIZERS["sgd"], "max_steps": 10**6, "run_dir": "run"}), tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not (run / "last" / "checkpoint.json").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first checkpoint (step 6): both ranks are in the training loop
    p.send_signal(signal.SIGINT)
    rc, _, err = finish(p)[0]
    assert (rc, err) == (130, "deeprnn: SIGINT received: checkpoint saved; resume with: deeprnn train --resume "
                              "run\n")
    assert load_checkpoint(run / "last").meta["position"]["step"] > 6  # saved on the way out, not step 6's


def test_ctrl_c_on_one_rank_stops_both_and_rank_0_says_how_to_resume(tmp_path):
    """Ranks started by hand (as under the user's own torchrun): SIGINT to rank 1 alone stops both at the same
    step with a checkpoint; the resume line comes once, from rank 0 (each rank printed it before)."""
    args = flags({**BASE, **OPTIMIZERS["sgd"], "max_steps": 10**6, "run_dir": "run"})
    procs = start_ranks(args, tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "run" / "last" / "checkpoint.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first checkpoint (step 6): both ranks are in the training loop
    procs[1].send_signal(signal.SIGINT)
    (rc0, _, err0), (rc1, _, err1) = finish(*procs)
    # rank 0 names the signal rank 1 got (it said SIGTERM, exit 143, before)
    assert (rc0, err0) == (130, "deeprnn: SIGINT received: checkpoint saved; resume with: deeprnn train --resume "
                                "run\n")
    assert (rc1, err1) == (130, "")
    assert load_checkpoint(tmp_path / "run" / "last").meta["position"]["step"] > 6


def test_error_on_rank_0_only_stops_rank_1(tmp_path):
    """Rank 0 refuses a non-empty run directory that holds no run (rank 1 never checks it) after the DDP
    set-up."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("mine\n")
    args = flags({**BASE, **OPTIMIZERS["sgd"], "max_steps": 2, "run_dir": "run"})
    (rc0, _, err0), (rc1, _, err1) = two_ranks(args, tmp_path, DEEPRNN_DIST_TIMEOUT="600")

    assert rc0 == 2 and "Traceback" not in err0, err0
    (line,) = deeprnn_lines(err0)
    assert line == "deeprnn: error: run directory run is not empty and holds no deeprnn run; choose a new or empty --run-dir"
    assert rc1 != 0 and "Traceback" not in err1, err1
    (line,) = deeprnn_lines(err1)
    assert line.startswith("deeprnn: error: rank 1 lost contact with another rank (")
    assert files_under(tmp_path) == {"run/metrics.csv"} and (run / "metrics.csv").read_text() == "mine\n"


@pytest.mark.parametrize("value", ["2m", "0", "-5", ""])
def test_a_dist_timeout_that_is_not_whole_seconds_is_one_line(monkeypatch, value):
    """DEEPRNN_DIST_TIMEOUT=2m was a ValueError traceback on every rank, then 'rank 1 was killed by SIGTERM'."""
    from deeprnn.distributed import dist_timeout
    from deeprnn.errors import ConfigError

    monkeypatch.setenv("DEEPRNN_DIST_TIMEOUT", value)
    with pytest.raises(ConfigError) as e:
        dist_timeout()
    assert str(e.value) == (f"DEEPRNN_DIST_TIMEOUT must be a whole number of seconds >= 1, got {value!r}; e.g. "
                            "DEEPRNN_DIST_TIMEOUT=300, or unset it for 120")
    monkeypatch.setenv("DEEPRNN_DIST_TIMEOUT", "300")
    assert dist_timeout() == 300
    monkeypatch.delenv("DEEPRNN_DIST_TIMEOUT")
    assert dist_timeout() == 120
