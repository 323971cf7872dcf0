"""``deeprnn.d2l``: the book's API for its RNN chapters, checked against the book's algorithms.

The reference implementations here (``book_*``) are written from the book's documented code
(d2l 0.17, sections 8.2-8.5); the book's package itself is not needed. The seed note's snippets
(``../shared/seed/``) run as their author wrote them, changed only in the import line, the file
path / encoding argument of exercise 3 and the epoch counts.
"""

from __future__ import annotations

import collections
import copy
import functools
import hashlib
import json
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from deeprnn import d2l
from deeprnn.errors import CorpusError

REPO = Path(__file__).resolve().parents[1]
FINAL_LINE = re.compile(r"^perplexity \d+\.\d, \d+\.\d tokens/sec on cpu$")
TM_SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"


@pytest.fixture(autouse=True)
def _quiet_and_seeded(monkeypatch, tmp_path):
    """One torch thread (the CI machine is shared: oversubscribed threads crawl), fixed seeds, and
    a scratch working directory for the Animator's PNG."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(threads)


def record_perplexities(monkeypatch) -> list[float]:
    """Spy on ``d2l.train_epoch_ch8`` (``train_ch8`` looks it up at call time): every epoch's perplexity."""
    ppls: list[float] = []
    inner = d2l.train_epoch_ch8

    def spy(*args, **kwargs):
        ppl, speed = inner(*args, **kwargs)
        ppls.append(ppl)
        return ppl, speed

    monkeypatch.setattr(d2l, "train_epoch_ch8", spy)
    return ppls


def check_run(out: str, ppls: list[float], num_epochs: int) -> list[str]:
    """The book's printed lines: one prediction per 10 epochs, then the perplexity line and two
    predictions; the perplexity printed is the last epoch's and it fell during training."""
    lines = out.splitlines()
    assert len(lines) == num_epochs // 10 + 3, out
    assert FINAL_LINE.match(lines[-3]), lines[-3]
    assert lines[-2].startswith("time traveller") and len(lines[-2]) == len("time traveller") + 50
    assert lines[-1].startswith("traveller") and len(lines[-1]) == len("traveller") + 50
    assert len(ppls) == num_epochs
    assert lines[-3].startswith(f"perplexity {ppls[-1]:.1f}, ")
    assert ppls[-1] < ppls[0], ppls
    return lines


# --- the book's data pipeline, as references ---------------------------------------------------------
def book_lines(path, encoding=None):
    with open(path, "r", encoding=encoding) as f:
        lines = f.readlines()
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def book_vocab(tokens):
    counter = collections.Counter(tok for line in tokens for tok in line)
    idx_to_token = ["<unk>"] + [tok for tok, _ in sorted(counter.items(), key=lambda x: x[1], reverse=True)]
    return idx_to_token


def book_seq_data_iter_random(corpus, batch_size, num_steps):
    corpus = corpus[random.randint(0, num_steps - 1):]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    random.shuffle(initial_indices)
    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        starts = initial_indices[i: i + batch_size]
        yield (torch.tensor([corpus[j: j + num_steps] for j in starts]),
               torch.tensor([corpus[j + 1: j + 1 + num_steps] for j in starts]))


