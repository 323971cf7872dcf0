"""Generation: greedy equals the argmax path, seeded sampling, top-k/top-p, beam search, errors, streaming."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from deeprnn.errors import ConfigError, VocabError
import deeprnn.generate as generate_mod
from deeprnn.generate import ONEDNN_MIN_STREAMS, _CellStepper, _ModelStepper, filter_logits, generate, make_stepper
from deeprnn.models import ModelConfig, build_model, native, onednn
from deeprnn.vocab import Vocab

TEXT = "the time traveller for so it will be convenient to speak of him was expounding a recondite matter to us"
PREFIX = "time traveller"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return Vocab(TEXT)  # lowercase letters and space, like the book's d2l normalisation


def tiny_model(vocab, cell="lstm", impl="concise", seed=0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=len(vocab), cell=cell, impl=impl, num_layers=2, num_hiddens=16, init="orthogonal")
    cfg.update(kw)
    # Orthogonal weights scaled up make the argmax path vary instead of settling on one character.
    model = build_model(ModelConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def argmax_path(model, ids: list[int], num_preds: int) -> list[int]:
    """The book's predict_ch8, written out: one token per forward call, warm-up then argmax."""
    model.eval()
    with torch.no_grad():
        state = model.begin_state(1)
        for i in ids[:-1]:
            _, state = model(torch.tensor([[i]]), state)
        tok, out = ids[-1], []
        for _ in range(num_preds):
            logits, state = model(torch.tensor([[tok]]), state)  # (1, 1, V)
            tok = int(logits[0, 0].argmax())
            out.append(tok)
    return out


def to_ids(vocab, text: str) -> list[int]:
    """Indices of generated characters; a predicted ``<unk>`` prints as five characters."""
    return vocab[re.findall(r"<unk>|.", text)]


def sequence_logprob(model, ids: list[int], continuation: list[int]) -> float:
    """Total log-probability of ``continuation`` after ``ids`` under ``model`` (float64 sum)."""
    model.eval()
    with torch.no_grad():
        X = torch.tensor([ids + continuation[:-1]])  # (1, T)
        logits, _ = model(X)  # (T, 1, V)
        logp = torch.log_softmax(logits[:, 0].double(), -1)[len(ids) - 1 :]  # (num_preds, V)
        return float(logp.gather(1, torch.tensor(continuation)[:, None]).sum())


MODELS = [
    pytest.param(dict(cell=c, impl=i), id=f"{i}-{c}")
    for i, c in itertools.product(("concise", "scratch"), ("lstm", "gru", "rnn_tanh"))
] + [
    pytest.param(dict(cell="rnn_relu", impl="scratch"), id="scratch-rnn_relu"),
    pytest.param(dict(cell="gru", impl="scratch", gru_variant="d2l"), id="scratch-gru-d2l"),
    pytest.param(dict(cell="lstm", input="embedding", embed_size=8), id="concise-lstm-embedding"),
    pytest.param(dict(cell="gru", impl="scratch", input="embedding", tie_weights=True), id="scratch-gru-tied"),
    # the quality presets' deep variants: a stepper that ignored them generated nonsense from good models
    pytest.param(dict(cell="lstm", num_layers=3, residual=True, input="embedding", embed_size=8), id="concise-lstm-residual"),
    pytest.param(dict(cell="gru", impl="scratch", num_layers=3, residual=True), id="scratch-gru-residual"),
    pytest.param(dict(cell="lstm", impl="scratch", layer_norm=True), id="scratch-lstm-layernorm"),
    pytest.param(dict(cell="gru", impl="scratch", layer_norm=True), id="scratch-gru-layernorm"),
    # zoneout's evaluation step is the expected update, not the plain cell's: it must use the model's own
    pytest.param(dict(cell="lstm", impl="scratch", num_layers=2, zoneout_cell=0.5, zoneout_hidden=0.3),
                 id="scratch-lstm-zoneout"),
]


def takes_fast_path(kw) -> bool:
    """Whether a model of ``MODELS`` is stepped by ``_CellStepper`` (torch's cells, the native greedy loop)."""
    return not (kw.get("gru_variant") == "d2l" or kw.get("layer_norm") or kw.get("zoneout_cell")
                or kw.get("zoneout_hidden"))


