"""``deeprnn.allocator``: glibc malloc keeps freed memory, so a training step stops faulting in fresh pages.

Each case runs in a child process, since malloc's settings belong to a process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the settings are glibc's")

# Five warm-up steps, then page faults per step over five more: a concise 2 x 256 LSTM at the book's
# configuration (nn.LSTM's oneDNN kernel allocates its workspace afresh every step).
CHILD = r"""
import json, resource, sys
import torch
import torch.nn.functional as F
from deeprnn.allocator import keep_freed_memory
from deeprnn.models import ModelConfig, build_model
note = keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = build_model(ModelConfig(vocab_size=28, cell="lstm", num_layers=2, num_hiddens=256, impl="concise"))
opt = torch.optim.SGD(model.parameters(), lr=1.0)
X = torch.randint(0, 28, (32, 35))
def step():
    logits, _ = model(X)
    loss = F.cross_entropy(logits.reshape(-1, 28), X.T.reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"note": note, "again": keep_freed_memory(), "faults": faults}))
"""


def _child(malloc_env: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("DEEPRNN_MALLOC", None)
    if malloc_env is not None:
        env["DEEPRNN_MALLOC"] = malloc_env
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_settings_stop_the_page_faults_of_a_training_step():
    default, tuned = _child("0"), _child(None)
    assert default["note"] == "malloc left alone (DEEPRNN_MALLOC=0)"
    assert tuned["note"] == tuned["again"] == (
        "glibc malloc keeps freed memory (mmap threshold 32 MiB, trim threshold 512 MiB)")
    assert default["faults"] > 1000  # every step faults in its fresh buffers
    assert tuned["faults"] < 50


def test_elsewhere_it_leaves_malloc_alone(monkeypatch):
    from deeprnn import allocator

    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator._apply() == "malloc left alone (not glibc)"
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator._apply() == "malloc left alone (DEEPRNN_MALLOC=0)"
