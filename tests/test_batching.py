"""Batching: exact small cases, the book's iterators call for call, BatchLoader epochs/resume/shards."""

import random
import re

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deeprnn.batching import (
    BatchLoader,
    _epoch_seed,
    book_seq_data_iter_random,
    book_seq_data_iter_sequential,
    seq_data_iter_random,
    seq_data_iter_sequential,
)
from deeprnn.corpus import build_corpus
from deeprnn.errors import ConfigError, CorpusError


# --- the book's algorithm, transcribed on plain lists (section 8.3.2) --------------------------------
def reference_random(corpus, batch_size, num_steps):
    start = random.randint(0, num_steps - 1)  # first call: the offset
    corpus = corpus[start:]
    n_windows = (len(corpus) - 1) // num_steps
    firsts = list(range(0, n_windows * num_steps, num_steps))
    random.shuffle(firsts)  # second call: the window order
    out = []
    for b in range(n_windows // batch_size):
        chosen = firsts[b * batch_size : (b + 1) * batch_size]
        out.append(([corpus[p : p + num_steps] for p in chosen], [corpus[p + 1 : p + 1 + num_steps] for p in chosen]))
    return out


def reference_sequential(corpus, batch_size, num_steps):
    start = random.randint(0, num_steps)  # the only call
    usable = (len(corpus) - start - 1) // batch_size * batch_size
    per_row = usable // batch_size
    xs = [corpus[start + r * per_row : start + (r + 1) * per_row] for r in range(batch_size)]
    ys = [corpus[start + 1 + r * per_row : start + 1 + (r + 1) * per_row] for r in range(batch_size)]
    out = []
    for c in range(0, per_row // num_steps * num_steps, num_steps):
        out.append(([row[c : c + num_steps] for row in xs], [row[c : c + num_steps] for row in ys]))
    return out


def as_lists(batches):
    return [(X.tolist(), Y.tolist()) for X, Y in batches]


@pytest.fixture(scope="module")
def book_corpus():
    """``d2l.load_corpus_time_machine(10000)[0]`` (test_corpus checks this equality)."""
    return build_corpus("timemachine", max_tokens=10000).tokens.tolist()


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
@pytest.mark.parametrize("which", ["random", "sequential"])
def test_book_iterators_batch_for_batch(book_corpus, seed, which):
    ours_fn, ref_fn = {
        "random": (book_seq_data_iter_random, reference_random),
        "sequential": (book_seq_data_iter_sequential, reference_sequential),
    }[which]
    random.seed(seed)
    expected = ref_fn(book_corpus, 32, 35)
    state_after = random.getstate()
    random.seed(seed)
    batches = list(ours_fn(torch.tensor(book_corpus), 32, 35))
    assert as_lists(batches) == expected
    assert len(expected) == {"random": 8, "sequential": 8}[which]
    assert all(X.dtype == torch.long and X.shape == (32, 35) for X, _ in batches)
    assert random.getstate() == state_after  # the same calls, so later draws stay in step


@pytest.mark.parametrize("seed", [0, 7])
def test_book_iterators_on_the_books_toy_sequence(seed):
    my_seq = list(range(35))  # section 8.3's example
    for ours_fn, ref_fn in ((book_seq_data_iter_random, reference_random),
                            (book_seq_data_iter_sequential, reference_sequential)):
        random.seed(seed)
        expected = ref_fn(my_seq, 2, 5)
        random.seed(seed)
        assert as_lists(ours_fn(my_seq, 2, 5)) == expected


def test_book_iterators_draw_lazily():
    random.seed(3)
    before = random.getstate()
    it = book_seq_data_iter_random(list(range(35)), 2, 5)
    it2 = book_seq_data_iter_sequential(list(range(35)), 2, 5)
    assert random.getstate() == before  # like the book's generators: nothing drawn before next()
    next(it)
    next(it2)
    assert random.getstate() != before


# --- exact batches on hand-made streams --------------------------------------------------------------
def test_sequential_exact():
    batches = as_lists(seq_data_iter_sequential(torch.arange(20), 2, 3, offset=1))
    # offset 1, 18 usable tokens -> rows 1..9 and 10..18, three windows of 3
    assert batches == [
        ([[1, 2, 3], [10, 11, 12]], [[2, 3, 4], [11, 12, 13]]),
        ([[4, 5, 6], [13, 14, 15]], [[5, 6, 7], [14, 15, 16]]),
        ([[7, 8, 9], [16, 17, 18]], [[8, 9, 10], [17, 18, 19]]),
    ]
    assert as_lists(seq_data_iter_sequential([5, 6, 7], 2, 3, offset=0)) == []


def test_random_exact_windows_in_generator_order():
    g = torch.Generator().manual_seed(5)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5)).tolist()
    batches = as_lists(seq_data_iter_random(torch.arange(20), 2, 3, offset=1, generator=g))
    # offset 1 leaves 19 tokens -> 6 windows starting at 1, 4, ..., 16, dealt out in perm order
    starts = [1 + 3 * p for p in perm]
    assert batches == [
        ([[s, s + 1, s + 2] for s in starts[k : k + 2]], [[s + 1, s + 2, s + 3] for s in starts[k : k + 2]])
        for k in (0, 2, 4)
    ]