# -- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", MODELS)
def test_greedy_equals_argmax_path(vocab, kw):
    model = tiny_model(vocab, **kw)
    ids = vocab[list(PREFIX)]
    expected = PREFIX + "".join(vocab.idx_to_token[i] for i in argmax_path(model, ids, 40))
    assert generate(model, vocab, PREFIX, 40) == [expected]
    assert len(set(expected[len(PREFIX):])) > 2  # the path is not a single repeated character


@pytest.mark.parametrize("streams,path", [(3, "cells"), (ONEDNN_MIN_STREAMS + 1, "onednn"),
                                          (ONEDNN_MIN_STREAMS + 1, "rows"), (ONEDNN_MIN_STREAMS + 1, "avx2")])
@pytest.mark.parametrize("kw", MODELS)
def test_stepper_matches_forward(vocab, kw, streams, path, monkeypatch):
    """The per-step fast path gives the logits and final state of one ``forward`` over the window: on
    ``torch.*_cell`` for few streams; from ``ONEDNN_MIN_STREAMS`` streams, in the compiled row stepper
    (``RowStepper``, where the C++ kernels have a row product kernel and it is on), else with the cells
    written out on oneDNN's products (where this torch has oneDNN and the CPU AVX-512, made so here), else
    (``avx2``: a CPU without AVX-512) on ``torch.*_cell`` again."""
    ext = native.load()
    if path == "rows" and (ext is None or not ext.row_kernel_isa()):
        pytest.skip("the C++ kernels here have no row product kernel: no row stepper")
    if ext is not None:
        monkeypatch.setattr(ext, "row_products", lambda: path == "rows")  # the stepper asks it once
    monkeypatch.setattr(generate_mod, "_onednn_steps", lambda: path != "avx2")
    model = tiny_model(vocab, **kw).eval()
    fused = takes_fast_path(kw)
    calls = {"onednn": [], "rows": []}
    for name in calls:
        monkeypatch.setattr(_CellStepper, f"_step_{name}", lambda self, x, real=getattr(_CellStepper, f"_step_{name}"),
                            seen=calls[name]: seen.append(1) or real(self, x))
    torch.manual_seed(1)
    X = torch.randint(len(vocab), (streams, 12))  # (B, T)
    with torch.inference_mode():
        expected, _ = model(X)  # (T, B, V)
        stepper = make_stepper(model, torch.device("cpu"))
        assert type(stepper) is (_CellStepper if fused else _ModelStepper)
        stepper.warm_up([])
        stepper.expand(streams)
        got = torch.stack([stepper.step(X[:, t].contiguous()) for t in range(X.shape[1])])  # (T, B, V)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert len(calls["rows"]) == (12 if fused and path == "rows" else 0)
    assert len(calls["onednn"]) == (12 if fused and path == "onednn" and onednn.enabled() else 0)


def test_greedy_from_one_character_prefix_and_zero_preds(vocab):
    model = tiny_model(vocab)
    assert generate(model, vocab, "t", 0) == ["t"]
    ids = [vocab["t"]]
    assert generate(model, vocab, "t", 15) == ["t" + "".join(vocab.to_tokens(argmax_path(model, ids, 15)))]


def test_greedy_num_samples_repeats_the_one_result(vocab):
    model = tiny_model(vocab)
    out = generate(model, vocab, PREFIX, 10, num_samples=3)
    assert out == [generate(model, vocab, PREFIX, 10)[0]] * 3


def test_eval_mode_inside_and_training_flags_restored(vocab):
    model = tiny_model(vocab, dropout=0.5)  # dropout would randomise a forward in training mode
    model.train()
    model.rnn.eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    a = generate(model, vocab, PREFIX, 30)
    assert [m.training for m in model.modules()] == before
    b = generate(model, vocab, PREFIX, 30)
    assert a == b == [PREFIX + "".join(vocab.to_tokens(argmax_path(model, vocab[list(PREFIX)], 30)))]
    assert all(not p.is_inference() for p in model.parameters())


# -- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(vocab):
    model = tiny_model(vocab)
    rng = torch.get_rng_state()
    a = generate(model, vocab, PREFIX, 40, strategy="sample", seed=7, num_samples=4)
    assert torch.equal(torch.get_rng_state(), rng)
    b = generate(model, vocab, PREFIX, 40, strategy="sample", seed=7, num_samples=4)
    c = generate(model, vocab, PREFIX, 40, strategy="sample", seed=8, num_samples=4)
    assert a == b
    assert a != c
    assert len(set(a)) == 4  # the streams draw independently
    assert all(s.startswith(PREFIX) and len(to_ids(vocab, s[len(PREFIX):])) == 40 for s in a)


