"""Ctrl-C / SIGTERM during training: the step finishes, a checkpoint is written, the way to resume
is printed, the exit status is 128 + signal number, and --resume carries on from there."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from deeprnn.checkpoint import load_checkpoint
from deeprnn.cli import main

WAIT_S = 180  # generous: a busy machine may take a while just to import torch


def start(run, small_corpus, flags, env) -> subprocess.Popen:
    argv = [sys.executable, "-m", "deeprnn", "train", "--corpus", str(small_corpus), "--run-dir", str(run),
            *flags(max_steps=10**6, num_epochs=10**4, eval_every=5)]
    argv.remove("--quiet")  # the per-evaluation lines tell the test that training is under way
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_training(proc: subprocess.Popen) -> list[str]:
    """Read stdout until the first evaluation line (step 5), i.e. mid-training."""
    seen, deadline = [], time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if " step 5: train ppl" in line:
            return seen
    proc.kill()
    raise AssertionError(f"training never got going: {seen} {proc.stderr.read()}")


def test_sigint_and_sigterm_checkpoint_and_resume(tmp_path, small_corpus, flags, child_env, capsys):
    runs = {signal.SIGINT: tmp_path / "int", signal.SIGTERM: tmp_path / "term"}
    procs = {sig: start(run, small_corpus, flags, child_env) for sig, run in runs.items()}  # both at once
    try:
        for sig, proc in procs.items():
            wait_for_training(proc)
            proc.send_signal(sig)
        results = {sig: (proc.wait(timeout=WAIT_S), *proc.communicate(timeout=WAIT_S))
                   for sig, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for sig, (code, _out, err) in results.items():
        run = runs[sig]
        assert code == 128 + sig, err  # 130 for SIGINT, 143 for SIGTERM
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines == [f"deeprnn: {sig.name} received: checkpoint saved; resume with: "
                         f"deeprnn train --resume {run}"], err
        ck = load_checkpoint(run, prefer="last")
        step = ck.meta["position"]["step"]
        # Not evaluated where it stopped (unless that was an evaluation's step, every 5th): last/ keeps the last
        # evaluation's row and the training loss of the steps since, for the next evaluation after a resume.
        assert step >= 5 and ck.meta["metrics"]["step"] == step - step % 5
        assert ck.meta["interval"]["count"] == step % 5
        # --resume continues from exactly there.
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--max-steps", str(step + 3), "--quiet"]) == 0
        out = capsys.readouterr().out
        assert f"done (max_steps): {step + 3} steps" in out
        assert load_checkpoint(run, prefer="last").meta["position"]["step"] == step + 3


def test_closed_output_pipe_stops_training_with_a_checkpoint(tmp_path, small_corpus, flags, child_env):
    """``deeprnn train | head -3``: the closed pipe used to end training at its next line, exit 141, with no
    resume hint and every step since the last evaluation lost. Now it stops as Ctrl-C does: the step in
    progress finishes, ``last/`` is written, the resume line goes to stderr, and the status is 141."""
    run = tmp_path / "run"
    proc = start(run, small_corpus, flags, child_env)
    try:
        wait_for_training(proc)  # the evaluation at step 5 was printed: the loop is running
        proc.stdout.close()  # head exits; the next evaluation line (step 10) meets the closed pipe
        code, err = proc.wait(timeout=WAIT_S), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 141, err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        f"deeprnn: standard output was closed: checkpoint saved; resume with: deeprnn train --resume {run}"], err
    ck = load_checkpoint(run, prefer="last")
    step = ck.meta["position"]["step"]
    # past the line that failed (step 10's evaluation), saved where it stopped, not evaluated there
    assert step > 10 and ck.meta["metrics"]["step"] == step - step % 5 and ck.meta["interval"]["count"] == step % 5
