"""kill -9 at random moments, mostly in the middle of a checkpoint write: afterwards the checkpoint
always loads and is one complete version, never a mix and never garbage.

A driver subprocess (one torch import) forks a child that saves versions 1, 2, 3, ... of a
checkpoint in a loop, reporting each finished save through a pipe; the driver SIGKILLs it at a
random moment, loads the checkpoint, and checks it is the last reported version or the one being
written (its rename may have landed just before the kill), with every tensor holding that version.
"""

from __future__ import annotations

import json
import subprocess
import sys

DRIVER = r'''
import json, os, random, signal, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)  # no thread pool before fork()
from deeprnn.checkpoint import load_checkpoint, save_checkpoint
from deeprnn.models import ModelConfig, build_model
from deeprnn.vocab import Vocab

run, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
vocab = Vocab("abcdefghijklmnopqrstuvwxyz ")
model = build_model(ModelConfig(vocab_size=len(vocab), cell="lstm", num_layers=2, num_hiddens=96))


def save(v):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(v)
    save_checkpoint(run / "last", model=model, vocab=vocab, meta={"version": v},
                    train_tensors={"rng.torch": torch.get_rng_state(), "marker": torch.full((4096,), float(v))})


def child(start, w):
    v = start
    while True:
        save(v)
        os.write(w, b"%d\n" % v)
        v += 1


save(0)
rng, nxt, results = random.Random(seed), 1, []
for k in range(kills):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            child(nxt, w)
        finally:
            os._exit(1)
    os.close(w)
    reader = os.fdopen(r, "rb")
    first = reader.readline()  # the child is in its save loop
    time.sleep(rng.uniform(0.0, 0.25))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    done = [int(x) for x in (first + reader.read()).split()]
    reader.close()
    names = sorted(p.name for p in run.iterdir())
    mid_write = any(n.startswith(".last.tmp-") or n == ".last.old" for n in names) or "last" not in names
    ck = load_checkpoint(run, prefer="last")
    got = ck.meta["version"]
    last_done = done[-1]
    consistent = (all(bool((p == got).all()) for p in ck.model.parameters())
                  and bool((ck.train_tensors["marker"] == got).all()))
    results.append(dict(kill=k, got=got, last_done=last_done, saves=len(done), mid_write=mid_write,
                        consistent=consistent, files=names))
    nxt = last_done + 2  # last_done + 1 may or may not have landed: never reuse it
print(json.dumps(results))
'''


def test_kill_dash_nine_during_checkpoint_writes(tmp_path, child_env):
    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(script), str(run), "10", "1234"], capture_output=True, text=True,
                          env=child_env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 10
    for r in results:
        assert r["got"] in (r["last_done"], r["last_done"] + 1), r  # the latest complete version
        assert r["consistent"], r  # every tensor from that one version
    assert any(r["mid_write"] for r in results), results  # the kills did land inside writes
    # Temp directories of killed saves are cleared by the next save: they never pile up.
    assert all(sum(n.startswith(".last.tmp-") for n in r["files"]) <= 1 for r in results), results