def test_unseeded_sampling_differs_between_calls(vocab):
    model = tiny_model(vocab)
    runs = {tuple(generate(model, vocab, PREFIX, 40, strategy="sample", temperature=2.0)) for _ in range(3)}
    assert len(runs) > 1


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_k=1, temperature=5.0), dict(top_p=1e-6),
                                dict(top_p=1e-6, temperature=0.3, top_k=3)])
def test_top_k_one_and_tiny_top_p_equal_greedy(vocab, kw):
    model = tiny_model(vocab, cell="gru")
    greedy = generate(model, vocab, PREFIX, 30)
    assert generate(model, vocab, PREFIX, 30, strategy="sample", seed=3, num_samples=3, **kw) == greedy * 3


class FixedLM(nn.Module):
    """A stand-in following the LanguageModel contract: the same next-token distribution every step."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())

    def begin_state(self, batch_size, device=None, dtype=None):
        return torch.zeros(1, batch_size, 1, device=device)

    def forward(self, X, state=None):
        B, T = X.shape
        return self.logits.expand(T, B, -1), state  # (T, B, V)


SQRT_SUM = math.sqrt(0.5) + math.sqrt(0.3) + math.sqrt(0.2)  # normalises p^(1/T) at T = 2


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(), [0.0, 0.5, 0.3, 0.2, 0.0]),
        (dict(top_k=2), [0.0, 0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
        (dict(top_p=0.75), [0.0, 0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]),
        (dict(top_p=0.5), [0.0, 1.0, 0.0, 0.0, 0.0]),
        (dict(temperature=0.5), [0.0, 25 / 38, 9 / 38, 4 / 38, 0.0]),  # p^(1/T) renormalised
        # top-p reads the probabilities after temperature. T = 2: p^(1/2) / SQRT_SUM (√.5 + √.3 + √.2 = 1.702),
        # i.e. .415, .322, .263; the mass before 'c' is .737 < .75, so all three stay (on the raw .5, .3, .2
        # the mass before 'c' is .8 and 'c' would go).
        (dict(temperature=2.0, top_p=0.75),
         [0.0, math.sqrt(0.5) / SQRT_SUM, math.sqrt(0.3) / SQRT_SUM, math.sqrt(0.2) / SQRT_SUM, 0.0]),
        # T = 0.5: 25/38 = .658 >= .6 after 'a' alone, so only 'a' stays (on the raw .5 < .6, 'b' would stay too).
        (dict(temperature=0.5, top_p=0.6), [0.0, 1.0, 0.0, 0.0, 0.0]),
    ],
)
def test_sampling_draws_the_filtered_distribution(kw, expected):
    vocab = Vocab("abcd")  # <unk> a b c d, all frequency 1
    model = FixedLM([0.0, 0.5, 0.3, 0.2, 0.0])  # zero probability for <unk> and 'd'
    n = 20000
    out = generate(model, vocab, "a", 1, strategy="sample", num_samples=n, seed=0, **kw)
    counts = torch.tensor([sum(s[1:] == tok for s in out) for tok in vocab.idx_to_token], dtype=torch.float64)
    for c, p in zip(counts.tolist(), expected):
        if p == 0:
            assert c == 0
        else:
            assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_filter_logits_sets():
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw)).tolist()  # noqa: E731
    assert kept(top_k=2) == [[True, False, True, False], [False, False, True, True]]
    assert kept(top_k=10) == [[True] * 4] * 2
    assert kept(top_p=1e-9) == [[False, False, True, False], [False, False, True, False]]
    assert kept(top_p=1.0) == [[True] * 4] * 2
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), (logits - logits.amax(1, keepdim=True)) / 2)


def test_a_tiny_temperature_tends_to_greedy():
    """``logits / 1e-300`` in float32 overflowed to inf and softmax gave NaN, which drew the last token of the
    vocabulary every time (``timeqqqq…``): now the most likely tokens get all the probability, ties shared."""
    logits = torch.tensor([[2.0, 1.0, 3.0, 0.0], [5.0, 0.0, 5.0, 1.0]])
    for t in (1e-30, 1e-300, 5e-324):
        probs = filter_logits(logits, temperature=t).softmax(-1)
        assert probs.tolist() == [[0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.5, 0.0]]


# -- beam search ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", MODELS[:6])
def test_beam_width_one_equals_greedy(vocab, kw):
    model = tiny_model(vocab, **kw)
    assert generate(model, vocab, PREFIX, 30, strategy="beam", beam_width=1) == generate(model, vocab, PREFIX, 30)


@pytest.mark.parametrize("seed", range(4))
def test_beam_finds_at_least_greedy_logprob(vocab, seed):
    model = tiny_model(vocab, seed=seed)
    ids = vocab[list(PREFIX)]
    greedy = to_ids(vocab, generate(model, vocab, PREFIX, 12)[0][len(PREFIX):])
    beams = generate(model, vocab, PREFIX, 12, strategy="beam", beam_width=5, num_samples=5)
    scores = [sequence_logprob(model, ids, to_ids(vocab, b[len(PREFIX):])) for b in beams]
    assert scores == sorted(scores, reverse=True)  # best first
    assert len(set(beams)) == 5
    assert scores[0] >= sequence_logprob(model, ids, greedy) - 1e-5


def test_wide_beam_is_exhaustive_search():
    """With beam_width >= V**(n-1) nothing is pruned, so the beams are the exact top sequences."""
    vocab = Vocab("aab")  # <unk> a b
    model = tiny_model(vocab, cell="gru", num_hiddens=8)
    ids, n = vocab[list("ab")], 4
    every = list(itertools.product(range(len(vocab)), repeat=n))
    scores = sorted(((sequence_logprob(model, ids, list(s)), s) for s in every), reverse=True)
    beams = generate(model, vocab, "ab", n, strategy="beam", beam_width=27, num_samples=6)
    assert [to_ids(vocab, b[2:]) for b in beams] == [list(s) for _, s in scores[:6]]


def test_beam_streams_each_returned_beam(vocab):
    model = tiny_model(vocab)
    got: dict[int, list[str]] = {}
    out = generate(model, vocab, PREFIX, 10, strategy="beam", num_samples=2,
                   on_text=lambda i, piece: got.setdefault(i, []).append(piece))
    assert [PREFIX + "".join(got[i]) for i in range(2)] == out


# -- streaming --------------------------------------------------------------------------------


def test_on_text_receives_pieces_in_order(vocab):
    model = tiny_model(vocab)
    calls: list[tuple[int, str]] = []
    out = generate(model, vocab, PREFIX, 25, on_text=lambda i, piece: calls.append((i, piece)))
    assert calls == [(0, c) for c in re.findall(r"<unk>|.", out[0][len(PREFIX):])]

    calls.clear()
    out = generate(model, vocab, PREFIX, 25, strategy="sample", seed=1, num_samples=3,
                   on_text=lambda i, piece: calls.append((i, piece)))
    assert [i for i, _ in calls] == [0, 1, 2] * 25  # step by step, streams in order
    assert [PREFIX + "".join(p for i, p in calls if i == s) for s in range(3)] == out


class StopAfter:
    """A ``stop`` event that reads as set from its ``n``-th look on (a client hanging up mid-decode)."""

    def __init__(self, n: int):
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_a_set_stop_event_ends_generation_before_the_next_token(vocab, strategy):
    """Beam search too, though it tells nothing until its end: a server stops a decode nobody waits for.
    (Greedy's compiled loop, for longer decodes, is test_greedy_native's.)"""
    model = tiny_model(vocab)
    stop = StopAfter(7)
    with pytest.raises(generate_mod.Stopped, match=r"^generation stopped after 7 tokens$"):
        generate(model, vocab, PREFIX, generate_mod._NativeGreedy.MIN_PREDS - 1, strategy=strategy, num_samples=2,
                 stop=stop)
    assert stop.looks == 8
    unset = StopAfter(10**9)
    kw = dict(strategy=strategy, num_samples=2, seed=3)
    assert generate(model, vocab, PREFIX, 20, stop=unset, **kw) == generate(model, vocab, PREFIX, 20, **kw)
    assert unset.looks == 20  # once before each token


def test_samples_that_cannot_fit_in_memory_are_refused_before_any_is_drawn(vocab, monkeypatch):
    """``--num-samples 100000000`` was ended by the kernel's out-of-memory killer (exit 137, no word) after
    growing to all of the machine's memory; now a ``MemoryError`` says so before anything is allocated."""
    model = tiny_model(vocab)  # 2 layers x 16 units
    monkeypatch.setattr(generate_mod, "_free_memory", lambda dev: 2**30)
    need = 10**6 * (1000 * (generate_mod.DEVICE_BYTES_PER_TOKEN + generate_mod.HOST_BYTES_PER_TOKEN) + 32 * 2 * 16
                    + 32 * len(vocab))
    with pytest.raises(MemoryError) as err:
        generate(model, vocab, PREFIX, 1000, strategy="sample", num_samples=10**6, seed=0)
    assert str(err.value) == (f"1,000,000 samples of 1,000 tokens need at least {need / 2**30:.1f} GiB, and cpu has "
                              "1.0 GiB free; ask for fewer samples or tokens")
    assert len(generate(model, vocab, PREFIX, 10, strategy="sample", num_samples=3, seed=0)) == 3
    monkeypatch.setattr(generate_mod, "_free_memory", lambda dev: 2**20)  # small sizes in MiB, not "0.0 GiB"
    with pytest.raises(MemoryError) as err:
        generate(model, vocab, PREFIX, 1000, strategy="sample", num_samples=1000, seed=0)
    assert str(err.value) == (f"1,000 samples of 1,000 tokens need at least {need / 1000 / 2**20:.1f} MiB, and cpu "
                              "has 1.0 MiB free; ask for fewer samples or tokens")
    monkeypatch.setattr(generate_mod, "_free_memory", lambda dev: None)  # not known: not checked
    assert len(generate(model, vocab, PREFIX, 1, strategy="sample", num_samples=1000, seed=0)) == 1000