# --- BatchLoader ------------------------------------------------------------------------------------
def epoch(loader, e):
    loader.set_epoch(e)
    return as_lists(loader)


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_loader_epochs_are_seeded_by_seed_and_epoch_only(mode):
    tokens = torch.arange(1000)
    loader = BatchLoader(tokens, 4, 10, mode=mode, seed=3)
    assert len(loader) == (1000 - 10) // 40 == 24
    walked = [as_lists(loader) for _ in range(3)]  # a full pass moves on to the next epoch
    assert loader.state_dict() == {"epoch": 3, "batch": 0}
    assert all(len(e) == 24 for e in walked)
    fresh = BatchLoader(tokens, 4, 10, mode=mode, seed=3)
    assert epoch(fresh, 2) == walked[2]  # no need to replay epochs 0 and 1
    assert len({str(e) for e in walked}) == 3
    assert epoch(BatchLoader(tokens, 4, 10, mode=mode, seed=4), 2) != walked[2]


@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_loader_resumes_mid_epoch(mode):
    tokens = torch.arange(700)
    loader = BatchLoader(tokens, 3, 7, mode=mode, seed=11)
    loader.set_epoch(5)
    full = as_lists(loader)
    loader.set_epoch(5)
    it = iter(loader)
    head = [next(it), next(it), next(it)]
    state = loader.state_dict()
    assert state == {"epoch": 5, "batch": 3}
    resumed = BatchLoader(tokens, 3, 7, mode=mode, seed=11)
    resumed.load_state_dict(state)
    assert as_lists(head) + as_lists(resumed) == full
    assert resumed.state_dict() == {"epoch": 6, "batch": 0}
    with pytest.raises(ConfigError, match=r"^batch must be in \[0, 33\] for this loader, got 34$"):
        resumed.load_state_dict({"epoch": 0, "batch": 34})


