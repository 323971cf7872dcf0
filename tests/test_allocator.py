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

# Five warm-up steps, then the median page faults of twenty more steps: a concise 2 x 256 LSTM at the book's
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
per_step = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(per_step)[len(per_step) // 2]  # the median step: a one-off growth of the heap is not a step's cost
print(json.dumps({"note": note, "again": keep_freed_memory(), "faults": faults}))
"""


# glibc's own accounting (mallinfo2) of one 24 MiB block: with the defaults (threshold 128 KiB, not yet
# raised in a process that has freed no large block) it is mmapped; with deeprnn's settings it comes from
# the heap, and once freed it stays there for reuse. No torch import: nothing else has touched malloc.
MECHANISM = r"""
import ctypes, json
from deeprnn.allocator import keep_freed_memory
note = keep_freed_memory()
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
    print(json.dumps({"skip": "glibc has no mallinfo2 (before 2.33)"}))
    raise SystemExit
libc.mallinfo2.restype = Info
before = libc.mallinfo2().hblkhd
block = libc.malloc(24 << 20)
mmapped = libc.mallinfo2().hblkhd - before
libc.free(block)
print(json.dumps({"note": note, "mmapped": mmapped, "free_in_heap": libc.mallinfo2().fordblks}))
"""


def _child(code: str, malloc_env: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("DEEPRNN_MALLOC", None)
    if malloc_env is not None:
        env["DEEPRNN_MALLOC"] = malloc_env
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_large_blocks_come_from_the_heap_and_stay_there_when_freed():
    default, tuned = _child(MECHANISM, "0"), _child(MECHANISM, None)
    if "skip" in default:
        pytest.skip(default["skip"])
    assert default["note"] == "malloc left alone (DEEPRNN_MALLOC=0)"
    assert tuned["note"] == "glibc malloc keeps freed memory (mmap threshold 32 MiB, trim threshold 512 MiB)"
    assert default["mmapped"] >= 24 << 20 and default["free_in_heap"] < 24 << 20  # mapped, then unmapped
    assert tuned["mmapped"] == 0 and tuned["free_in_heap"] >= 24 << 20  # heap, then kept for reuse


@glibc
def test_a_training_step_under_the_settings_faults_in_almost_no_pages():
    """With glibc's defaults the same step faulted in 170 to 6,700 pages per step, by process (the
    dynamic thresholds depend on the order of earlier frees); ``bench_allocator.py`` times both."""
    tuned = _child(CHILD, None)
    assert tuned["note"] == tuned["again"] == (
        "glibc malloc keeps freed memory (mmap threshold 32 MiB, trim threshold 512 MiB)")
    assert tuned["faults"] < 50


def test_elsewhere_it_leaves_malloc_alone(monkeypatch):
    from deeprnn import allocator

    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Darwin")
    assert allocator._apply() == "malloc left alone (not glibc)"
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator._apply() == "malloc left alone (DEEPRNN_MALLOC=0)"