def test_greedy_copies_are_one_string(vocab):
    out = generate(tiny_model(vocab), vocab, PREFIX, 20, num_samples=10**6)
    assert len(out) == 10**6 and out[0] is out[-1] and out[0] == generate(tiny_model(vocab), vocab, PREFIX, 20)[0]


def test_word_vocabulary_joins_with_spaces():
    words = TEXT.split()
    vocab = Vocab(words)
    assert vocab.token == "word"
    model = tiny_model(vocab)
    pieces: list[str] = []
    out = generate(model, vocab, "the time", 6, on_text=lambda i, p: pieces.append(p))[0]
    expected = argmax_path(model, vocab[["the", "time"]], 6)
    assert out == "the time " + " ".join(vocab.to_tokens(expected))
    assert out == "the time" + "".join(pieces)
    with pytest.raises(VocabError) as err:
        generate(model, vocab, "the zebra time", 2)
    assert str(err.value) == "prefix has words not in the vocabulary: 'zebra'; use --unk replace to map them to <unk>"


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_a_raw_word_model_writes_text_as_its_corpus_reads(strategy):
    """Words of a raw/lower corpus come back as text: <eol> a line break, no space before punctuation (they
    were printed as 'Traveller <eol> . .'); the prefix is cut as the corpus was ('Traveller, who' was refused as
    the unknown word 'Traveller,')."""
    from deeprnn.vocab import join_words, split_words

    text = "The Time Traveller, who was here.\nHe said: (so) it was!\n"
    vocab = Vocab(split_words(text * 3))
    assert {"<eol>", ",", "(", ")"} <= set(vocab.idx_to_token)
    model = tiny_model(vocab)
    with torch.no_grad():
        model.output.bias[vocab.unk] = -1e4  # '<unk>' would read back as three tokens
    prefix = "The Time Traveller, who"
    streamed: dict[int, str] = {}
    kw = dict(strategy=strategy, seed=3, num_samples=2, beam_width=2)
    outs = generate(model, vocab, prefix, 40, on_text=lambda i, p: streamed.update({i: streamed.get(i, "") + p}),
                    **kw)
    for i, out in enumerate(outs):
        assert out == prefix + streamed[i]
        tokens = split_words(out)
        assert tokens[:5] == ["The", "Time", "Traveller", ",", "who"]
        assert out == join_words(tokens) and "<eol>" not in out
    if strategy == "greedy":
        expected = argmax_path(model, vocab[split_words(prefix)], 40)
        assert outs[0] == join_words(split_words(prefix) + vocab.to_tokens(expected))
        assert "\n" in outs[0] or any(p in vocab.to_tokens(expected) for p in ",.:!()")  # the joins were exercised