@pytest.mark.parametrize("mode", ["sequential", "random"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_concatenate_to_the_global_batch(mode, world_size):
    tokens = torch.randint(0, 28, (2000,), generator=torch.Generator().manual_seed(0))
    single = BatchLoader(tokens, 8, 9, mode=mode, seed=1)
    ranks = [BatchLoader(tokens, 8, 9, mode=mode, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for e in (0, 1):
        whole = epoch(single, e)
        parts = [epoch(loader, e) for loader in ranks]
        assert all(len(p) == len(whole) for p in parts)
        for k, (X, Y) in enumerate(whole):
            assert sum((p[k][0] for p in parts), []) == X
            assert sum((p[k][1] for p in parts), []) == Y
            assert len(parts[0][k][0]) == 8 // world_size


# --- partial shuffle (Press 2019) ------------------------------------------------------------------
def test_partial_shuffle_rotates_each_stream_by_its_drawn_shift():
    """Epoch e: the offset, then one shift per stream in [0, L), both from the (seed, e) generator; stream
    i is row i of the unshuffled epoch rotated left by its shift, and the batches are its columns."""
    B, T, n = 4, 10, 1000
    loader = BatchLoader(torch.arange(n), B, T, seed=3, partial_shuffle=True)
    for e in (0, 1, 7):
        g = torch.Generator().manual_seed(_epoch_seed(3, e))
        offset = int(torch.randint(0, T, (1,), generator=g))
        L = (n - offset - 1) // B
        shifts = torch.randint(0, L, (B, 1), generator=g).flatten().tolist()
        rows = [[offset + i * L + (j + shifts[i]) % L for j in range(L)] for i in range(B)]
        expected = [([r[k * T:(k + 1) * T] for r in rows], [[t + 1 for t in r[k * T:(k + 1) * T]] for r in rows])
                    for k in range(len(loader))]
        assert epoch(loader, e) == expected
        assert len(set(shifts)) > 1 and any(shifts)  # not the unshuffled epoch
    plain = BatchLoader(torch.arange(n), B, T, seed=3)
    assert epoch(plain, 1) != epoch(loader, 1)


def test_partial_shuffle_with_variable_windows_keeps_the_lengths_and_rotates_the_streams():
    from deeprnn.regularize import VariableLengthLoader

    n, B = 5000, 4
    plain = VariableLengthLoader(torch.arange(n), B, 20, seed=1)
    shuffled = VariableLengthLoader(torch.arange(n), B, 20, seed=1, partial_shuffle=True)
    for e in (0, 3):
        assert shuffled.window_lengths(e) == plain.window_lengths(e)
        offset, lengths = plain.window_lengths(e)
        L = (n - offset - 1) // B
        shuffled.set_epoch(e)
        batches = list(shuffled)
        assert [x.shape[1] for x, _ in batches] == lengths
        streams = torch.cat([x for x, _ in batches], 1)
        assert torch.equal(torch.cat([y for _, y in batches], 1), streams + 1)
        shifts = []
        for i in range(B):
            s = int(streams[i, 0]) - offset - i * L  # where row i starts inside its stretch of text
            assert 0 <= s < L
            assert streams[i].tolist() == [offset + i * L + (j + s) % L for j in range(L)]
            shifts.append(s)
        assert len(set(shifts)) == B


@pytest.mark.parametrize("world_size", [2, 4])
def test_partial_shuffle_resumes_and_shards_exactly(world_size):
    tokens = torch.randint(0, 28, (2000,), generator=torch.Generator().manual_seed(0))
    single = BatchLoader(tokens, 8, 9, seed=1, partial_shuffle=True)
    ranks = [BatchLoader(tokens, 8, 9, seed=1, rank=r, world_size=world_size, partial_shuffle=True)
             for r in range(world_size)]
    whole = epoch(single, 2)
    parts = [epoch(loader, 2) for loader in ranks]
    for k, (X, Y) in enumerate(whole):
        assert sum((p[k][0] for p in parts), []) == X and sum((p[k][1] for p in parts), []) == Y
    single.set_epoch(2)
    it = iter(single)
    head = [next(it) for _ in range(5)]
    resumed = BatchLoader(tokens, 8, 9, seed=1, partial_shuffle=True)
    resumed.load_state_dict(single.state_dict())
    assert as_lists(head) + as_lists(resumed) == whole


def test_random_windows_are_disjoint_within_an_epoch():
    loader = BatchLoader(torch.arange(1000), 4, 10, mode="random", seed=0)
    for e in range(3):
        positions = [p for X, _ in epoch(loader, e) for row in X for p in row]
        assert len(positions) == len(set(positions)) == 24 * 4 * 10
        for X, Y in epoch(loader, e):
            for row, target in zip(X, Y):
                assert row == list(range(row[0], row[0] + 10)) and target == [p + 1 for p in row]


def test_sequential_streams_continue_across_batches():
    loader = BatchLoader(torch.arange(1000), 4, 10, mode="sequential", seed=0)
    for e in range(3):
        batches = epoch(loader, e)
        for (X0, _), (X1, _) in zip(batches, batches[1:]):
            for i in range(4):
                assert X1[i][0] == X0[i][-1] + 1


def test_too_small_corpus_error():
    msg = ("corpus has 53 tokens but batch_size=5 and num_steps=9 need at least 54 "
           "(batch_size*num_steps + num_steps); use more text or smaller sizes")
    with pytest.raises(CorpusError, match=f"^{re.escape(msg)}$"):
        BatchLoader(torch.arange(53), 5, 9)
    # at the minimum, every offset yields one full batch
    for seed in range(20):
        for mode in ("sequential", "random"):
            loader = BatchLoader(torch.arange(54), 5, 9, mode=mode, seed=seed)
            assert len(loader) == 1 and len(as_lists(loader)) == 1


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"batch_size": 0}, r"^batch_size must be an integer >= 1, got 0$"),
    ({"num_steps": -1}, r"^num_steps must be an integer >= 1, got -1$"),
    ({"mode": "shuffled"}, r"^mode must be one of sequential, random, got 'shuffled'$"),
    ({"world_size": 3}, r"^batch_size must be divisible by world_size=3, got 4$"),
    ({"world_size": 2, "rank": 2}, r"^rank must be in \[0, world_size=2\), got 2$"),
    ({"mode": "random", "partial_shuffle": True},
     r"^partial_shuffle needs mode='sequential' \(random sampling already shuffles its windows\), got 'random'$"),
])
def test_loader_config_errors(kwargs, msg):
    args = {"batch_size": 4, "num_steps": 5, **kwargs}
    with pytest.raises(ConfigError, match=msg):
        BatchLoader(torch.arange(100), **args)


