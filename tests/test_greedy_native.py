"""The compiled greedy loop (``csrc/greedy.cpp``, ``generate._NativeGreedy``) against the cell stepper."""

from __future__ import annotations


import pytest
import torch

from deeprnn.generate import Stopped, _CellStepper, _NativeGreedy, generate, make_stepper
from deeprnn.models import ModelConfig, build_model, native

from test_generate import MODELS, PREFIX, TEXT, StopAfter, argmax_path, takes_fast_path, tiny_model  # noqa: F401  (vocab fixture below)
from deeprnn.vocab import Vocab

FUSED = [m for m in MODELS if takes_fast_path(m.values[0])]


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(TEXT)


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
        dec = _NativeGreedy.for_stepper(stepper, slices, _NativeGreedy.MIN_PREDS)
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


class _Counting:
    """The compiled decoder with its ``run`` calls counted: (steps, workers) of each."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def run(self, first, steps, workers):
        self.calls.append((steps, workers))
        return self.decoder.run(first, steps, workers)


@pytest.fixture
def spy(monkeypatch):
    """Every ``_NativeGreedy`` that ``generate`` makes, with its decoder's calls counted."""
    made = []
    real = _NativeGreedy.for_stepper.__func__

    def for_stepper(cls, stepper, threads, num_preds):
        dec = real(cls, stepper, threads, num_preds)
        if dec is not None:
            dec.decoder = _Counting(dec.decoder)
            made.append(dec)
        return dec

    monkeypatch.setattr(_NativeGreedy, "for_stepper", classmethod(for_stepper))
    return made


def _generate_with_threads(threads, *args, **kw):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)  # the caller's count decides the slices, though generate runs torch on one
    try:
        return generate(*args, **kw)
    finally:
        torch.set_num_threads(saved)


def test_generate_takes_the_native_loop_probes_and_streams(ext, vocab, monkeypatch, spy):
    """``generate`` decodes greedily through the compiled loop, times one worker against all of them at
    its start and again after REPROBE tokens, and gives the book's argmax path, streamed piece by piece."""
    model = tiny_model(vocab, num_hiddens=32)
    monkeypatch.setattr(_NativeGreedy, "SLICE_BYTES", 1024)
    monkeypatch.setattr(_NativeGreedy, "PROBE_STEPS", 3)
    monkeypatch.setattr(_NativeGreedy, "REPROBE_MIN", 20)
    monkeypatch.setattr(_NativeGreedy, "REPROBE_EVERY", 20)
    pieces = []
    out = _generate_with_threads(2, model, vocab, PREFIX, 60, on_text=lambda i, p: pieces.append((i, p)))
    path = [vocab.idx_to_token[i] for i in argmax_path(model, vocab[list(PREFIX)], 60)]
    assert out == [PREFIX + "".join(path)]
    assert pieces == [(0, piece) for piece in path]
    (dec,) = spy
    assert dec.slices == 2
    # probes at tokens 0 and 29 (3 untimed + 3 + 3 steps each), whichever side wins, then 20, 20 and 2 steps
    assert len(dec.probes) == 2 and all(set(p) == {1, 2} for p in dec.probes)
    calls = dec.decoder.calls
    assert [n for n, _ in calls[:3]] == [3, 3, 3] and [w for _, w in calls[:3]] == [2, 1, 2]
    assert [n for n, _ in calls] == [3, 3, 3, 20, 3, 3, 3, 20, 2]


def test_short_and_unstreamed_runs_are_one_call(ext, vocab, monkeypatch, spy):
    """Below MIN_PREDS tokens the Python loop runs (packing would cost more); below 4 probes' worth there is
    no probe, and the tokens come from one call on all slices, not one call per token. The text is the
    book's argmax path either way."""
    model = tiny_model(vocab, num_hiddens=32)
    monkeypatch.setattr(_NativeGreedy, "SLICE_BYTES", 1024)
    for n in (0, 1, _NativeGreedy.MIN_PREDS - 1, _NativeGreedy.MIN_PREDS, 4 * _NativeGreedy.PROBE_STEPS - 1):
        spy.clear()
        path = "".join(vocab.idx_to_token[i] for i in argmax_path(model, vocab[list(PREFIX)], n))
        assert _generate_with_threads(2, model, vocab, PREFIX, n) == [PREFIX + path]
        if n < _NativeGreedy.MIN_PREDS:
            assert spy == []
            continue
        assert spy[0].slices == 2
        assert spy[0].decoder.calls == [(n, 2)]
        assert spy[0].probes == []


