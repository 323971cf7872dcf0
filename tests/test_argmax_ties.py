"""Greedy decoding where the argmax is not unique: the first of equal maxima wins, and a NaN counts as
the maximum, as in ``torch.argmax``, in the Python loop (``generate._greedy``) and in the compiled one
(``_NativeGreedy``, ``csrc/greedy.cpp``)."""

from __future__ import annotations

import math

import pytest
import torch

from deeprnn.generate import _NativeGreedy, generate
from deeprnn.models import native
from deeprnn.vocab import Vocab

from test_generate import PREFIX, TEXT, argmax_path, tiny_model
from test_greedy_native import _generate_with_threads, spy  # noqa: F401  (spy is a fixture)

# LOW is often the argmax along tiny_model's path; HIGH becomes its exact copy (same output row and
# bias), so wherever LOW is the maximum, HIGH ties with it bit for bit.
LOW, HIGH = 5, 23
NAN_TOKEN = 7  # not 0: a NaN at index 0 would win even without the NaN rule


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(TEXT)


def tied_model(vocab):
    model = tiny_model(vocab, num_hiddens=32)
    with torch.no_grad():
        model.output.weight[HIGH] = model.output.weight[LOW]
        model.output.bias[HIGH] = model.output.bias[LOW]
    return model


def first_max_path(model, ids: list[int], num_preds: int) -> tuple[list[int], int]:
    """The argmax path with the first maximum taken by ``list.index`` (not torch), and how many of its
    steps had LOW and HIGH tied at the maximum."""
    model.eval()
    with torch.no_grad():
        state = model.begin_state(1)
        _, state = model(torch.tensor([ids[:-1]]), state)
        tok, out, ties = ids[-1], [], 0
        for _ in range(num_preds):
            logits, state = model(torch.tensor([[tok]]), state)  # (1, 1, V)
            row = logits[0, 0].tolist()
            best = max(row)
            tok = row.index(best)
            ties += row[LOW] == row[HIGH] == best
            out.append(tok)
    return out, ties


def nan_model(vocab):
    model = tiny_model(vocab, num_hiddens=32)
    with torch.no_grad():
        model.output.bias[NAN_TOKEN] = math.nan
    return model


@pytest.mark.parametrize("n", [20, _NativeGreedy.MIN_PREDS + 8])
def test_python_loop_takes_the_first_of_tied_maxima(vocab, monkeypatch, n):
    monkeypatch.setattr(native, "load", lambda: None)  # the Python loop at every length
    model = tied_model(vocab)
    path, ties = first_max_path(model, vocab[list(PREFIX)], n)
    assert ties >= 4 and LOW in path and HIGH not in path  # the ties happened, and the lower index won
    assert generate(model, vocab, PREFIX, n) == [PREFIX + "".join(vocab.to_tokens(path))]


@pytest.mark.parametrize("n", [20, _NativeGreedy.MIN_PREDS + 8])
def test_python_loop_takes_a_nan_as_the_maximum(vocab, monkeypatch, n):
    monkeypatch.setattr(native, "load", lambda: None)
    model = nan_model(vocab)
    assert argmax_path(model, vocab[list(PREFIX)], n) == [NAN_TOKEN] * n  # torch.argmax's choice
    assert generate(model, vocab, PREFIX, n) == [PREFIX + vocab.idx_to_token[NAN_TOKEN] * n]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [_NativeGreedy.MIN_PREDS - 1, _NativeGreedy.MIN_PREDS + 8, 200])
def test_native_loop_takes_the_first_of_tied_maxima(ext, vocab, monkeypatch, spy, n, threads):  # noqa: F811
    """Below MIN_PREDS the Python loop runs, from it the compiled one (one slice, or two with LOW and
    HIGH in different slices); both give the first maximum."""
    monkeypatch.setattr(_NativeGreedy, "SLICE_BYTES", 1024)
    model = tied_model(vocab)
    path, ties = first_max_path(model, vocab[list(PREFIX)], n)
    assert ties >= 4 and LOW in path and HIGH not in path
    assert _generate_with_threads(threads, model, vocab, PREFIX, n) == [PREFIX + "".join(vocab.to_tokens(path))]
    if n < _NativeGreedy.MIN_PREDS:
        assert spy == []
    else:
        assert [dec.slices for dec in spy] == [threads]


@pytest.mark.parametrize("threads", [1, 2])
def test_native_loop_takes_a_nan_as_the_maximum(ext, vocab, monkeypatch, spy, threads):  # noqa: F811
    monkeypatch.setattr(_NativeGreedy, "SLICE_BYTES", 1024)
    model = nan_model(vocab)
    n = _NativeGreedy.MIN_PREDS + 8
    assert argmax_path(model, vocab[list(PREFIX)], n) == [NAN_TOKEN] * n
    assert _generate_with_threads(threads, model, vocab, PREFIX, n) == [PREFIX + vocab.idx_to_token[NAN_TOKEN] * n]
    assert [dec.slices for dec in spy] == [threads]
    (dec,) = spy
    logits = dec.decoder.decoder.logits()  # the last step's, as the compiled loop saw them
    assert math.isnan(logits[NAN_TOKEN]) and int(torch.argmax(logits)) == NAN_TOKEN