def book_seq_data_iter_sequential(corpus, batch_size, num_steps):
    offset = random.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = torch.tensor(corpus[offset: offset + num_tokens]).reshape(batch_size, -1)
    Ys = torch.tensor(corpus[offset + 1: offset + 1 + num_tokens]).reshape(batch_size, -1)
    for i in range(0, Xs.shape[1] // num_steps * num_steps, num_steps):
        yield Xs[:, i: i + num_steps], Ys[:, i: i + num_steps]


@functools.lru_cache(maxsize=1)
def time_machine_corpus() -> list[int]:
    return d2l.load_corpus_time_machine()[0]


def test_time_machine_vocab_and_corpus_equal_the_book(shared_data):
    lines = book_lines(shared_data / "timemachine.txt")
    assert d2l.read_time_machine() == lines
    corpus, vocab = d2l.load_corpus_time_machine()
    assert isinstance(vocab, d2l.Vocab) and len(vocab) == 28
    assert vocab.idx_to_token == book_vocab([list(line) for line in lines])
    assert vocab.idx_to_token[:10] == ["<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h"]
    assert isinstance(corpus, list) and len(corpus) == 170580
    assert corpus == [vocab[ch] for line in lines for ch in line]
    assert corpus[:10] == [3, 9, 2, 1, 3, 5, 13, 2, 1, 13]  # "the time m"
    assert d2l.load_corpus_time_machine(10000)[0] == corpus[:10000]
    train_iter, vocab2 = d2l.load_data_time_machine(32, 35)  # the book's max_tokens=10000 default
    assert train_iter.corpus == corpus[:10000] and vocab2.idx_to_token == vocab.idx_to_token


def test_word_tokens_and_vocab_follow_the_book(capsys):
    lines = d2l.read_time_machine()
    tokens = d2l.tokenize(lines)  # the book's default is 'word'
    assert tokens[0] == ["the", "time", "machine", "by", "h", "g", "wells"]
    vocab = d2l.Vocab(tokens, min_freq=2, reserved_tokens=["<pad>"])
    counts = d2l.count_corpus(tokens)
    expected = ["<unk>", "<pad>"] + [t for t, n in sorted(counts.items(), key=lambda x: x[1], reverse=True) if n >= 2]
    assert vocab.idx_to_token == expected
    assert vocab.token_freqs[:3] == [("the", 2261), ("i", 1267), ("and", 1245)]
    assert vocab[["the", "no-such-word"]] == [2, 0] and vocab.to_tokens([2, 3]) == ["the", "i"]
    assert d2l.tokenize(lines, "sentence") is None
    assert capsys.readouterr().out == "ERROR: unknown token type: sentence\n"


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
@pytest.mark.parametrize("batch_size, num_steps, max_tokens", [(32, 35, -1), (2, 5, 103), (3, 7, 20000)])
def test_iterators_yield_the_books_batches(seed, batch_size, num_steps, max_tokens):
    corpus = time_machine_corpus()[:max_tokens] if max_tokens > 0 else time_machine_corpus()
    for ours, book in ((d2l.seq_data_iter_random, book_seq_data_iter_random),
                       (d2l.seq_data_iter_sequential, book_seq_data_iter_sequential)):
        random.seed(seed)
        expected = list(book(corpus, batch_size, num_steps))
        after_book = random.random()
        random.seed(seed)
        got = list(ours(corpus, batch_size, num_steps))
        assert random.random() == after_book  # the same calls on the random module
        assert len(got) == len(expected) > 0
        for (X, Y), (X_ref, Y_ref) in zip(got, expected):
            assert X.dtype == Y.dtype == torch.int64
            assert torch.equal(X, X_ref) and torch.equal(Y, Y_ref)


def test_seq_data_loader_draws_a_new_offset_each_epoch():
    train_iter, _ = d2l.load_data_time_machine(4, 10, use_random_iter=False, max_tokens=1000)
    random.seed(3)
    first, second = list(train_iter), list(train_iter)
    random.seed(3)
    expected = list(book_seq_data_iter_sequential(train_iter.corpus, 4, 10))
    expected2 = list(book_seq_data_iter_sequential(train_iter.corpus, 4, 10))
    as_lists = lambda batches: [(X.tolist(), Y.tolist()) for X, Y in batches]  # noqa: E731
    assert as_lists(first) == as_lists(expected) and as_lists(second) == as_lists(expected2)
    assert len(first) == len(second) == 24 and as_lists(first) != as_lists(second)  # offsets 3, then 9
    rand_iter, _ = d2l.load_data_time_machine(4, 10, use_random_iter=True, max_tokens=1000)
    assert rand_iter.data_iter_fn is d2l.seq_data_iter_random


# --- download and reading files ------------------------------------------------------------------------
def test_download_serves_the_bundled_time_machine_offline(tmp_path):
    path = d2l.download("time_machine")  # $DEEPRNN_OFFLINE=1 and no ../data here
    assert hashlib.sha1(Path(path).read_bytes()).hexdigest() == TM_SHA1
    assert d2l.DATA_HUB["time_machine"] == (d2l.DATA_URL + "timemachine.txt", TM_SHA1)
    assert d2l.DATA_URL == "http://d2l-data.s3-accelerate.amazonaws.com/"
    # The book's cache is used first when it holds the right file ...
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "timemachine.txt").write_bytes(Path(path).read_bytes())
    assert d2l.download("time_machine", cache_dir=str(cache)) == str(cache / "timemachine.txt")
    # ... and skipped when its checksum is wrong.
    (cache / "timemachine.txt").write_text("not the book")
    assert d2l.download("time_machine", cache_dir=str(cache)) == path