def test_a_word_prefix_ending_in_a_space_is_not_spaced_twice():
    """'time traveller ' was followed by ' the': two spaces. The prefix's own space spaces the first word."""
    from deeprnn.vocab import join_words, split_words

    vocab = Vocab(split_words("the time traveller was here and the time was now " * 3))  # no <eol>: all words
    model = tiny_model(vocab)
    with torch.no_grad():
        model.output.bias[vocab.unk] = -1e4
    plain = generate(model, vocab, "time traveller", 6, strategy="greedy")[0]
    spaced = generate(model, vocab, "time traveller ", 6, strategy="greedy")[0]
    assert plain.startswith("time traveller ") and "  " not in spaced
    assert spaced == plain  # the same words, the prefix's space standing for the one the first word brought
    assert spaced == join_words(split_words(spaced))


# -- prefix outside the vocabulary --------------------------------------------------------------


def test_unknown_prefix_characters_error_lists_them(vocab):
    model = tiny_model(vocab)
    with pytest.raises(VocabError) as err:
        generate(model, vocab, "time Q! traveller!", 5)
    assert str(err.value) == (
        "prefix has characters not in the vocabulary: 'Q', '!'; use --unk replace to map them to <unk>"
    )
    with pytest.raises(VocabError) as err:
        generate(model, vocab, "Time Traveller", 5)  # never lowercased silently
    assert str(err.value) == (
        "prefix has characters not in the vocabulary: 'T' (lowercased, they are in the vocabulary: lowercase the prefix); "
        "use --unk replace to map them to <unk>"
    )


