"""Property-based tests that complement tests/test_vocab.py, test_batching.py and test_generate.py.

Already covered there (not repeated): char round trips over a fixed alphabet, encode == dict
lookup, windows are the stream shifted by one, and generate()'s argument validation. Here:
round trips on vocabularies built from arbitrary text (chars and words, with min_freq), vocabulary
persistence and ordering, batching invariants across epochs, resume, ranks and the minimum size,
split invariants, top-k/top-p invariants, and the command line's handling of bad generation flags.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from deeprnn.batching import BatchLoader
from deeprnn.checkpoint import save_checkpoint
from deeprnn.cli import main
from deeprnn.corpus import build_corpus
from deeprnn.errors import CorpusError
from deeprnn.generate import filter_logits
from deeprnn.models import ModelConfig, build_model
from deeprnn.vocab import EOL, Vocab, join_words, split_words, tokenize

# --- tokenise -> encode -> decode ------------------------------------------------------------------

ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(max_examples=80, deadline=None)
@given(text=ANY_TEXT)
def test_char_round_trip_with_the_texts_own_vocabulary(text):
    """Any Unicode text (emoji, combining marks, controls) survives char encode/decode exactly."""
    lines = text.split("\n")
    assert ["".join(t) for t in tokenize(lines, "char")] == lines
    vocab = Vocab(text, token="char")
    ids = vocab.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert vocab.decode(ids) == text
    assert not text or int(ids.min()) >= 1  # nothing seen is <unk>


@settings(max_examples=60, deadline=None)
@given(text=ANY_TEXT, min_freq=st.integers(0, 4))
def test_min_freq_maps_exactly_the_rare_characters_to_unk(text, min_freq):
    vocab = Vocab(text, min_freq=min_freq, token="char")
    counts = collections.Counter(text)
    expected = "".join(ch if counts[ch] >= min_freq else "<unk>" for ch in text)
    assert vocab.decode(vocab.encode(text)) == expected


WORDY = st.text(alphabet=st.sampled_from(list("abcXYZé'’ .,;:!?()\"-\n0123")), max_size=200)


@settings(max_examples=80, deadline=None)
@given(text=WORDY)
def test_word_round_trip_up_to_whitespace(text):
    words = split_words(text)
    vocab = Vocab(words, token="word")
    ids = vocab.encode(words)
    assert vocab.to_tokens(ids.tolist()) == words if words else True
    decoded = vocab.decode(ids)
    assert decoded == join_words(words)
    assert split_words(decoded) == words  # tokenising the decoded text gives the same tokens back
    assert vocab.encode(decoded).tolist() == ids.tolist()


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.text(alphabet="ab cd\t", max_size=20), max_size=8))
def test_book_word_tokenize_round_trip(lines):
    """The book's tokenize(lines, 'word') is line.split(): joining with spaces gives each line's words."""
    toks = tokenize(lines, "word")
    assert [t for t in toks] == [line.split() for line in lines]
    flat = [w for line in toks for w in line]
    vocab = Vocab(flat, token="word")
    assert vocab.decode(vocab.encode(flat)).split() == flat


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.sampled_from(list("abcdefg") + ["the", "a", EOL]), max_size=60),
       min_freq=st.integers(0, 3), token=st.sampled_from(["char", "word"]))
def test_vocabulary_persistence_and_book_order(tmp_path_factory, tokens, min_freq, token):
    vocab = Vocab(tokens, min_freq=min_freq, token=token)
    again = Vocab.from_dict(vocab.to_dict())
    assert again.idx_to_token == vocab.idx_to_token and again.token_freqs == vocab.token_freqs
    path = tmp_path_factory.mktemp("v") / "vocab.json"
    vocab.save(path)
    assert Vocab.load(path).idx_to_token == vocab.idx_to_token
    # The book's order: <unk> first, then by descending frequency, ties in first-seen order.
    assert vocab.idx_to_token[0] == "<unk>"
    freqs = [f for _, f in vocab.token_freqs]
    kept = [t for t, f in vocab.token_freqs if f >= min_freq]
    assert vocab.idx_to_token[1:] == kept
    assert freqs == sorted(freqs, reverse=True)
    first_seen = {t: i for i, t in reversed(list(enumerate(tokens)))}
    for (t1, f1), (t2, f2) in zip(vocab.token_freqs, vocab.token_freqs[1:]):
        if f1 == f2:
            assert first_seen[t1] < first_seen[t2]


# --- batching --------------------------------------------------------------------------------------

LOADER = dict(n=st.integers(2, 400), batch_size=st.integers(1, 6), num_steps=st.integers(1, 7),
              seed=st.integers(0, 10**6), mode=st.sampled_from(["sequential", "random"]))


@settings(max_examples=60, deadline=None)
@given(**LOADER)
def test_too_small_is_refused_exactly_below_the_stated_minimum(n, batch_size, num_steps, seed, mode):
    minimum = batch_size * num_steps + num_steps
    if n < minimum:
        with pytest.raises(CorpusError, match=rf"need at least {minimum} "):
            BatchLoader(torch.arange(n), batch_size, num_steps, mode=mode, seed=seed)
    else:
        loader = BatchLoader(torch.arange(n), batch_size, num_steps, mode=mode, seed=seed)
        assert len(loader) >= 1


def _loader(n, batch_size, num_steps, **kw):
    """A loader over ``arange(n)``; examples too small for one (tested above) are rejected, not passed."""
    assume(n >= batch_size * num_steps + num_steps)
    return BatchLoader(torch.arange(n), batch_size, num_steps, **kw)


@settings(max_examples=50, deadline=None)
@given(**LOADER, epochs=st.integers(1, 4))
def test_every_epoch_has_len_batches_within_bounds_and_no_window_repeats(n, batch_size, num_steps, seed, mode,
                                                                         epochs):
    loader = _loader(n, batch_size, num_steps, mode=mode, seed=seed)
    for e in range(epochs):
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.state_dict() == {"epoch": e + 1, "batch": 0}
        starts = torch.cat([X[:, 0] for X, _ in batches])
        assert len(set(starts.tolist())) == starts.numel()  # no window twice in an epoch
        for X, Y in batches:
            assert X.shape == Y.shape == (batch_size, num_steps)
            assert int(Y.max()) <= n - 1 and int(X.min()) >= 0
        if mode == "sequential":  # each stream continues where it left off
            for (X1, _), (X2, _) in zip(batches, batches[1:]):
                assert torch.equal(X2[:, 0], X1[:, -1] + 1)


@settings(max_examples=50, deadline=None)
@given(**LOADER, stop=st.integers(0, 50), epoch=st.integers(0, 3))
def test_resume_mid_epoch_gives_the_remaining_batches(n, batch_size, num_steps, seed, mode, stop, epoch):
    first = _loader(n, batch_size, num_steps, mode=mode, seed=seed)
    first.set_epoch(epoch)
    it = iter(first)
    done = [next(it) for _ in range(min(stop, len(first)))]
    state = first.state_dict()
    rest = list(it) if state["batch"] < len(first) else []
    second = BatchLoader(torch.arange(n), batch_size, num_steps, mode=mode, seed=seed)
    second.load_state_dict(state)
    resumed = list(second)
    fresh = BatchLoader(torch.arange(n), batch_size, num_steps, mode=mode, seed=seed)
    fresh.set_epoch(epoch)
    everything = list(fresh)
    assert len(done) + len(resumed) == len(everything)
    for (X, _), (W, _) in zip(done + resumed, everything):
        assert torch.equal(X, W)
    if rest:
        assert all(torch.equal(a[0], b[0]) for a, b in zip(rest, resumed))


@settings(max_examples=40, deadline=None)
@given(**LOADER, world_size=st.sampled_from([1, 2, 3]))
def test_rank_shards_tile_the_global_batch(n, batch_size, num_steps, seed, mode, world_size):
    batch_size *= world_size
    whole = _loader(n, batch_size, num_steps, mode=mode, seed=seed)
    shards = [list(BatchLoader(torch.arange(n), batch_size, num_steps, mode=mode, seed=seed, rank=r,
                               world_size=world_size)) for r in range(world_size)]
    for k, (X, Y) in enumerate(whole):
        assert torch.equal(torch.cat([s[k][0] for s in shards]), X)
        assert torch.equal(torch.cat([s[k][1] for s in shards]), Y)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(5, 80), min_size=1, max_size=3),
       fractions=st.tuples(st.floats(0.3, 0.9), st.floats(0, 0.9)))
def test_splits_are_contiguous_disjoint_and_cover_each_source(tmp_path_factory, sizes, fractions):
    d = tmp_path_factory.mktemp("src")
    paths = []
    for i, size in enumerate(sizes):
        p = d / f"{i}.txt"
        p.write_text("".join("abcdefghij"[(i + j) % 10] for j in range(size)))
        paths.append(str(p))
    corpus = build_corpus(paths, strip_boilerplate=False)
    f_train, f_valid = fractions[0], (1 - fractions[0]) * fractions[1]  # valid: a share of the rest
    f_test = 1 - f_train - f_valid
    train, valid, test = corpus.split((f_train, f_valid, f_test))
    assert train.numel() + valid.numel() + test.numel() == corpus.tokens.numel()
    # Per source: train, valid, test are consecutive slices of that source's span.
    t0 = v0 = s0 = 0
    for _, a, b in corpus.spans:
        n = b - a
        c1, c2 = int(n * f_train), (n if f_test == 0 else int(n * (f_train + f_valid)))
        span = corpus.tokens[a:b]
        assert torch.equal(train[t0 : t0 + c1], span[:c1])
        assert torch.equal(valid[v0 : v0 + c2 - c1], span[c1:c2])
        assert torch.equal(test[s0 : s0 + n - c2], span[c2:])
        t0, v0, s0 = t0 + c1, v0 + c2 - c1, s0 + n - c2


# --- generation ------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(logits=st.lists(st.one_of(st.floats(-20, 20), st.floats(-3, 3)), min_size=1, max_size=12),
       temperature=st.one_of(st.just(1.0), st.floats(0.05, 5)), top_k=st.one_of(st.none(), st.integers(1, 15)),
       top_p=st.one_of(st.none(), st.floats(0.01, 1.0)))
# Top-p on the probabilities before temperature fails these. softmax([2, 1, 0]) = .665, .245, .090: top-p 0.8
# keeps two. At temperature 0.5 they are .867, .117, .016: it keeps one; at temperature 2, .506, .307, .186:
# top-p 0.85 keeps all three (.813 before the last, against .910 before temperature).
@example(logits=[2.0, 1.0, 0.0], temperature=0.5, top_k=None, top_p=0.8)
@example(logits=[2.0, 1.0, 0.0], temperature=2.0, top_k=None, top_p=0.85)
@example(logits=[0.0, 2.0, 1.0, 3.0], temperature=0.5, top_k=3, top_p=0.8)
def test_filtered_distribution_keeps_the_best_and_respects_k_and_p(logits, temperature, top_k, top_p):
    x = torch.tensor([logits])
    out = filter_logits(x, temperature=temperature, top_k=top_k, top_p=top_p)
    kept = torch.isfinite(out[0])
    assert bool(kept[int(x[0].argmax())])  # the most likely token always survives
    assert not torch.isnan(out).any()
    if top_k is not None:
        kth = torch.sort(x[0], descending=True).values[min(top_k, len(logits)) - 1]
        assert bool((x[0][kept] >= kth).all())  # only ties with the k-th can exceed k
    if top_p is not None:
        # top-p reads softmax(logits / temperature) renormalised over what top-k left (float64 here).
        after_k = torch.isfinite(filter_logits(x, temperature=temperature, top_k=top_k)[0])
        probs = torch.softmax((x[0].double() / temperature).masked_fill(~after_k, -math.inf), -1)
        dropped = probs[after_k & ~kept]
        # Whatever was dropped is no likelier than what was kept, the kept mass reaches top_p, and the set is
        # the smallest that does: without its least likely token it falls short (up to float32 rounding).
        if dropped.numel():
            assert float(dropped.max()) <= float(probs[kept].min()) + 1e-6
            assert float(probs[kept].sum()) >= top_p - 1e-4
        assert float(probs[kept].sum() - probs[kept].min()) < top_p + 1e-5
    probs = torch.softmax(out[0], -1)
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    vocab = Vocab("abc def")
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(vocab), cell="gru", num_layers=1, num_hiddens=4))
    return save_checkpoint(tmp_path_factory.mktemp("g") / "ck", model=model, vocab=vocab, meta={})


GEN_FLAGS = {
    "--temperature": (st.floats(0.1, 3), st.one_of(st.floats(-3, 0), st.just(float("nan")))),
    "--top-k": (st.integers(1, 9), st.integers(-3, 0)),
    "--top-p": (st.floats(0.05, 1), st.one_of(st.floats(-1, 0), st.floats(1.001, 5))),
    "--num-preds": (st.integers(0, 4), st.integers(-5, -1)),
    "--num-samples": (st.integers(1, 3), st.integers(-2, 0)),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.sets(st.sampled_from(sorted(GEN_FLAGS)), max_size=2), data=st.data())
def test_generate_command_line_good_or_one_line_error(tiny_checkpoint, capsys, bad, data):
    """Through the CLI: valid flags print samples (exit 0); any bad one is one line naming it (exit 2)."""
    argv = ["generate", str(tiny_checkpoint), "--prefix", "ab", "--strategy", "sample", "--seed", "1", "--json"]
    for flag, (good, wrong) in GEN_FLAGS.items():
        argv.append(f"{flag}={data.draw(wrong if flag in bad else good, label=flag)}")  # "=": -1e-82 too
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    if not bad:
        assert code == 0 and err == "", err
    else:
        assert code == 2 and out == ""
        lines = err.splitlines()
        assert len(lines) == 1
        named = lines[0].removeprefix("deeprnn: error: ").split(" ")[0]
        assert "--" + named.replace("_", "-") in bad, lines[0]