def test_download_local_files_and_failures(monkeypatch, shared_data, tmp_path):
    war = shared_data / "war_of_the_worlds.txt"
    sha1 = hashlib.sha1(war.read_bytes()).hexdigest()
    monkeypatch.setitem(d2l.DATA_HUB, "war", (str(war), sha1))
    assert d2l.download("war") == str(war)
    monkeypatch.setitem(d2l.DATA_HUB, "war", (war.as_uri(), None))
    assert d2l.download("war") == str(war)
    # A named corpus's URL is served from deeprnn's data dir ($DEEPRNN_DATA_DIR in tests).
    monkeypatch.setitem(d2l.DATA_HUB, "war", ("https://www.gutenberg.org/files/36/36-0.txt", None))
    assert Path(d2l.download("war")) == war
    monkeypatch.setitem(d2l.DATA_HUB, "war", (str(war), "0" * 40))
    with pytest.raises(CorpusError, match="does not match the SHA-1"):
        d2l.download("war")
    monkeypatch.setitem(d2l.DATA_HUB, "gone", (d2l.DATA_URL + "no-such-file.txt", None))
    with pytest.raises(CorpusError, match=r"downloads are off.*DATA_HUB\['gone'\]") as err:
        d2l.download("gone", cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(CorpusError, match=r"^'never-registered' is not in d2l\.DATA_HUB; register it first: "
                                          r"d2l\.DATA_HUB\['never-registered'\] = \(url, sha1\)$"):
        d2l.download("never-registered")


def test_read_time_machine_reads_windows_1252(shared_data):
    war = shared_data / "war_of_the_worlds.txt"
    expected = book_lines(war, encoding="cp1252")
    assert d2l.read_time_machine(war) == expected  # detected: the file is not UTF-8
    assert d2l.read_time_machine(str(war), encoding="cp1252") == expected
    with pytest.raises(CorpusError) as err:
        d2l.read_time_machine(war, encoding="utf-8")
    assert str(err.value) == (f"cannot decode {war} as utf-8 (byte 0x91 at offset 805); check the file's encoding and "
                              "pass the right one with the encoding argument")  # not the command line's flag


def test_read_time_machine_errors_name_its_arguments(tmp_path):
    (tmp_path / "nul.bin").write_bytes(b"ab\x00cd" * 10)
    for args, message in [((tmp_path / "nul.bin",), f"{tmp_path / 'nul.bin'} looks binary (it contains NUL "
                                                      "bytes); pass a text file, or its encoding with the encoding "
                                                      "argument if it is UTF-16"),
                          ((tmp_path / "nul.bin", "klingon-8"), "unknown encoding 'klingon-8'; pass a Python codec "
                                                                "name such as utf-8 or cp1252 to the encoding argument"),
                          ((tmp_path,), f"{str(tmp_path)!r} is a directory; read_time_machine reads one text file: "
                                        "pass its path")]:
        with pytest.raises(CorpusError) as err:
            d2l.read_time_machine(*args)
        assert str(err.value) == message


# --- training pieces against the book's formulas ------------------------------------------------------
def book_grad_clipping(params, theta):
    norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


@pytest.mark.parametrize("theta", [0.5, 1.0, 1e3])
@pytest.mark.parametrize("lr, batch_size", [(0.3, 2), (0.1, 3)])
def test_grad_clipping_and_sgd_match_the_book_to_the_bit(theta, lr, batch_size):
    """The same bits as the book's formulas, not merely close: a fused norm (1 ulp off in the scale) and
    ``param += (-lr / batch_size) * grad`` (1 ulp off for lr 0.1) changed the text train_ch8 printed from epoch
    40 of section 8.6 on."""
    torch.manual_seed(0)
    net = d2l.RNNModel(nn.RNN(28, 256), 28)
    ref = d2l.RNNModel(nn.RNN(28, 256), 28)
    ref.load_state_dict(net.state_dict())
    for p, q in zip(net.parameters(), ref.parameters()):
        p.grad = torch.randn_like(p) * 10
        q.grad = p.grad.clone()
    d2l.grad_clipping(net, theta)
    book_grad_clipping(list(ref.parameters()), theta)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    d2l.sgd(net.parameters(), lr, batch_size)
    with torch.no_grad():
        for q in ref.parameters():
            q -= lr * q.grad / batch_size
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)
        assert p.grad.abs().sum() == 0