NORMALISED = " (the model was trained on {!r}-normalised text; normalised so, the prefix is {!r}: pass that)"
LOWERCASE = " (lowercased, they are in the vocabulary: lowercase the prefix)"


@pytest.mark.parametrize("vocab_text, prefix, normalization, hint", [
    (TEXT, "Time Traveller,", "d2l", NORMALISED.format("d2l", "time traveller")),
    (TEXT, "time\ntraveller", "d2l", NORMALISED.format("d2l", "timetraveller")),  # the book joins lines so
    (TEXT.split(), "The TIME:\ntraveller", "d2l", NORMALISED.format("d2l", "the time traveller")),  # words apart
    (TEXT + ":", "Time: Traveller", "lower", NORMALISED.format("lower", "time: traveller")),
    (TEXT, "Time Traveller", "raw", LOWERCASE),  # raw text reads as it is: only the old hint
    (TEXT, "Time Traveller", None, LOWERCASE),  # a caller that does not know the normalisation
    (TEXT, "Zeit", "d2l", ""),  # 'z' is not in the vocabulary either
    (TEXT, "!?", "d2l", ""),  # nothing left after it
    (TEXT, "Time Traveller", "D2L", LOWERCASE),  # a normalisation this version does not know: no suggestion
    (TEXT.title().split() + TEXT.split(), "THE TIME", "raw", LOWERCASE),  # a cased vocabulary: not "is lowercase"
])
def test_a_refused_prefix_is_suggested_as_the_model_read_its_text(vocab_text, prefix, normalization, hint):
    """``Time Traveller,`` for a model trained on the book's d2l-normalised text: the message names the prefix
    that model can take, as its training text was normalised, when every token of that is known."""
    vocab = Vocab(vocab_text)
    model = tiny_model(vocab)
    missing = generate_mod.unknown_tokens(vocab, generate_mod.prefix_tokens(vocab, prefix))
    kind = "words" if vocab.token == "word" else "characters"
    with pytest.raises(VocabError) as err:
        generate(model, vocab, prefix, 5, normalization=normalization)
    assert str(err.value) == (f"prefix has {kind} not in the vocabulary: {', '.join(map(repr, missing))}{hint}; "
                              "use --unk replace to map them to <unk>")
    if hint.startswith(" (the model was trained"):
        suggested = re.search(r"the prefix is '(.*)': pass that", hint).group(1).replace("\\n", "\n")
        assert generate(model, vocab, suggested, 5, normalization=normalization)[0].startswith(suggested)