# --- properties ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 9), min_size=2, max_size=120),
    batch_size=st.integers(1, 5),
    num_steps=st.integers(1, 8),
    offset=st.integers(0, 8),
    seed=st.integers(0, 2**31),
)
def test_windows_are_the_source_stream_shifted_by_one(tokens, batch_size, num_steps, offset, seed):
    stream = torch.tensor(tokens)
    positions = torch.arange(len(tokens))
    for name in ("sequential", "random"):
        def run(src, name=name):
            if name == "sequential":
                return list(seq_data_iter_sequential(src, batch_size, num_steps, offset=offset))
            g = torch.Generator().manual_seed(seed)
            return list(seq_data_iter_random(src, batch_size, num_steps, offset=offset, generator=g))
        got, where = run(stream), run(positions)
        assert len(got) == len(where)
        for (X, Y), (P, _) in zip(got, where):
            assert X.shape == Y.shape == (batch_size, num_steps)
            assert torch.equal(P[:, 1:], P[:, :-1] + 1)  # each row is a contiguous window
            assert torch.equal(X, stream[P]) and torch.equal(Y, stream[P + 1])
            assert int(P.min()) >= offset


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(20, 300),
    batch_size=st.integers(1, 4),
    num_steps=st.integers(1, 6),
    seed=st.integers(0, 1000),
    mode=st.sampled_from(["sequential", "random"]),
)
def test_loader_windows_are_the_stream_shifted_by_one(n, batch_size, num_steps, seed, mode):
    assume(n >= batch_size * num_steps + num_steps)  # smaller: refused (test_too_small_corpus_error)
    stream = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(seed))
    got = list(BatchLoader(stream, batch_size, num_steps, mode=mode, seed=seed))
    where = list(BatchLoader(torch.arange(n), batch_size, num_steps, mode=mode, seed=seed))
    assert len(got) == len(where) == (n - num_steps) // (batch_size * num_steps)
    for (X, Y), (P, _) in zip(got, where):
        assert torch.equal(P[:, 1:], P[:, :-1] + 1)
        assert torch.equal(X, stream[P]) and torch.equal(Y, stream[P + 1])