def _book_loop():
    """The book's training loop as benchmarks/bench_d2l.py writes it (one copy of the reference)."""
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks import bench_d2l

    return bench_d2l


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn, torch's path", "exercise-1 scratch"])
def test_train_epoch_ch8_trains_bit_for_bit_as_the_books_loop(model, monkeypatch):
    """The same weights, to the bit, as the book's loop after 3 epochs (so the same printed lines for the same
    seeds): its clipping, its SGD arithmetic, its state handling. ``RNNModel(nn.RNN)`` on the CPU trains through
    deeprnn's scratch kernel, equal to torch's path only to float rounding (next test); here it is switched off."""
    book = _book_loop()
    corpus, vocab = d2l.load_corpus_time_machine(1500)
    batches = list(book_seq_data_iter_sequential(corpus, 4, 10))
    V, lr = len(vocab), 0.7
    if model == "exercise-1 scratch":
        ours = d2l.RNNModelScratch(V, 16, "cpu", book.get_params_2, book.init_rnn_state_2, book.rnn_2)
        ref = book.scratch_copy(ours)
        ours_step, ref_step = (lambda batch_size: d2l.sgd(ours.params, lr, batch_size),
                               lambda batch_size: book.book_sgd(ref.params, lr, batch_size))
        params = lambda net: net.params  # noqa: E731
    else:
        layer = {"lstm": nn.LSTM(V, 16, 2), "gru": nn.GRU(V, 16, 2), "rnn, torch's path": nn.RNN(V, 16)}[model]
        ours = d2l.RNNModel(layer, V)
        with torch.no_grad():
            for p in ours.parameters():
                p.normal_(0, 0.5)  # gradients whose norm passes θ = 1: the clipping's arithmetic counts
        ref = d2l.RNNModel(copy.deepcopy(layer), V)
        ref.load_state_dict(ours.state_dict())
        ours_step, ref_step = d2l._optimizer(ours, lr), torch.optim.SGD(ref.parameters(), lr)
        params = lambda net: list(net.parameters())  # noqa: E731
        monkeypatch.setattr(d2l, "_scratch_engine", lambda net, device: None)
    loss = nn.CrossEntropyLoss()
    for _ in range(3):
        ppl, _ = d2l.train_epoch_ch8(ours, batches, loss, ours_step, "cpu", False)
        ppl_ref, _ = book.book_train_epoch_ch8(ref, batches, loss, ref_step, "cpu", False)
        assert f"{ppl:.1f}" == f"{ppl_ref:.1f}" and ppl == pytest.approx(ppl_ref, rel=1e-6)
    for p, q in zip(params(ours), params(ref)):
        assert torch.equal(p, q)
    assert d2l.predict_ch8("time traveller", 20, ours, vocab, "cpu") == d2l.predict_ch8("time traveller", 20, ref,
                                                                                         vocab, "cpu")


def book_predict_ch8(prefix, num_preds, net, vocab, device):
    state = net.begin_state(batch_size=1, device=device)
    outputs = [vocab[prefix[0]]]
    for y in prefix[1:]:
        _, state = net(torch.tensor([outputs[-1]], device=device).reshape((1, 1)), state)
        outputs.append(vocab[y])
    for _ in range(num_preds):
        y, state = net(torch.tensor([outputs[-1]], device=device).reshape((1, 1)), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join([vocab.idx_to_token[i] for i in outputs])


def test_predict_ch8_matches_the_book():
    _, vocab = d2l.load_corpus_time_machine(1000)
    net = d2l.RNNModel(nn.LSTM(len(vocab), 16), len(vocab))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.5)  # an untrained net with varied greedy predictions
    text = d2l.predict_ch8("time traveller", 30, net, vocab, torch.device("cpu"))
    assert text == book_predict_ch8("time traveller", 30, net, vocab, torch.device("cpu"))
    assert len(text) == 44 and len(set(text[14:])) > 1