class _Clock:
    """A fake ``time.perf_counter`` for ``decode``: each decoder call advances it by steps x the seconds
    per step that ``cost[workers]`` gives, so a test decides which thread count wins each probe."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def perf_counter(self):
        return self.now


@pytest.mark.parametrize("one_wins", [True, False], ids=["one-thread-wins", "all-threads-win"])
def test_probes_back_off_and_the_winner_runs(ext, vocab, monkeypatch, spy, one_wins):
    """After one thread wins a probe, the next comes REPROBE_MIN tokens later, then twice as late each
    time it wins again; after all threads win, REPROBE_EVERY later. Between probes the winner runs."""
    import deeprnn.generate as G

    clock = _Clock({1: 1.0, 2: 2.0} if one_wins else {1: 2.0, 2: 1.0})
    monkeypatch.setattr(G, "time", clock)
    real_run = _Counting.run

    def timed_run(self, first, steps, workers):
        clock.now += steps * clock.cost[workers]
        return real_run(self, first, steps, workers)

    monkeypatch.setattr(_Counting, "run", timed_run)
    monkeypatch.setattr(_NativeGreedy, "SLICE_BYTES", 1024)
    monkeypatch.setattr(_NativeGreedy, "PROBE_STEPS", 3)
    monkeypatch.setattr(_NativeGreedy, "REPROBE_MIN", 10)
    monkeypatch.setattr(_NativeGreedy, "REPROBE_EVERY", 1000)
    model = tiny_model(vocab, num_hiddens=32)
    out = _generate_with_threads(2, model, vocab, PREFIX, 100)
    path = "".join(vocab.idx_to_token[i] for i in argmax_path(model, vocab[list(PREFIX)], 100))
    assert out == [PREFIX + path]
    (dec,) = spy
    probe = [(3, 2), (3, 1), (3, 2)]
    if one_wins:  # probes at 0, 19, 48 (+10, +20, +40 after each), then too few tokens left for one at 97
        assert dec.decoder.calls == probe + [(10, 1)] + probe + [(20, 1)] + probe + [(40, 1), (3, 1)]
        assert [min(p, key=p.get) for p in dec.probes] == [1, 1, 1]
    else:
        assert dec.decoder.calls == probe + [(91, 2)]
        assert [min(p, key=p.get) for p in dec.probes] == [2]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(cell="lstm", num_hiddens=64),  # 4 x 64 = 256 gate columns: two whole blocks of 128
        dict(cell="gru", num_hiddens=48),  # 144: a block of 128 and one of 16
        dict(cell="gru", num_hiddens=48, input="embedding", embed_size=40, residual=True, num_layers=3),
        dict(cell="rnn_tanh", num_hiddens=160),  # 160: 128 + 32
    ],
    ids=["lstm-64", "gru-48", "gru-48-embedding-residual", "rnn-160"],
)
def test_several_blocks_and_a_large_vocabulary(ext, cfg):
    """Panels of several column blocks (the last one narrower) and an output layer over 150 tokens (two
    blocks in one slice), in one slice and in two: the cell stepper's logits and state."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=150, num_layers=cfg.pop("num_layers", 2), **cfg)).eval()
    with torch.inference_mode():
        for slices in (1, 2):
            ref = make_stepper(model, torch.device("cpu"))
            ref.warm_up([5, 140, 77])
            dec = decoder_for(ref, slices)
            token = 149
            for _ in range(10):
                expected = ref.step(torch.tensor([token]))[0]
                got = dec.decoder.run(token, 1, slices)
                torch.testing.assert_close(dec.decoder.logits(), expected, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(dec.decoder.state()[0], torch.stack(ref.h)[:, 0], rtol=1e-5, atol=1e-5)
                assert got == [int(expected.argmax())]
                token = got[0]


def test_fallbacks_when_the_loop_does_not_apply(vocab, monkeypatch):
    """float64 models, and a machine where the kernels do not load, keep the stepper loop: same text."""
    model = tiny_model(vocab)
    expected = generate(model, vocab, PREFIX, 30)
    with torch.inference_mode():
        assert _NativeGreedy.for_stepper(warmed_stepper(model.double(), vocab), 2, 10**6) is None
        model.float()
        monkeypatch.setattr(native, "load", lambda: None)
        assert _NativeGreedy.for_stepper(warmed_stepper(model, vocab), 2, 10**6) is None
    assert generate(model, vocab, PREFIX, 30) == expected


def test_short_decodes_do_not_build_the_kernels(ext, vocab, monkeypatch, spy):
    """A decode shorter than BUILD_MIN_PREDS uses the compiled loop only if it is built already (the
    samples printed during training must not stop it for a ~15 s build); a long one builds it."""
    model = tiny_model(vocab)
    expected = generate(model, vocab, PREFIX, 40)
    spy.clear()
    loads = []
    real_load = native.load
    monkeypatch.setattr(native, "load", lambda: loads.append(1) or real_load())
    monkeypatch.setattr(native, "ready", lambda: False)
    assert generate(model, vocab, PREFIX, 40) == expected
    assert loads == [] and spy == []
    monkeypatch.setattr(_NativeGreedy, "BUILD_MIN_PREDS", 40)
    assert generate(model, vocab, PREFIX, 40) == expected
    assert loads == [1] and len(spy) == 1


def test_ready_means_loaded_or_cached(ext, monkeypatch, tmp_path):
    """``native.ready()``: true once loaded; for a fresh process, true only if the build is cached; false
    when turned off."""
    assert native.ready()  # the ext fixture loaded it
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache: it would have to build
    assert not native.ready()
    assert list(tmp_path.iterdir()) == []  # asking left no empty build directories behind
    building = [tmp_path / native.build_name(flags) for flags in native._flag_sets()]
    for directory in building:  # another process has just made its build directory, not yet its lock
        directory.mkdir()
    assert not native.ready()
    assert all(d.is_dir() for d in building)  # asking did not remove them from under that build
    monkeypatch.setenv(native.ENV, "0")
    assert not native.ready()


def test_a_set_stop_event_ends_the_compiled_loop_between_calls(ext, vocab, spy):
    """Without streaming the loop runs ``STREAM_CHUNK`` steps a call when a ``stop`` event is given (``CHUNK``
    otherwise), and looks at it before each call."""
    model = tiny_model(vocab)
    stop = StopAfter(3)
    with pytest.raises(Stopped, match=f"^generation stopped after {3 * _NativeGreedy.STREAM_CHUNK} tokens$"):
        generate(model, vocab, PREFIX, 500, stop=stop)
    assert len(spy) == 1 and spy[0].slices == 1  # the compiled loop, without probes
    assert generate(model, vocab, PREFIX, 500, stop=StopAfter(10**9)) == generate(model, vocab, PREFIX, 500)


def test_decoder_refuses_bad_calls(ext, vocab):
    """Out-of-range calls and shapes raise torch's RuntimeError with the decoder's own message."""
    model = tiny_model(vocab)
    with torch.inference_mode():
        dec = decoder_for(warmed_stepper(model, vocab), 2).decoder
    with pytest.raises(RuntimeError, match=r"workers must be in \[1, 2\]"):
        dec.run(1, 5, 3)
    with pytest.raises(RuntimeError, match=f"token {len(vocab)} is outside the vocabulary"):
        dec.run(len(vocab), 5, 1)
    assert dec.run(1, 0, 1) == []
    with torch.inference_mode():
        stepper = warmed_stepper(model, vocab)
        layers = stepper.layers
        args = ("lstm", [w for w, *_ in layers], [w for _, w, *_ in layers], [b for *_, b, _ in layers],
                [b for *_, b in layers], None, stepper.out_weight_t.t(), stepper.out_bias, False, 1)
        with pytest.raises(RuntimeError, match="the output bias must have vocab values"):
            type(dec)(*args[:7], stepper.out_bias[:-1], *args[8:])
        with pytest.raises(RuntimeError, match=r"the embedding must be \(vocab, layer 1's input size\)"):
            type(dec)(*args[:5], torch.zeros(len(vocab) - 1, len(vocab)), *args[6:])
        with pytest.raises(RuntimeError, match="layer 1 has the wrong shape"):
            type(dec)(*args[:1], [args[1][0], args[1][1][:, :-1]], *args[2:])