# --- compact streams: a corpus keeps uint8/int16 tokens, every batch is int64 ------------------------
def test_compact_streams_give_the_same_int64_batches():
    from deeprnn.regularize import VariableLengthLoader

    wide = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.uint8, torch.int16, torch.int32):
        narrow = wide.to(dtype)
        runs = [
            lambda s: seq_data_iter_sequential(s, 4, 7, offset=3),
            lambda s: seq_data_iter_random(s, 4, 7, offset=3, generator=torch.Generator().manual_seed(1)),
            lambda s: BatchLoader(s, 4, 7, mode="sequential", seed=2),
            lambda s: BatchLoader(s, 4, 7, mode="random", seed=2, rank=1, world_size=2),
            lambda s: VariableLengthLoader(s, 4, 7, seed=2),
        ]
        for run in runs:
            got, expected = list(run(narrow)), list(run(wide))
            assert len(got) == len(expected) > 0
            for (X, Y), (X0, Y0) in zip(got, expected):
                assert X.dtype == Y.dtype == torch.long
                assert torch.equal(X, X0) and torch.equal(Y, Y0)
        for book in (book_seq_data_iter_random, book_seq_data_iter_sequential):
            random.seed(5)
            got = list(book(narrow, 4, 7))
            random.seed(5)
            assert as_lists(got) == as_lists(book(wide, 4, 7))
            assert all(X.dtype == Y.dtype == torch.long for X, Y in got)
    loader = BatchLoader(wide.to(torch.uint8), 4, 7)
    assert loader.tokens.dtype == torch.uint8  # the stream is not widened whole


def test_corpus_tokens_are_compact_and_batches_int64():
    from deeprnn.models import ModelConfig, build_model
    from deeprnn.train import evaluate_tokens

    corpus = build_corpus("timemachine", max_tokens=2000)
    assert corpus.tokens.dtype == torch.uint8
    X, Y = next(iter(BatchLoader(corpus.tokens, 4, 10)))
    assert X.dtype == Y.dtype == torch.long and X.max() < len(corpus.vocab)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(corpus.vocab), cell="lstm", num_hiddens=8, num_layers=1))
    narrow = evaluate_tokens(model, corpus.tokens, batch_size=4, num_steps=10)
    assert narrow == evaluate_tokens(model, corpus.tokens.long(), batch_size=4, num_steps=10)


# --- epoch seeds and offsets -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sequential", "random"])
def test_epoch_seeds_do_not_collide_like_seed_plus_epoch(mode):
    """(seed, epoch) pairs with equal sums draw different epochs: the seed is not ``seed + epoch``. (A
    sequential epoch is its offset alone, so two unrelated pairs agree one time in T; these three do not.)"""
    tokens = torch.arange(1000)
    for (s1, e1), (s2, e2) in [((3, 3), (4, 2)), ((1, 1), (2, 0)), ((0, 4), (4, 0))]:
        a = epoch(BatchLoader(tokens, 4, 10, mode=mode, seed=s1), e1)
        b = epoch(BatchLoader(tokens, 4, 10, mode=mode, seed=s2), e2)
        assert a != b, ((s1, e1), (s2, e2))


@pytest.mark.parametrize("seed", [0, 5])
def test_random_windows_start_at_the_epochs_offset(seed):
    """In random mode every window of epoch e starts at that epoch's offset plus a multiple of T, the offset
    being the one the sequential loader of the same (seed, e) starts its first stream at; it varies by epoch."""
    T = 10
    rnd = BatchLoader(torch.arange(1000), 4, T, mode="random", seed=seed)
    seq = BatchLoader(torch.arange(1000), 4, T, mode="sequential", seed=seed)
    offsets = []
    for e in range(8):
        offset = epoch(seq, e)[0][0][0][0]  # batch 0, X, row 0, first token: tokens are positions
        assert 0 <= offset < T
        starts = [row[0] for X, _ in epoch(rnd, e) for row in X]
        assert len(starts) == 24 * 4
        assert {s % T for s in starts} == {offset}
        offsets.append(offset)
    assert len(set(offsets)) >= 3, offsets