@pytest.mark.parametrize("layer", [lambda: nn.RNN(28, 24, 2), lambda: nn.RNN(28, 24, 1, nonlinearity="relu")])
def test_engine_trains_rnn_models_as_torch_does(monkeypatch, layer):
    """``nn.RNN`` trains through deeprnn's scratch kernel: the same parameters as torch's path."""
    train_iter, vocab = d2l.load_data_time_machine(8, 12, max_tokens=600)
    net = d2l.RNNModel(layer(), len(vocab))
    assert d2l._scratch_engine(net, torch.device("cpu")) is not None
    twin = d2l.RNNModel(layer(), len(vocab))
    twin.load_state_dict(net.state_dict())
    loss = nn.CrossEntropyLoss()
    random.seed(5)
    ppl, _ = d2l.train_epoch_ch8(net, train_iter, loss, torch.optim.SGD(net.parameters(), 1.0), "cpu", False)
    monkeypatch.setattr(d2l, "_scratch_engine", lambda net, device: None)
    random.seed(5)
    ppl_torch, _ = d2l.train_epoch_ch8(twin, train_iter, loss, torch.optim.SGD(twin.parameters(), 1.0), "cpu", False)
    assert ppl == pytest.approx(ppl_torch, rel=1e-4)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_engine_stays_off_where_torch_must_run():
    V = 28
    assert d2l._scratch_engine(d2l.RNNModel(nn.LSTM(V, 8), V), "cpu") is None  # oneDNN is faster
    assert d2l._scratch_engine(d2l.RNNModel(nn.GRU(V, 8), V), "cpu") is None  # torch's is faster
    assert d2l._scratch_engine(d2l.RNNModel(nn.RNN(V, 8, bidirectional=True), V), "cpu") is None
    assert d2l._scratch_engine(d2l.RNNModel(nn.RNN(V, 8, 2, dropout=0.5), V), "cpu") is None
    assert d2l._scratch_engine(d2l.RNNModel(nn.RNN(V, 8), V).double(), "cpu") is None
    assert d2l._scratch_engine(d2l.RNNModel(nn.RNN(V, 8), V), "cuda") is None
    hooked = d2l.RNNModel(nn.RNN(V, 8), V)
    hooked.rnn.register_forward_hook(lambda *args: None)
    assert d2l._scratch_engine(hooked, "cpu") is None
    # a backward hook, or a hook on every module, would not see the scratch engine's calls: torch's path
    backward = d2l.RNNModel(nn.RNN(V, 8), V)
    backward.rnn.register_full_backward_hook(lambda *args: None)
    assert d2l._scratch_engine(backward, "cpu") is None
    plain = d2l.RNNModel(nn.RNN(V, 8), V)
    assert d2l._scratch_engine(plain, "cpu") is not None
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert d2l._scratch_engine(plain, "cpu") is None
    finally:
        handle.remove()
    assert d2l._scratch_engine(plain, "cpu") is not None

    class Custom(d2l.RNNModel):
        def forward(self, inputs, state):
            return super().forward(inputs, state)

    assert d2l._scratch_engine(Custom(nn.RNN(V, 8), V), "cpu") is None


def test_state_is_reinitialised_per_batch_for_random_sampling(capsys):
    train_iter, vocab = d2l.load_data_time_machine(4, 10, use_random_iter=True, max_tokens=500)
    net = d2l.RNNModel(nn.RNN(len(vocab), 8), len(vocab))
    calls = []
    begin = net.begin_state
    net.begin_state = lambda *a, **k: calls.append(k.get("batch_size")) or begin(*a, **k)
    d2l.train_ch8(net, train_iter, vocab, 1.0, 1, d2l.try_gpu(), use_random_iter=True)
    num_batches = (500 - 1) // 10 // 4  # at offset 0; at most one fewer at a later offset
    assert calls.count(4) in (num_batches - 1, num_batches)
    calls.clear()
    train_iter, _ = d2l.load_data_time_machine(4, 10, max_tokens=500)
    d2l.train_ch8(net, train_iter, vocab, 1.0, 1, d2l.try_gpu())
    assert calls.count(4) == 1  # sequential: once per epoch, then carried over (detached)
    capsys.readouterr()