def test_unknown_prefix_characters_replaced_with_a_warning(vocab):
    model = tiny_model(vocab)
    prefix = "time Q! traveller"
    with pytest.warns(UserWarning, match=r"^prefix characters not in the vocabulary were fed as <unk>: 'Q', '!'$"):
        out = generate(model, vocab, prefix, 20, unk="replace")
    ids = [vocab.token_to_idx.get(c, 0) for c in prefix]
    assert 0 in ids
    assert out == [prefix + "".join(vocab.to_tokens(argmax_path(model, ids, 20)))]


def test_vocabulary_of_another_size_is_refused(vocab):
    model = tiny_model(Vocab("ab"))
    with pytest.raises(VocabError, match=r"^the model predicts 3 tokens but the vocabulary has \d+; "):
        generate(model, vocab, PREFIX, 5)
    with pytest.raises(VocabError, match=r"^the model predicts 5 tokens but the vocabulary has \d+; "):
        generate(FixedLM([0.2] * 5), vocab, PREFIX, 5)  # no config: checked on the first logits


def test_device_other_than_the_models_is_refused(vocab):
    with pytest.raises(ConfigError, match=r"^device is meta but the model's parameters are on cpu; "):
        generate(tiny_model(vocab), vocab, PREFIX, 5, device="meta")


def test_a_model_or_vocab_of_the_wrong_kind_is_a_config_error(vocab):
    """``generate(model, None, …)`` and the two swapped were AttributeErrors from deep inside."""
    model = tiny_model(vocab)
    with pytest.raises(ConfigError) as err:
        generate(model, None, PREFIX, 5)
    assert str(err.value) == "vocab must be a deeprnn Vocab (a checkpoint's .vocab), got NoneType"
    with pytest.raises(ConfigError) as err:
        generate(vocab, model, PREFIX, 5)
    assert str(err.value) == "model must be a torch.nn.Module (a checkpoint's .model), got Vocab"


def test_cpu_0_is_the_models_cpu_and_cuda_without_cuda_is_refused(vocab):
    """``cpu:0`` was refused as another device than the model's ``cpu``; ``cuda`` on a machine without it was
    torch's ``AssertionError: Torch not compiled with CUDA enabled``."""
    model = tiny_model(vocab)
    assert generate(model, vocab, PREFIX, 5, device="cpu:0") == generate(model, vocab, PREFIX, 5)
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError) as e:
        generate(model, vocab, PREFIX, 5, device="cuda")
    assert str(e.value) == "device is cuda but CUDA is not available; leave device=None to use the model's"


# -- argument validation ------------------------------------------------------------------------


def test_a_prefix_of_spaces_seeds_a_character_model(vocab):
    """A prefix " " is a character of the vocabulary like any other; it was refused as "must be a non-empty string"."""
    model = tiny_model(vocab)
    text = generate(model, vocab, " ", 5, strategy="greedy")[0]
    assert text.startswith(" ") and len(text) == 6


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_preds=-1), "num_preds must be >= 0, got -1"),
        (dict(num_preds=2.5), "num_preds must be an integer >= 0, got 2.5"),
        (dict(temperature=0), "temperature must be > 0, got 0"),
        (dict(temperature=-0.5), "temperature must be > 0, got -0.5"),
        (dict(temperature=float("nan")), "temperature must be a finite number > 0, got nan"),
        (dict(top_k=0), "top_k must be >= 1, got 0"),
        (dict(top_k=2.0), "top_k must be an integer >= 1 or None, got 2.0"),
        (dict(top_p=0), "top_p must be in (0, 1], got 0"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_p="0.9"), "top_p must be a number in (0, 1] or None, got '0.9'"),
        (dict(num_samples=0), "num_samples must be >= 1, got 0"),
        (dict(beam_width=0), "beam_width must be >= 1, got 0"),
        (dict(strategy="topk"), "strategy must be one of greedy, sample, beam; got 'topk'"),
        (dict(prefix=""), "prefix must be a non-empty string (it seeds the model's state), got ''"),
        (dict(prefix="   ", vocab="word"),
         "prefix must hold at least one word for a word-level model (it seeds the model's state), got '   '"),
        (dict(strategy="beam", num_samples=5, beam_width=4),
         "num_samples must be <= beam_width for beam search, got num_samples=5 and beam_width=4; "
         "raise beam_width or ask for fewer samples"),
        (dict(seed=-1), "seed must be an integer in [0, 2**63) or None, got -1"),
        (dict(seed=2**63), f"seed must be an integer in [0, 2**63) or None, got {2**63}"),  # what train and serve take
        (dict(unk="ignore"), "unk must be one of error, replace; got 'ignore'"),
        (dict(on_text="print"), "on_text must be a callable (stream index, text piece) or None, got 'print'"),
        (dict(stop=True), "stop must be a threading.Event (anything with is_set()) or None, got True"),
    ],
)
def test_bad_arguments_raise_config_error(vocab, kw, message):
    model = tiny_model(vocab)
    kw = dict(kw)
    prefix = kw.pop("prefix", PREFIX)
    num_preds = kw.pop("num_preds", 5)
    if kw.pop("vocab", None) == "word":
        vocab = Vocab(TEXT.split())
    with pytest.raises(ConfigError) as err:
        generate(model, vocab, prefix, num_preds, **kw)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


