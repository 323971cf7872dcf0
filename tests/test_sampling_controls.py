"""Sampling's random number contract: ``seed`` seeds a local ``torch.Generator`` whose uniform doubles make
the draws by inverse CDF (one ``torch.rand(B, 1)`` per step, row ``i`` for stream ``i``), and no seed
leaves every global generator alone."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from deeprnn.generate import generate
from deeprnn.vocab import Vocab

from test_generate import PREFIX, TEXT, FixedLM, tiny_model

PROBS = [0.0, 0.5, 0.3, 0.2, 0.0]  # <unk> a b c d: zero probability for <unk> and 'd'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(TEXT)


def inverse_cdf(cdf: list[float], u: float) -> int:
    """The first token whose cumulative probability exceeds ``u`` times the total; refuses a ``u`` so close
    to a boundary that float32 rounding of the model's softmax could move the draw."""
    x = u * cdf[-1]
    assert min(abs(c - x) for c in cdf) > 1e-5, "a draw on a boundary: pick another seed"
    return next(i for i, c in enumerate(cdf) if c > x)


def test_seeded_draws_are_the_seeded_generators_inverse_cdf():
    """seed=0 on a fixed distribution: the tokens the documented draw gives, worked out here in float64."""
    vocab = Vocab("abcd")
    g = torch.Generator().manual_seed(0)
    cdf = list(itertools.accumulate(PROBS))
    expected = [[] for _ in range(3)]
    for _ in range(12):
        for i, u in enumerate(torch.rand(3, 1, dtype=torch.float64, generator=g)[:, 0].tolist()):
            expected[i].append(vocab.idx_to_token[inverse_cdf(cdf, u)])
    out = generate(FixedLM(PROBS), vocab, "a", 12, strategy="sample", num_samples=3, seed=0)
    assert out == ["a" + "".join(e) for e in expected]
    assert out == ["accaaaabbabca", "abbaabababbba", "aabbaaaabbaac"]  # the same, written out


def test_seeded_draws_follow_the_model_state_stream_by_stream(vocab):
    """A real model, two streams, temperature 0.7: the reference steps ``model.forward`` on both streams
    and draws each one's token from its own row of the seeded generator's uniforms."""
    model = tiny_model(vocab).eval()
    ids, B, n, T = vocab[list(PREFIX)], 2, 30, 0.7
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, state = model(torch.tensor([ids[:-1]]), model.begin_state(1))
        state = tuple(s.expand(-1, B, -1).contiguous() for s in state)  # LSTM (h, c), each (L, B, H)
        tokens, drawn = [ids[-1]] * B, [[] for _ in range(B)]
        for _ in range(n):
            logits, state = model(torch.tensor(tokens)[:, None], state)  # (1, B, V)
            cdfs = torch.softmax(logits[0].double() / T, -1).cumsum(-1).tolist()
            us = torch.rand(B, 1, dtype=torch.float64, generator=g)[:, 0].tolist()
            tokens = [inverse_cdf(cdf, u) for cdf, u in zip(cdfs, us)]
            for i, t in enumerate(tokens):
                drawn[i].append(t)
    out = generate(model, vocab, PREFIX, n, strategy="sample", num_samples=B, seed=0, temperature=T)
    assert out == [PREFIX + "".join(vocab.to_tokens(d)) for d in drawn]
    assert drawn[0] != drawn[1]


def test_unseeded_sampling_leaves_the_global_generators_alone(vocab):
    """seed=None seeds from the OS: torch's global generator (and Python's) are neither read nor moved,
    and calls still differ."""
    model = tiny_model(vocab)
    torch.manual_seed(123)
    random.seed(123)
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    runs = {tuple(generate(model, vocab, PREFIX, 40, strategy="sample", temperature=2.0, num_samples=2))
            for _ in range(3)}
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == python_rng
    assert len(runs) > 1