def test_animator_writes_a_png_and_train_ch8_draws_every_10_epochs(capsys, monkeypatch, tmp_path):
    animator = d2l.Animator(xlabel="epoch", ylabel="loss", legend=["a", "b"], xlim=[1, 3], path=tmp_path / "a.png")
    for x in (1, 2, 3):
        animator.add(x, [1.0 / x, 2.0 / x])
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert animator.X == [[1, 2, 3], [1, 2, 3]] and animator.Y[1] == [2.0, 1.0, 2.0 / 3]
    ppls = record_perplexities(monkeypatch)
    train_iter, vocab = d2l.load_data_time_machine(8, 10, max_tokens=1000)
    net = d2l.RNNModel(nn.GRU(len(vocab), 32), len(vocab))
    d2l.train_ch8(net, train_iter, vocab, 1.0, 20, d2l.try_gpu())
    lines = check_run(capsys.readouterr().out, ppls, 20)
    assert lines[0].startswith("time traveller") and lines[1].startswith("time traveller")
    assert (tmp_path / d2l.Animator.default_path).read_bytes()[:4] == b"\x89PNG"


def test_animator_keeps_a_users_file_and_a_read_only_directory_stops_nothing(tmp_path, monkeypatch):
    """animator.png of the user's own was replaced by every train_ch8 outside Jupyter; now only a PNG an
    Animator wrote is. A figure that cannot be written ended the training with a PermissionError after 10
    epochs; now it is one warning."""
    (tmp_path / "animator.png").write_bytes(b"my own figure")
    first = d2l.Animator()
    first.add(1, [2.0])
    assert first.path == "animator-2.png" and (tmp_path / "animator.png").read_bytes() == b"my own figure"
    again = d2l.Animator()  # its own file from the first: replaced
    assert again.path == "animator-2.png"
    (tmp_path / "animator.png").unlink()
    assert d2l.Animator().path == "animator.png"

    def refuse(*_a, **_k):
        raise PermissionError(1, "Operation not permitted")

    unwritable = d2l.Animator(path=tmp_path / "ro.png")
    monkeypatch.setattr(unwritable.fig, "savefig", refuse)
    with pytest.warns(UserWarning, match=r"^Animator cannot write .*ro\.png \(Operation not permitted\); the plot "
                                         r"is not saved, the training goes on"):
        unwritable.add(1, [2.0])
    unwritable.add(2, [1.0])  # once: no second warning (pytest would fail on an unexpected one below)
    assert unwritable.Y == [[2.0, 1.0]]


def test_the_books_loop_refuses_a_deeprnn_model():
    """train_ch8 with a deeprnn model failed deep inside: "Expected input batch_size (35) to match target
    batch_size (1120)"; predict_ch8 already said what to use instead."""
    from deeprnn.models import ModelConfig, build_model

    model = build_model(ModelConfig(vocab_size=28, cell="lstm", num_hiddens=8))
    train_iter, vocab = d2l.load_data_time_machine(4, 10, max_tokens=500)
    with pytest.raises(TypeError) as err:
        d2l.train_ch8(model, train_iter, vocab, 1.0, 1, "cpu")
    assert str(err.value) == ("train_ch8 takes the book's models (RNNModel, RNNModelScratch); train a deeprnn model "
                              "with deeprnn.train.train(TrainConfig(...)) or `deeprnn train`")


def test_vocab_takes_any_hashable_token_as_the_books_does():
    assert d2l.Vocab([1, 2, 2, 3]).idx_to_token == ["<unk>", 2, 1, 3]
    assert d2l.Vocab([[1, 2], [2]]).idx_to_token == ["<unk>", 2, 1]
    assert d2l.Vocab([None, "a"]).idx_to_token == ["<unk>", None, "a"]
    assert d2l.Vocab(list("abca")).token == "char" and d2l.Vocab([1, 2]).token == "word"


def test_small_helpers():
    assert d2l.try_gpu() == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert d2l.try_gpu(10_000) == torch.device("cpu")
    assert d2l.try_all_gpus()[0].type in ("cpu", "cuda")
    timer = d2l.Timer()
    assert timer.stop() >= 0 and len(timer.times) == 1 and timer.sum() == timer.avg() == timer.cumsum()[-1]
    acc = d2l.Accumulator(2)
    acc.add(1, torch.tensor(2.5))
    acc.add(2, 0.5)
    assert acc[0] == 3.0 and acc[1] == 3.0
    acc.reset()
    assert acc.data == [0.0, 0.0]
    x = d2l.arange(6, dtype=d2l.float32)
    assert d2l.size(x) == 6 and d2l.reshape(x, (2, 3)).shape == (2, 3)
    assert torch.equal(d2l.matmul(d2l.ones(2, 3), d2l.zeros(3, 1)), d2l.zeros(2, 1))
    assert d2l.tensor([1, 2]).dtype == torch.int64 and float(d2l.exp(d2l.tensor(0.0))) == 1.0
    assert d2l.numpy(d2l.reduce_sum(x)) == 15 and int(d2l.argmax(x)) == 5
    assert d2l.astype(x, d2l.int32).dtype == torch.int32 and d2l.transpose(d2l.ones(2, 3)).shape == (3, 2)