ORDER = ("strategy", "prefix", "num_preds", "temperature", "top_k", "top_p", "num_samples", "beam_width")


def first_bad(a: dict) -> str | None:
    """The reference: which argument ``generate`` must name, in its documented checking order."""
    ok = {
        "strategy": a["strategy"] in ("greedy", "sample", "beam"),
        "prefix": a["prefix"] != "",
        "num_preds": a["num_preds"] >= 0,
        "temperature": math.isfinite(a["temperature"]) and a["temperature"] > 0,
        "top_k": a["top_k"] is None or a["top_k"] >= 1,
        "top_p": a["top_p"] is None or (math.isfinite(a["top_p"]) and 0 < a["top_p"] <= 1),
        "num_samples": a["num_samples"] >= 1,
        "beam_width": a["beam_width"] >= 1,
    }
    for name in ORDER:
        if not ok[name]:
            return name
    if a["strategy"] == "beam" and a["num_samples"] > a["beam_width"]:
        return "num_samples"
    return None


@pytest.fixture(scope="module")
def small_model(vocab):
    return tiny_model(vocab, num_hiddens=4, num_layers=1)


# For each argument: values generate accepts, and values it must refuse.
ARGUMENTS = {
    "strategy": (st.sampled_from(["greedy", "sample", "beam"]), st.sampled_from(["nucleus", "Greedy", ""])),
    "prefix": (st.sampled_from(["t", " ", "time", "time traveller"]), st.just("")),
    "num_preds": (st.integers(0, 3), st.integers(-5, -1)),
    "temperature": (
        st.floats(0.05, 5.0),
        st.one_of(st.floats(-3.0, 0.0), st.sampled_from([float("inf"), float("-inf"), float("nan")])),
    ),
    "top_k": (st.one_of(st.none(), st.integers(1, 40)), st.integers(-3, 0)),
    "top_p": (
        st.one_of(st.none(), st.floats(0.0, 1.0, exclude_min=True)),
        st.one_of(st.floats(-1.0, 0.0), st.floats(1.0, 3.0, exclude_min=True), st.just(float("nan"))),
    ),
    "num_samples": (st.integers(1, 4), st.integers(-2, 0)),
    "beam_width": (st.integers(1, 4), st.integers(-2, 0)),
}


@settings(max_examples=150, deadline=None)
@given(broken=st.sets(st.sampled_from(sorted(ARGUMENTS)), max_size=2), data=st.data())
def test_argument_validation_property(vocab, small_model, broken, data):
    """Any mix of good and bad arguments: a ``ConfigError`` naming the first bad one, else valid output."""
    args = {name: data.draw(ARGUMENTS[name][name in broken], label=name) for name in ARGUMENTS}
    prefix, num_preds, strategy = args["prefix"], args["num_preds"], args["strategy"]
    bad = first_bad(args)
    event(f"first bad argument: {bad}")
    kw = {k: v for k, v in args.items() if k not in ("prefix", "num_preds")}
    if bad is None:
        out = generate(small_model, vocab, prefix, num_preds, seed=0, **kw)
        expected = 1 if strategy == "beam" and num_preds == 0 else args["num_samples"]
        assert len(out) == expected
        assert all(s.startswith(prefix) and len(to_ids(vocab, s[len(prefix):])) == num_preds for s in out)
    else:
        with pytest.raises(ConfigError) as err:
            generate(small_model, vocab, prefix, num_preds, seed=0, **kw)
        message = str(err.value)
        assert message.startswith(bad + " ")
        assert "\n" not in message

