"""The compiled greedy loop (``csrc/greedy.cpp``, ``generate._NativeGreedy``) against the cell stepper."""

from __future__ import annotations

import os

import pytest
import torch

from deeprnn.generate import _CellStepper, _NativeGreedy, generate, make_stepper
from deeprnn.models import native

from test_generate import MODELS, PREFIX, TEXT, argmax_path, tiny_model  # noqa: F401  (vocab fixture below)
from deeprnn.vocab import Vocab

FUSED = [m for m in MODELS if not (m.values[0].get("gru_variant") == "d2l" or m.values[0].get("layer_norm"))]


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(TEXT)


@pytest.fixture
def ext(monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    module = native.load()
    if module is None:
        reason = f"the C++ kernels cannot be built here: {native._failure}"
        if os.environ.get("DEEPRNN_REQUIRE_NATIVE"):
            pytest.fail(reason + "; DEEPRNN_REQUIRE_NATIVE is set, so this is a failure, not a skip")
        pytest.skip(reason)
    return module


def warmed_stepper(model, vocab) -> _CellStepper:
    model.eval()
    stepper = make_stepper(model, torch.device("cpu"))
    assert type(stepper) is _CellStepper
    stepper.warm_up(vocab[list(PREFIX[:-1])])
    return stepper


def decoder_for(stepper, slices: int) -> _NativeGreedy:
    """A decoder of ``slices`` slices (the thread count and size rules set aside)."""
    saved = (_NativeGreedy.SLICE_BYTES, _NativeGreedy.MIN_SLICE_UNITS)
    _NativeGreedy.SLICE_BYTES, _NativeGreedy.MIN_SLICE_UNITS = 1, 1
    try:
        dec = _NativeGreedy.for_stepper(stepper, slices)
    finally:
        _NativeGreedy.SLICE_BYTES, _NativeGreedy.MIN_SLICE_UNITS = saved
    assert dec is not None and dec.slices == slices
    return dec


@pytest.mark.parametrize("kw", FUSED)
def test_native_steps_match_the_cell_stepper(ext, vocab, kw):
    """Along the stepper's argmax path, each step taken from the stepper's state: the logits and state of
    torch's cells to float32 rounding, the same argmax, and bit-equal logits, tokens and state for every
    split of the work between threads (16 units in 3 slices: 5, 5 and 6, none a whole vector)."""
    model = tiny_model(vocab, **kw)
    with torch.inference_mode():
        ref = warmed_stepper(model, vocab)
        decs = [decoder_for(warmed_stepper(model, vocab), 3) for _ in range(3)]
        token = vocab[PREFIX[-1]]
        for _ in range(25):
            h, c = torch.stack(ref.h)[:, 0], (torch.stack(ref.c)[:, 0] if ref.lstm else None)
            expected = ref.step(torch.tensor([token]))[0]  # (V,)
            got = []
            for workers, d in enumerate(decs, start=1):
                d.decoder.set_state(h, c)
                got.append(d.decoder.run(token, 1, workers))
            logits = [d.decoder.logits() for d in decs]
            torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-5)  # ReLU: logits ~1e4
            assert all(torch.equal(x, logits[0]) for x in logits[1:])
            assert got == [[int(expected.argmax())]] * 3
            state = decs[0].decoder.state()
            torch.testing.assert_close(state[0], torch.stack(ref.h)[:, 0], rtol=1e-4, atol=1e-5)
            if ref.lstm:
                torch.testing.assert_close(state[1], torch.stack(ref.c)[:, 0], rtol=1e-4, atol=1e-5)
            assert all(torch.equal(x, y) for d in decs[1:] for x, y in zip(d.decoder.state(), state))
            token = got[0][0]


@pytest.mark.parametrize("kw", [FUSED[0], FUSED[4]], ids=["concise-lstm", "scratch-gru"])
def test_chunks_carry_the_state(ext, vocab, kw):
    """Decoding in several calls continues exactly where the last one stopped (h and c)."""
    model = tiny_model(vocab, **kw)
    with torch.inference_mode():
        whole = decoder_for(warmed_stepper(model, vocab), 2)
        parts = decoder_for(warmed_stepper(model, vocab), 2)
        first = vocab[PREFIX[-1]]
        expected = whole.decoder.run(first, 30, 2)
        a = parts.decoder.run(first, 11, 1)
        b = parts.decoder.run(a[-1], 19, 2)
        assert a + b == expected
        for x, y in zip(whole.decoder.state(), parts.decoder.state()):
            assert torch.equal(x, y)


def test_generate_takes_the_native_loop_probes_and_streams(ext, vocab, monkeypatch):
    """``generate`` decodes greedily through the compiled loop, times both thread counts at its start and
    again every REPROBE_EVERY tokens, and gives the book's argmax path, streamed piece by piece."""
    model = tiny_model(vocab, num_hiddens=32)
    monkeypatch.setattr(_NativeGreedy, "SLICE_BYTES", 1024)
    monkeypatch.setattr(_NativeGreedy, "PROBE_STEPS", 3)
    monkeypatch.setattr(_NativeGreedy, "REPROBE_EVERY", 20)
    made = []
    real = _NativeGreedy.for_stepper.__func__
    monkeypatch.setattr(_NativeGreedy, "for_stepper",
                        classmethod(lambda cls, s, threads: made.append(real(cls, s, threads)) or made[-1]))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's count decides the slices, though generate runs torch on one
    try:
        pieces = []
        out = generate(model, vocab, PREFIX, 60, on_text=lambda i, p: pieces.append((i, p)))
    finally:
        torch.set_num_threads(threads)
    path = [vocab.idx_to_token[i] for i in argmax_path(model, vocab[list(PREFIX)], 60)]
    assert out == [PREFIX + "".join(path)]
    assert pieces == [(0, piece) for piece in path]
    (dec,) = made
    assert dec.slices == 2
    assert len(dec.probes) == 2 and all(set(p) == {1, 2} for p in dec.probes)  # at tokens 0 and 26


def test_fallbacks_when_the_loop_does_not_apply(vocab, monkeypatch):
    """float64 models, and a machine where the kernels do not load, keep the stepper loop: same text."""
    model = tiny_model(vocab)
    expected = generate(model, vocab, PREFIX, 30)
    with torch.inference_mode():
        assert _NativeGreedy.for_stepper(warmed_stepper(model.double(), vocab), 2) is None
        model.float()
        monkeypatch.setattr(native, "load", lambda: None)
        assert _NativeGreedy.for_stepper(warmed_stepper(model, vocab), 2) is None
    assert generate(model, vocab, PREFIX, 30) == expected


def test_decoder_refuses_bad_calls(ext, vocab):
    model = tiny_model(vocab)
    with torch.inference_mode():
        dec = decoder_for(warmed_stepper(model, vocab), 2).decoder
    with pytest.raises(RuntimeError, match=r"workers must be in \[1, 2\]"):
        dec.run(1, 5, 3)
    with pytest.raises(RuntimeError, match=f"token {len(vocab)} is outside the vocabulary"):
        dec.run(len(vocab), 5, 1)
    assert dec.run(1, 0, 1) == []