# --- the seed note's code (§9.3 and its exercises) ---------------------------------------------------------
# Exercise 1 as the author wrote it, including layer 2's missing H_{t-1} W_hh term: it is their code.
def get_params_2(vocab_size, num_hiddens, device):
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape, device=device) * 0.01

    # 隐藏层参数
    # 第一层
    W_xh = normal((num_inputs, num_hiddens))
    W_hh1 = normal((num_hiddens, num_hiddens))
    b_h1 = torch.zeros(num_hiddens, device=device)
    # 第二层
    W_hh2 = normal((num_hiddens, num_hiddens))
    b_h2 = torch.zeros(num_hiddens, device=device)
    # 输出层参数
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    # 附加梯度
    params = [W_xh, W_hh1, b_h1, W_hh2, b_h2, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_rnn_state_2(batch_size, num_hiddens, device):
    return (torch.zeros((batch_size, num_hiddens), device=device), torch.zeros((batch_size, num_hiddens), device=device),)


def rnn_2(inputs, state, params):
    W_xh, W_hh1, b_h1, W_hh2, b_h2, W_hq, b_q = params
    H1, H2, = state
    outputs = []
    for X in inputs:
        H1 = torch.tanh(torch.mm(X, W_xh) + torch.mm(H1, W_hh1) + b_h1)
        H2 = torch.tanh(torch.mm(H1, W_hh2) + b_h2)
        Y = torch.mm(H2, W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H1, H2,)


def test_seed_concise_lstm_and_gru_swap(capsys, monkeypatch):
    ppls = record_perplexities(monkeypatch)
    batch_size, num_steps = 32, 35
    train_iter, vocab = d2l.load_data_time_machine(batch_size, num_steps)
    vocab_size, num_hiddens, num_layers = len(vocab), 256, 2
    num_inputs = vocab_size
    device = d2l.try_gpu()
    lstm_layer = nn.LSTM(num_inputs, num_hiddens, num_layers)
    model = d2l.RNNModel(lstm_layer, len(vocab))
    model = model.to(device)
    num_epochs, lr = 3, 2  # the seed: 500
    d2l.train_ch8(model, train_iter, vocab, lr*1.0, num_epochs, device)
    check_run(capsys.readouterr().out, ppls, num_epochs)

    # Exercise 2: the GRU swap.
    ppls.clear()
    gru_layer = nn.GRU(num_inputs, num_hiddens, num_layers)
    model = d2l.RNNModel(gru_layer, len(vocab))
    model = model.to(device)
    d2l.train_ch8(model, train_iter, vocab, lr*1.0, num_epochs, device)
    check_run(capsys.readouterr().out, ppls, num_epochs)


def test_seed_exercise_1_two_layer_scratch_rnn(capsys, monkeypatch):
    ppls = record_perplexities(monkeypatch)
    batch_size, num_steps = 32, 35
    train_iter, vocab = d2l.load_data_time_machine(batch_size, num_steps)
    vocab_size, num_hiddens, device = len(vocab), 256, d2l.try_gpu()
    num_inputs = vocab_size
    num_epochs, lr = 4, 1  # the seed: 500
    net = d2l.RNNModelScratch(len(vocab), num_hiddens, device, get_params_2,init_rnn_state_2, rnn_2)
    d2l.train_ch8(net, train_iter, vocab, lr, num_epochs, device)
    check_run(capsys.readouterr().out, ppls, num_epochs)
    assert num_inputs == 28 and len(net.params) == 7


def test_seed_exercise_3_merging_the_war_of_the_worlds(capsys, monkeypatch, shared_data):
    ppls = record_perplexities(monkeypatch)
    num_hiddens, num_layers = 256, 2  # from the section's concise code, above the exercises
    # --- the seed's exercise 3 ---
    import re

    d2l.DATA_HUB['time_machine'] = (d2l.DATA_URL + 'timemachine.txt','090b5e7e70c295757f55df93cb0a180b9691891a')

    text = str(shared_data / 'war_of_the_worlds.txt')  # the seed: '/home/NAS/.../36-0.txt'
    with open(text, 'r', encoding='cp1252') as f1, open(d2l.download('time_machine'), 'r') as f2:
        lines = f1.readlines() + f2.readlines()

    for line in lines:
        re.sub('[^A-Za-z]+', ' ', line).strip().lower()

    def load_corpus(max_tokens=-1):
        tokens = d2l.tokenize(lines, 'char')
        vocab = d2l.Vocab(tokens)
        corpus = [vocab[token] for line in tokens for token in line]
        if max_tokens > 0:
            corpus = corpus[:max_tokens]
        return corpus, vocab

    corpus, vocab = load_corpus()

    class SeqDataLoader:
        def __init__(self, batch_size, num_steps, use_random_iter, max_tokens):
            if use_random_iter:
                self.data_iter_fn = d2l.seq_data_iter_random
            else:
                self.data_iter_fn = d2l.seq_data_iter_sequential
            self.corpus, self.vocab = load_corpus(max_tokens)
            self.batch_size, self.num_steps = batch_size, num_steps

        def __iter__(self):
            return self.data_iter_fn(self.corpus, self.batch_size, self.num_steps)

    def load_data(batch_size, num_steps, use_random_iter=False, max_tokens=10000):
        data_iter = SeqDataLoader(batch_size, num_steps, use_random_iter, max_tokens)
        return data_iter, data_iter.vocab

    batch_size, num_steps = 32, 35
    train_iter, vocab = load_data(batch_size, num_steps)
    vocab_size, num_hiddens, device = len(vocab), 256, d2l.try_gpu()
    num_inputs = vocab_size
    num_epochs, lr = 3, 2  # the seed: 500
    lstm_layer = nn.LSTM(num_inputs, num_hiddens, num_layers)
    model = d2l.RNNModel(lstm_layer, len(vocab))
    model = model.to(device)
    d2l.train_ch8(model, train_iter, vocab, lr, num_epochs, device)
    # --- end of the seed's code ---
    check_run(capsys.readouterr().out, ppls, num_epochs)
    assert len(corpus) == sum(map(len, lines)) and len(vocab) > 28  # raw text: case, punctuation, \n
    assert "\u201c" in vocab.idx_to_token  # the cp1252 smart quotes decoded, not mojibake


# --- the notebook and the quarantine -------------------------------------------------------------------
def test_example_notebook_is_valid_nbformat_4():
    nb = json.loads((REPO / "examples" / "d2l_9_3_deep_rnn.ipynb").read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict)
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code and all(cell["outputs"] == [] and "execution_count" in cell for cell in code)
    sources = ["".join(cell["source"]) for cell in code]
    assert any("from deeprnn import d2l" in s for s in sources)
    assert any("d2l.train_ch8(" in s for s in sources)
    for s in sources:
        compile(s, "<cell>", "exec")


def test_a_name_outside_the_rnn_sections_says_what_is_covered():
    """Section 8.1's ``load_array`` and 9.5-9.8's machine translation are not here; the error says which sections
    are, and stays an AttributeError (``hasattr`` works)."""
    with pytest.raises(AttributeError) as err:
        d2l.load_array
    assert str(err.value) == ("module 'deeprnn.d2l' has no attribute 'load_array': it covers the book's RNN "
                              "language-model sections (8.2-8.6, 9.1-9.4); for the others use the book's own package "
                              "(pip install d2l==0.17.6)")
    assert not hasattr(d2l, "train_seq2seq") and hasattr(d2l, "train_ch8")
    assert not hasattr(d2l, "__wrapped__")


def test_core_never_imports_the_book_api():
    pattern = re.compile(r"^\s*(from\s+deeprnn(\.\w+)*\s+import\s+.*\bd2l\b|import\s+deeprnn\.d2l|from\s+deeprnn\.d2l\b)",
                         re.MULTILINE)
    offenders = [p.name for p in (REPO / "src" / "deeprnn").rglob("*.py")
                 if p.name != "d2l.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
