"""Text generation from a trained language model: greedy, sampling and beam search.

Greedy decoding is the book's ``predict_ch8`` (d2l section 8.5): warm the state up on the prefix, then
feed back the argmax one token at a time. Sampling adds temperature, top-k and top-p (nucleus) filtering,
a seed through a local ``torch.Generator`` (the global RNG is never touched) and several streams decoded
as one batch. Beam search keeps the ``beam_width`` best continuations by total log-probability.

Every strategy reads the model one token per step, so the per-step cost is what matters. Two steppers
share one interface:

* ``_ModelStepper`` calls ``model(X, state)`` with ``X`` of shape ``(B, 1)``; it works for any model that
  follows the ``LanguageModel`` contract.
* ``_CellStepper`` runs the same recurrence on ``torch.lstm_cell`` / ``gru_cell`` / ``rnn_*_cell`` with the
  weights of a ``ConciseModel`` or ``ScratchModel`` in ``torch.nn`` layout. One C++ call per layer per step
  avoids the module and one-hot overhead of a full forward (about 3x faster for one stream on a CPU,
  see ``benchmarks/bench_generate.py``); the tests check it against ``model.forward``. From
  ``ONEDNN_MIN_STREAMS`` streams on (sampling several, beam search) it writes the cells out with their
  products through oneDNN (``deeprnn.models.onednn``): 64 sampled streams run ~1.3x faster
  (``benchmarks/bench_generate.py``, rows (c) and (c')).

Greedy decoding of one float32 stream on a CPU runs its whole loop in C++ when the compiled kernels load
(``_NativeGreedy``, ``csrc/greedy.cpp``): up to ``torch.get_num_threads()`` threads each read their slice of
every layer's weights at once, and a character costs no Python at all. It computes what
``_CellStepper`` does (same logits to float32 rounding, tested) and is ~5x faster on the book's LSTM.

The prefix warm-up is one forward call over all prefix tokens but the last (the same state as feeding
them one at a time, as the book does); the last prefix token is the first input of the decoding loop.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from deeprnn.errors import ConfigError, DeepRNNError, VocabError
from deeprnn.models import native, onednn
from deeprnn.vocab import EOL, split_words, word_piece

# From this many streams on, a step runs in the compiled row stepper where there is one, else, on a CPU
# with AVX-512, with its products through oneDNN (there, at the book's size, 2.0x MKL's speed at 64
# streams, 1.6x at 4; MKL's matrix-vector product wins for one stream).
ONEDNN_MIN_STREAMS = 4


@functools.cache  # asked at every step of several streams: the CPU does not change
def _onednn_steps() -> bool:
    """Whether several streams' steps without a row stepper go through oneDNN's products: only where the
    CPU has AVX-512. On the AVX2-only AMD EPYC of 2026-11-28, ``torch.*_cell`` (MKL's products) was faster:
    ``python benchmarks/bench_generate.py`` samples 64 streams of the book's model at 0.75x its speed with
    oneDNN's products; an ad-hoc run (not committed) gave 0.46-0.76x for 4-64 one-hot streams and
    0.55-0.93x with an embedding. MKL's AVX-512 path is what it skips on AMD CPUs (``deeprnn.models.onednn``)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")

STRATEGIES = ("greedy", "sample", "beam")
UNK_POLICIES = ("error", "replace")

OnText = Callable[[int, str], object]


class Stopped(Exception):
    """Raised by :func:`generate` when its ``stop`` event is set before the last token (a server's client left)."""


def fresh_seed() -> int:
    """A seed for a sample asked for without one, to be told with it so that it can be drawn again: 53 bits, so
    that a JSON reader that parses numbers as doubles (the playground's JavaScript) shows it exactly."""
    import secrets

    return secrets.randbits(53)


def generate(
    model: nn.Module,
    vocab,
    prefix: str,
    num_preds: int,
    *,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    beam_width: int = 4,
    seed: int | None = None,
    unk: str = "error",
    on_text: OnText | None = None,
    device: torch.device | str | None = None,
    warn_unknown: bool = True,
    stop=None,
    normalization: str | None = None,
) -> list[str]:
    """Continue ``prefix`` by ``num_preds`` tokens; return ``num_samples`` strings that include the prefix.

    ``model`` follows the ``LanguageModel`` contract (``forward(X (B, T), state) -> (logits (T, B, V),
    state)``, ``begin_state(batch_size, device=...)``); ``vocab`` the ``Vocab`` one. Each returned string is
    ``prefix + ''.join(pieces)`` where a piece is a predicted character, or for a word vocabulary the word
    spaced as :func:`deeprnn.vocab.join_words` spaces it (``<eol>`` a line break, no space before ``,``); the
    prefix is kept as the caller wrote it, also with ``unk="replace"``.

    Strategies:

    * ``"greedy"``: argmax at every step, the book's ``predict_ch8``. ``temperature``/``top_k``/``top_p``
      are ignored; ``num_samples`` copies of the one result are returned.
    * ``"sample"``: draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely
      tokens and then to the smallest set whose probability reaches ``top_p``. ``num_samples`` streams
      run as one batch; ``seed`` makes the draws reproducible (``None``: a fresh random seed).
    * ``"beam"``: beam search of width ``beam_width`` scoring a sequence by its total log-probability; returns
      the ``num_samples`` (``<= beam_width``) best beams, best first (fewer only when fewer distinct
      sequences exist, e.g. one for ``num_preds=0``). ``temperature``/``top_k``/``top_p`` are ignored.

    ``on_text(i, piece)`` is called for stream ``i`` as each piece is produced (greedy and sampling); beam
    search revises its beams until the end, so it calls ``on_text`` for each returned beam, in order, once
    the search is done. Prefix tokens not in the vocabulary raise ``VocabError`` listing them
    (``unk="error"``; with the ``normalization`` of the model's training text, a run's
    ``train_config["normalization"]``, the message says what the prefix is after it, when that would do)
    or are fed as ``<unk>`` (``unk="replace"``), with a warning unless ``warn_unknown`` is
    False (a server says which in its answer instead: a warning is process-wide state). ``device`` defaults to the
    model's; it must be where the model's parameters are. ``stop`` (a ``threading.Event``, or anything with
    ``is_set()``) is looked at before every token; once it is set, generation raises :class:`Stopped`: another
    thread ends a long decode (beam search's too) without waiting for it. The model runs in eval mode under
    ``torch.inference_mode()``; each submodule's training flag is restored afterwards. On a CPU, up to
    8 streams run on one intra-op thread (``torch.set_num_threads``, restored afterwards).

    Raises ``ConfigError`` (message starts with the argument's name) for out-of-range arguments and
    ``VocabError`` for prefix tokens outside the vocabulary or a vocabulary of the wrong size.
    """
    _check_args(
        prefix=prefix,
        num_preds=num_preds,
        strategy=strategy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        num_samples=num_samples,
        beam_width=beam_width,
        seed=seed,
        unk=unk,
        on_text=on_text,
        stop=stop,
    )
    if type(model).__module__ == "deeprnn.d2l":  # the book's contract: begin_state(device, batch_size), (T*B, V)
        raise ConfigError(f"model is the book's {type(model).__name__}; generate from it with d2l.predict_ch8(prefix, "
                          "num_preds, net, vocab, device), or pass a deeprnn model (a checkpoint's .model)")
    if not isinstance(model, nn.Module):  # generate(vocab, model, …): the two swapped, or a checkpoint passed whole
        raise ConfigError(f"model must be a torch.nn.Module (a checkpoint's .model), got {type(model).__name__}")
    if not (hasattr(vocab, "token_to_idx") and hasattr(vocab, "idx_to_token")):
        raise ConfigError(f"vocab must be a deeprnn Vocab (a checkpoint's .vocab), got {type(vocab).__name__}")
    ids = encode_prefix(vocab, prefix, unk=unk, warn=warn_unknown, normalization=normalization)
    dev = _resolve_device(model, device)
    _check_vocab_size(getattr(getattr(model, "config", None), "vocab_size", None), vocab)
    pieces = _Pieces(vocab, ids[-1], after_space=prefix[-1:].isspace())

    streams = {"greedy": 1, "sample": num_samples, "beam": beam_width}[strategy]
    threads = torch.get_num_threads()
    with _eval_inference(model), _few_threads(dev, streams):
        stepper = make_stepper(model, dev)
        stepper.warm_up(ids[:-1])
        first = torch.tensor([ids[-1]], dtype=torch.long, device=dev)
        if strategy == "greedy":
            emit = None if on_text is None else _replicated(on_text, pieces.stream(), num_samples)
            decoder = _NativeGreedy.for_stepper(stepper, threads, num_preds)
            if decoder is not None:
                _check_vocab_size(stepper.vocab_size, vocab)
                seq = decoder.decode(ids[-1], num_preds, emit, stop)
            else:
                seq = _greedy(stepper, first, num_preds, vocab, emit, stop)
            text = prefix + pieces.text(seq)
            return [text] * num_samples  # one string: the copies cost no memory
        elif strategy == "sample":
            _check_memory(num_samples, num_preds, model, vocab, dev)
            gen = torch.Generator(device=dev)
            if seed is None:
                gen.seed()  # from the OS, not from the global RNG
            else:
                gen.manual_seed(seed)
            stepper.expand(num_samples)
            emit = None if on_text is None else _streamed(on_text, [pieces.stream() for _ in range(num_samples)])
            seqs = _sample(
                stepper, first.expand(num_samples), num_preds, vocab, emit,
                temperature=temperature, top_k=top_k, top_p=top_p, generator=gen, stop=stop,
            )
        else:
            seqs = _beam(stepper, first, num_preds, vocab, beam_width, stop)[:num_samples]
            if on_text is not None:
                for i, seq in enumerate(seqs):
                    piece = pieces.stream()
                    for t in seq:
                        on_text(i, piece(t))
    return [prefix + pieces.text(seq) for seq in seqs]


# -- memory -------------------------------------------------------------------------------------

# Bytes each sampled token takes at least, per stream: the int64 token where the model runs, and on the host its
# slot in the list of lists returned by .tolist() and its character(s) in the text.
DEVICE_BYTES_PER_TOKEN = 8
HOST_BYTES_PER_TOKEN = 16


def _check_memory(streams: int, num_preds: int, model: nn.Module, vocab, dev: torch.device) -> None:
    """``MemoryError`` before anything is allocated when ``streams`` samples of ``num_preds`` tokens need more
    memory than is free, by a low estimate (the tokens and the text; each stream's state and logits where the
    model runs): a request far too big was ended by the operating system's out-of-memory killer, without a
    word. On a GPU its memory and the host's are checked apart."""
    cfg = getattr(model, "config", None)
    state = 4 * 8 * getattr(cfg, "num_layers", 1) * getattr(cfg, "num_hiddens", 1)  # h, c and the gates' buffers
    on_device = streams * (num_preds * DEVICE_BYTES_PER_TOKEN + state + 4 * 8 * len(vocab))  # logits … cdf
    on_host = streams * num_preds * HOST_BYTES_PER_TOKEN
    needs = [(dev, on_device + on_host)] if dev.type == "cpu" else [(dev, on_device), (torch.device("cpu"), on_host)]
    for where, need in needs:
        free = _free_memory(where)
        if free is not None and need > free:
            raise MemoryError(f"{streams:,} samples of {num_preds:,} tokens need at least {_size(need)}, and "
                              f"{where.type} has {_size(free)} free; ask for fewer samples or tokens")


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _free_memory(dev: torch.device) -> int | None:
    """Bytes ``dev`` can still allocate: on CUDA, the device's free memory and what torch's allocator holds
    unused; on a Linux CPU, MemAvailable and the cgroup's limit less its use (page cache it can drop not
    counted), whichever is lower; None where that is not known."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    if dev.type != "cpu":
        return None
    known = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            known += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    cgroup = "/sys/fs/cgroup/"
    try:
        with open(cgroup + "memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        with open(cgroup + "memory.current", encoding="ascii") as f:
            used = int(f.read())
        with open(cgroup + "memory.stat", encoding="ascii") as f:  # the page cache the kernel reclaims first
            used -= sum(int(line.split()[1]) for line in f if line.split()[0] == "inactive_file")
        if limit != "max":
            known.append(max(0, int(limit) - used))
    except (OSError, ValueError, IndexError):
        pass
    return min(known) if known else None


# -- arguments ----------------------------------------------------------------------------------


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


MAX_BEAM_WIDTH = 1_024  # beams kept at once (serve allows far fewer); sampling's streams are not bounded


def _check_args(*, prefix, num_preds, strategy, temperature, top_k, top_p, num_samples, beam_width,
                seed, unk, on_text, stop) -> None:
    """Raise ``ConfigError`` for the first bad argument, in signature order; messages start with its name."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if not isinstance(prefix, str) or not prefix:  # " " is a character like any other; a word model checks words
        raise ConfigError(f"prefix must be a non-empty string (it seeds the model's state), got {prefix!r}")
    if not _is_int(num_preds):
        raise ConfigError(f"num_preds must be an integer >= 0, got {num_preds!r}")
    if num_preds < 0:
        raise ConfigError(f"num_preds must be >= 0, got {num_preds}")
    if not _is_real(temperature) or not math.isfinite(temperature):
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    if top_k is not None:
        if not _is_int(top_k):
            raise ConfigError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if not _is_real(top_p) or not math.isfinite(top_p):
            raise ConfigError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if not _is_int(num_samples):
        raise ConfigError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
    if not _is_int(beam_width):
        raise ConfigError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    if beam_width < 1:
        raise ConfigError(f"beam_width must be >= 1, got {beam_width}")
    if beam_width > MAX_BEAM_WIDTH:  # 100,000 beams of a word model ran for minutes and took gigabytes, silently
        raise ConfigError(f"beam_width must be <= {MAX_BEAM_WIDTH:,}, got {beam_width:,}")
    if strategy == "beam" and num_samples > beam_width:
        raise ConfigError(
            f"num_samples must be <= beam_width for beam search, got num_samples={num_samples} "
            f"and beam_width={beam_width}; raise beam_width or ask for fewer samples"
        )
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):  # as training's and serve's seeds
        raise ConfigError(f"seed must be an integer in [0, 2**63) or None, got {seed!r}")
    if not isinstance(unk, str) or unk not in UNK_POLICIES:
        raise ConfigError(f"unk must be one of {', '.join(UNK_POLICIES)}; got {unk!r}")
    if on_text is not None and not callable(on_text):
        raise ConfigError(f"on_text must be a callable (stream index, text piece) or None, got {on_text!r}")
    if stop is not None and not callable(getattr(stop, "is_set", None)):
        raise ConfigError(f"stop must be a threading.Event (anything with is_set()) or None, got {stop!r}")


def encode_prefix(vocab, prefix: str, *, unk: str = "error", warn: bool = True,
                  normalization: str | None = None) -> list[int]:
    """Token indices of ``prefix`` (characters, or words for a word vocabulary: :func:`word_tokens`).

    Tokens outside the vocabulary raise ``VocabError`` listing them (``unk="error"``) or become ``<unk>``
    with a ``UserWarning`` (``unk="replace"``). Nothing is normalised: with the book's ``d2l``
    normalisation the vocabulary holds lowercase letters and spaces only, and the message says what the
    prefix is after the model's ``normalization``, when given, or to lowercase it.
    """
    toks = prefix_tokens(vocab, prefix)
    missing = unknown_tokens(vocab, toks)
    if missing:
        if unk == "error":
            raise VocabError(f"{unknown_prefix_message(vocab, missing, prefix, normalization)}; "
                             "use --unk replace to map them to <unk>")
        if not warn:
            return vocab[toks]
        kind = "words" if getattr(vocab, "token", "char") == "word" else "characters"
        listed = ", ".join(repr(t) for t in missing)
        warnings.warn(f"prefix {kind} not in the vocabulary were fed as <unk>: {listed}", UserWarning, stacklevel=3)
    return vocab[toks]


def word_tokens(vocab, text: str) -> list[str]:
    """``text`` cut into words as a word vocabulary's corpus was: punctuation marks are tokens of their own
    (``deeprnn.vocab.split_words``), and a line break is ``<eol>`` where the vocabulary has it (``raw`` and
    ``lower`` text; the ``d2l`` normalisation's letters-only words split the same way, without it)."""
    return split_words(text, eol=EOL in vocab.token_to_idx)


def prefix_tokens(vocab, prefix: str) -> list[str]:
    """The tokens of ``prefix``: its characters, or its words (:func:`word_tokens`) for a word vocabulary (at
    least one: a prefix of spaces seeds a character model, but holds no word)."""
    toks = word_tokens(vocab, prefix) if getattr(vocab, "token", "char") == "word" else list(prefix)
    if not toks:
        raise ConfigError(f"prefix must hold at least one word for a word-level model (it seeds the model's state), "
                          f"got {prefix!r}")
    return toks


def unknown_tokens(vocab, toks: list[str]) -> list[str]:
    """The distinct tokens of ``toks`` outside the vocabulary, in order of first appearance."""
    known = vocab.token_to_idx
    return list(dict.fromkeys(t for t in toks if t not in known))


def unknown_prefix_message(vocab, missing: list[str], prefix: str | None = None,
                           normalization: str | None = None) -> str:
    """``prefix has characters not in the vocabulary: 'T', '!'`` with :func:`unknown_prefix_hint`'s hint."""
    kind = "words" if getattr(vocab, "token", "char") == "word" else "characters"
    return (f"prefix has {kind} not in the vocabulary: {', '.join(repr(t) for t in missing)}"
            f"{unknown_prefix_hint(vocab, missing, prefix, normalization)}")


def unknown_prefix_hint(vocab, missing: list[str], prefix: str | None = None,
                        normalization: str | None = None) -> str:
    """What to pass instead of a prefix with tokens outside ``vocab`` (``missing``), in parentheses: the
    ``prefix`` as the model's text read after its ``normalization`` (a run's ``train_config``), when every
    token of that is known (``'Time Traveller,'`` is ``'time traveller'`` after ``d2l``); else, to lowercase
    it, when that would do; else nothing."""
    word = getattr(vocab, "token", "char") == "word"
    if prefix is not None and normalization is not None:
        from deeprnn.corpus import normalize

        try:
            reads = normalize(prefix, normalization)
        except DeepRNNError:  # a normalisation this version does not know: no hint
            reads = prefix
        if normalization == "d2l":  # its lines are read one after the other: characters joined, words apart
            reads = reads.replace("\n", " " if word else "")
        toks = word_tokens(vocab, reads) if word else list(reads)
        if reads != prefix and toks and not unknown_tokens(vocab, toks):
            return (f" (the model was trained on {normalization!r}-normalised text; normalised so, the prefix is "
                    f"{reads!r}: pass that)")
    if all(t.lower() in vocab.token_to_idx for t in missing):
        return " (lowercased, they are in the vocabulary: lowercase the prefix)"
    return ""


def _check_vocab_size(model_vocab_size: int | None, vocab) -> None:
    if model_vocab_size is not None and model_vocab_size != len(vocab):
        raise VocabError(
            f"the model predicts {model_vocab_size} tokens but the vocabulary has {len(vocab)}; "
            "use the vocabulary saved with the model"
        )


def _resolve_device(model: nn.Module, device) -> torch.device:
    param = next(model.parameters(), None)
    model_dev = param.device if param is not None else torch.device("cpu")
    if device is None:
        return model_dev
    dev = torch.device(device)
    if dev.type == "cpu":
        dev = torch.device("cpu")  # cpu:0 names the same device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {dev} but CUDA is not available; leave device=None to use the model's")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if param is not None and dev != model_dev:
        raise ConfigError(
            f"device is {dev} but the model's parameters are on {model_dev}; "
            "move the model with model.to(device) or leave device=None"
        )
    return dev


@contextlib.contextmanager
def _eval_inference(model: nn.Module):
    """Eval mode under ``torch.inference_mode()``; every submodule's own training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, training in modes:
            m.training = training


# Up to this many streams the per-step products are too small to split across CPU threads: extra threads
# only add synchronisation (measured: no gain on an idle 2-core CPU, 40x slower when the cores are busy).
_SINGLE_THREAD_MAX_STREAMS = 8


@contextlib.contextmanager
def _few_threads(device: torch.device, streams: int):
    """One intra-op thread for small batches on the CPU; the caller's setting is restored after."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or streams > _SINGLE_THREAD_MAX_STREAMS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- steppers: one model step for B streams ---------------------------------------------------


class _ModelStepper:
    """Steps any ``LanguageModel`` through its ``forward``; the state keeps the model's own format."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.state = None

    def warm_up(self, ids: Sequence[int]) -> None:
        """Build the B = 1 state from ``ids`` (may be empty) in one forward call."""
        self.state = self.model.begin_state(1, device=self.device)
        if len(ids):
            X = torch.tensor([list(ids)], dtype=torch.long, device=self.device)  # (1, T)
            _, self.state = self.model(X, self.state)
        self._from_model_state(self.state)

    def _from_model_state(self, state) -> None:
        pass

    def expand(self, batch_size: int) -> None:
        """Copy the B = 1 state to ``batch_size`` streams."""
        self.state = _map_state(self.state, lambda s: s.expand(s.shape[0], batch_size, *s.shape[2:]).contiguous())

    def reorder(self, index: torch.Tensor) -> None:
        """Streams ``index`` (new B,) of the current ones become the new streams (beam search)."""
        self.state = _map_state(self.state, lambda s: s.index_select(1, index))  # (L, B, H)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B,) long -> logits (B, V) of the next token."""
        logits, self.state = self.model(tokens.view(-1, 1), self.state)  # (1, B, V)
        return logits[0]


def _map_state(state, fn):
    return tuple(fn(s) for s in state) if isinstance(state, tuple) else fn(state)


class _CellStepper(_ModelStepper):
    """The model's recurrence on ``torch.*_cell`` with ``torch.nn``-layout weights, state per layer (B, H)."""

    _CELLS = {"lstm": torch.lstm_cell, "gru": torch.gru_cell,
              "rnn_tanh": torch.rnn_tanh_cell, "rnn_relu": torch.rnn_relu_cell}

    def __init__(self, model, device, *, cell, layers, embedding, out_weight, out_bias, residual=False):
        super().__init__(model, device)
        self.cell = cell
        self.cell_fn = self._CELLS[cell]
        self.lstm = cell == "lstm"
        self.residual = residual  # layers 2..L add their input to their output (the state stays the cell's h)
        self.layers = layers  # [(w_ih (G*H, in), w_hh (G*H, H), b_ih or None, b_hh or None)]
        self.embedding = embedding  # (V, in), or None for a one-hot input
        self.out_weight_t = out_weight.t()  # (H, V)
        self.out_bias = out_bias
        self.vocab_size = out_weight.shape[0]
        self.dtype = out_weight.dtype
        self.one_hot = None
        self.rows = None  # the compiled several-stream step (_row_stepper), once asked for; False: none here

    def _from_model_state(self, state) -> None:
        h, c = state if self.lstm else (state, None)
        self.h = [x.contiguous() for x in h.unbind(0)]  # L x (B, H)
        self.c = [x.contiguous() for x in c.unbind(0)] if self.lstm else None

    def expand(self, batch_size: int) -> None:
        grow = lambda x: x.expand(batch_size, -1).contiguous()  # noqa: E731
        self.h = [grow(x) for x in self.h]
        if self.lstm:
            self.c = [grow(x) for x in self.c]

    def reorder(self, index: torch.Tensor) -> None:
        self.h = [x.index_select(0, index) for x in self.h]
        if self.lstm:
            self.c = [x.index_select(0, index) for x in self.c]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        if self.embedding is not None:
            x = self.embedding.index_select(0, tokens)  # (B, in)
        else:
            if self.one_hot is None or self.one_hot.shape[0] != B:
                self.one_hot = torch.zeros(B, self.vocab_size, dtype=self.dtype, device=self.device)
            x = self.one_hot.zero_()
            x.scatter_(1, tokens.view(B, 1), 1.0)  # (B, V), reused buffer
        if B >= ONEDNN_MIN_STREAMS and self._row_stepper():
            return self._step_rows(x)
        if B >= ONEDNN_MIN_STREAMS and _onednn_steps() and onednn.usable(x, self.out_weight_t):
            return self._step_onednn(x)
        for l, weights in enumerate(self.layers):
            if self.lstm:
                self.h[l], self.c[l] = self.cell_fn(x, (self.h[l], self.c[l]), *weights)
            else:
                self.h[l] = self.cell_fn(x, self.h[l], *weights)
            x = self.h[l] + x if self.residual and l > 0 else self.h[l]  # (B, H)
        return torch.addmm(self.out_bias, x, self.out_weight_t)  # (B, V)

    def _row_stepper(self):
        """The C++ several-stream step (``RowStepper`` in ``csrc/windows.cpp``: every layer's weights packed
        once, each thread carrying its share of the streams through all layers in one call), or None: only
        for float32 CPU weights outside autocast, where the extension is built already (sampling never
        waits ~15 s for a build) and has a row product kernel (AVX-512 or AVX2) that is switched on."""
        if self.rows is None:
            self.rows = False
            if (self.device.type == "cpu" and self.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                    and all(w is None or w.dtype == torch.float32 for layer in self.layers for w in layer)
                    and native.ready()):
                ext = native.load()
                if ext is not None and ext.row_products():
                    w_ih, w_hh, b_ih, b_hh = (list(ws) for ws in zip(*self.layers))
                    self.rows = ext.RowStepper(self.cell, w_ih, w_hh, b_ih, b_hh, self.residual,
                                               self.out_weight_t.t(), self.out_bias)
        return self.rows or None

    def _step_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``step`` for several streams through the C++ row stepper, the output layer included."""
        L = len(self.layers)
        out = self.rows.step(x, self.h, self.c if self.lstm else [])
        self.h = list(out[1:L + 1])
        if self.lstm:
            self.c = list(out[L + 1:])
        return out[0]  # (B, V)

    def _step_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """``step`` for several streams: the same cells as ``torch.*_cell``, written out, with their
        products through oneDNN (``deeprnn.models.onednn``), about twice MKL's speed from 4 rows up."""
        for l, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.layers):
            gi, gh = onednn.linear(x, w_ih, b_ih), onednn.linear(self.h[l], w_hh, b_hh)  # (B, G*H) each
            if self.lstm:
                i, f, g, o = (gi + gh).chunk(4, 1)
                self.c[l] = torch.sigmoid(f) * self.c[l] + torch.sigmoid(i) * torch.tanh(g)
                self.h[l] = torch.sigmoid(o) * torch.tanh(self.c[l])
            elif self.cell_fn is torch.gru_cell:
                (xr, xz, xn), (hr, hz, hn) = gi.chunk(3, 1), gh.chunk(3, 1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                self.h[l] = n + z * (self.h[l] - n)  # (1 - z) n + z h
            else:
                pre = gi + gh
                self.h[l] = torch.tanh(pre) if self.cell_fn is torch.rnn_tanh_cell else torch.relu(pre)
            x = self.h[l] + x if self.residual and l > 0 else self.h[l]  # (B, H)
        return onednn.linear(x, self.out_weight_t.t(), self.out_bias)  # (B, V)


class _NativeGreedy:
    """Greedy decoding of one stream by the compiled loop (``csrc/greedy.cpp``), from a ``_CellStepper``'s
    weights and warmed-up state.

    The weights are split into ``slices`` (by units of every layer, and by vocabulary entries), one per
    thread at most. Whether several threads beat one depends on what else runs on the machine: another
    process, or torch's own OpenMP threads, which spin for a few milliseconds after each parallel op
    (right after training, or sampling). The tokens do not depend on the number of threads, so ``decode``
    times a few steps both ways and keeps the faster: at its start, ``REPROBE_EVERY`` tokens after a probe
    that chose all threads, and sooner (``REPROBE_MIN`` tokens, doubling) after one that chose fewer.
    """

    PROBE_STEPS = 48
    REPROBE_MIN = 256
    REPROBE_EVERY = 8192
    CHUNK = 1024  # steps per call without streaming; with it, STREAM_CHUNK
    STREAM_CHUNK = 32
    # At most one slice per SLICE_BYTES of weights and at least MIN_SLICE_UNITS units per slice: smaller
    # slices make a step so short that the barriers cost as much as a thread saves (a rule of thumb; the
    # probes then pick the thread count).
    SLICE_BYTES = 512 * 1024
    MIN_SLICE_UNITS = 16
    # Below this many tokens (~1.5 s in the Python loop) a decode does not compile the kernels (~15 s, once
    # per machine) but uses them only if they are built already: the short samples printed during training
    # never stop it for a build.
    BUILD_MIN_PREDS = 20_000
    # Packing the weights costs about what the Python loop spends on 20 tokens (2 ms for the book's 2 x 256
    # LSTM, 60 ms for a 3 x 1024 one); shorter decodes keep the Python loop.
    MIN_PREDS = 32

    def __init__(self, decoder, slices: int):
        self.decoder, self.slices = decoder, slices
        self.probes: list[dict[int, float]] = []  # seconds per step by workers, for each probe (tests)

    @classmethod
    def for_stepper(cls, stepper, threads: int, num_preds: int) -> _NativeGreedy | None:
        """The decoder for ``stepper``'s model and state, or None where it does not apply: not a
        ``_CellStepper``, not float32 on the CPU, the compiled kernels do not load, or they are not built
        and ``num_preds`` is too short to be worth building them, or shorter than ``MIN_PREDS``."""
        if type(stepper) is not _CellStepper or stepper.device.type != "cpu" or stepper.dtype != torch.float32:
            return None
        weights = [w for layer in stepper.layers for w in layer if w is not None]
        weights += [stepper.out_weight_t] + [w for w in (stepper.out_bias, stepper.embedding) if w is not None]
        if any(w.dtype != torch.float32 or w.device.type != "cpu" for w in weights):
            return None
        if num_preds < cls.MIN_PREDS or (num_preds < cls.BUILD_MIN_PREDS and not native.ready()):
            return None
        module = native.load()
        if module is None or not hasattr(module, "GreedyDecoder"):
            return None
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        hidden = stepper.h[0].shape[-1]
        slices = max(1, min(threads, hidden // cls.MIN_SLICE_UNITS, -(-nbytes // cls.SLICE_BYTES)))
        decoder = module.GreedyDecoder(
            stepper.cell, [w for w, _, _, _ in stepper.layers], [w for _, w, _, _ in stepper.layers],
            [b for _, _, b, _ in stepper.layers], [b for _, _, _, b in stepper.layers], stepper.embedding,
            stepper.out_weight_t.t(), stepper.out_bias, stepper.residual, slices,
        )
        decoder.set_state(torch.stack(stepper.h).view(len(stepper.h), -1),
                          torch.stack(stepper.c).view(len(stepper.c), -1) if stepper.lstm else None)
        return cls(decoder, slices)

    def decode(self, first: int, num_preds: int, emit: Callable[[int], object] | None = None,
               stop=None) -> list[int]:
        """The ``num_preds`` argmax tokens after ``first``; ``emit(token)`` is called as each one comes, and
        ``stop`` (an event) is looked at before each call into the loop (``STREAM_CHUNK`` steps apart)."""
        out: list[int] = []
        workers = self.slices
        next_probe = 0 if self.slices > 1 else math.inf
        backoff = self.REPROBE_MIN

        def run(n: int, w: int) -> float:
            _check_stop(stop, len(out))
            started = time.perf_counter()
            got = self.decoder.run(out[-1] if out else first, n, w)
            seconds = time.perf_counter() - started
            out.extend(got)
            if emit is not None:
                for t in got:
                    emit(t)
            return seconds / n

        while len(out) < num_preds:
            left = num_preds - len(out)
            if len(out) >= next_probe:
                if left < 4 * self.PROBE_STEPS:
                    next_probe = math.inf  # too few tokens left to be worth timing
                    continue
                # All workers first, untimed: it wakes the helpers and warms each one's caches with its slice.
                run(self.PROBE_STEPS, self.slices)
                seconds = {1: run(self.PROBE_STEPS, 1), self.slices: run(self.PROBE_STEPS, self.slices)}
                self.probes.append(seconds)
                workers = min(seconds, key=seconds.get)
                if workers == self.slices:
                    next_probe, backoff = len(out) + self.REPROBE_EVERY, self.REPROBE_MIN
                else:
                    next_probe, backoff = len(out) + backoff, min(2 * backoff, self.REPROBE_EVERY)
                continue
            n = min(left, self.CHUNK if emit is None and stop is None else self.STREAM_CHUNK, next_probe - len(out))
            run(int(n), workers)
        return out


def make_stepper(model: nn.Module, device: torch.device) -> _ModelStepper:
    """The fastest stepper that computes exactly what ``model.forward`` does.

    ``ConciseModel`` and ``ScratchModel`` (except the book's GRU variant and the layer-normalised cells,
    which have no ``torch.nn`` cell) get a ``_CellStepper``; anything else steps through its ``forward``.
    """
    from deeprnn.models import ConciseModel, ScratchModel  # models import nothing from here

    cfg = getattr(model, "config", None)
    embedding = None if getattr(model, "embedding", None) is None else model.embedding.weight
    out = getattr(model, "output", None)
    if type(model) is ConciseModel and isinstance(model.rnn, nn.RNNBase):
        rnn = model.rnn
        if rnn.bidirectional or getattr(rnn, "proj_size", 0) or not rnn.bias:
            return _ModelStepper(model, device)
        layers = [
            tuple(getattr(rnn, f"{name}_l{l}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for l in range(rnn.num_layers)
        ]
    elif (type(model) is ScratchModel and not (cfg.cell == "gru" and cfg.gru_variant == "d2l") and not cfg.layer_norm
          and not cfg.zoneout):  # zoneout's expected update: the model's own step
        layers = []
        for layer in model.layers:
            b_hh = None
            if cfg.cell == "gru":  # torch's GRU keeps b_hn apart: r multiplies it
                b_hh = torch.cat([layer.b_hn.new_zeros(2 * cfg.num_hiddens), layer.b_hn])
            layers.append((layer.W_xh.t(), layer.W_hh.t(), layer.b_h, b_hh))
    else:
        return _ModelStepper(model, device)
    return _CellStepper(model, device, cell=cfg.cell, layers=layers, embedding=embedding,
                        out_weight=out.weight, out_bias=out.bias, residual=cfg.residual)


# -- decoding loops -----------------------------------------------------------------------------


class _Pieces:
    """The text each generated token adds: a character, or a word spaced as :func:`deeprnn.vocab.join_words`
    spaces it (a line break for ``<eol>``, no space before closing punctuation), which depends on the token
    before it, the prefix's last token for the first one. A prefix that ends in a space (``after_space``) has
    spaced the first word already: it comes alone (``"time traveller "`` was followed by ``" the"``)."""

    def __init__(self, vocab, last_prefix_id: int, after_space: bool = False):
        self.tokens = vocab.idx_to_token
        self.word = getattr(vocab, "token", "char") == "word"
        self.last = None if after_space else self.tokens[last_prefix_id]

    def stream(self) -> Callable[[int], str]:
        """``piece(token)`` for one stream, which remembers the stream's previous token."""
        if not self.word:
            return self.tokens.__getitem__
        prev = self.last

        def piece(t: int) -> str:
            nonlocal prev
            word = self.tokens[t]
            out, prev = word_piece(prev, word), word
            return out
        return piece

    def text(self, seq: list[int]) -> str:
        piece = self.stream()
        return "".join(piece(t) for t in seq)


def _replicated(on_text: OnText, piece: Callable[[int], str], n: int):
    """``emit(token)`` for greedy decoding: the one stream's piece, given to all ``n`` requested copies."""
    def emit(token: int) -> None:
        text = piece(token)
        for i in range(n):
            on_text(i, text)
    return emit


def _streamed(on_text: OnText, pieces: list[Callable[[int], str]]):
    """``emit(tokens)`` for sampling: stream ``i``'s piece of its token ``tokens[i]``."""
    def emit(tokens: torch.Tensor) -> None:
        for i, t in enumerate(tokens.tolist()):
            on_text(i, pieces[i](t))
    return emit


def _check_logits(logits: torch.Tensor, vocab) -> None:
    _check_vocab_size(logits.shape[-1], vocab)


def _check_stop(stop, t: int) -> None:
    if stop is not None and stop.is_set():
        raise Stopped(f"generation stopped after {t} tokens")


def _greedy(stepper, first, num_preds, vocab, emit, stop=None) -> list[int]:
    """The argmax path of one stream; ``first`` (1,) is the last prefix token."""
    out = torch.empty(num_preds + 1, 1, dtype=torch.long, device=first.device)  # (steps, B)
    out[0] = first
    for t in range(num_preds):
        _check_stop(stop, t)
        logits = stepper.step(out[t])  # (1, V)
        if t == 0:
            _check_logits(logits, vocab)
        torch.argmax(logits, dim=1, out=out[t + 1])  # no host sync unless streaming
        if emit is not None:
            emit(int(out[t + 1, 0]))
    return out[1:, 0].tolist()


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Scaled logits (B, V) with tokens outside the top-k / top-p sets at ``-inf`` (a new float tensor).

    With a temperature other than 1 each row is first shifted so that its largest logit is 0 (softmax is
    unchanged), and the temperature is taken as at least float32's smallest normal number: a tiny temperature
    then tends to greedy (the most likely tokens, ties shared) instead of overflowing to ``inf`` and a NaN
    distribution that always drew the last token.

    top-p keeps, per row, the most likely tokens until their probability reaches ``top_p`` (always at
    least the most likely one); it applies after top-k, on the renormalised distribution.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    else:
        logits = logits.clone()
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        # Stable: among equal logits the lower index stays first, as argmax picks it.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop = before >= top_p
        drop[:, 0] = False
        logits.scatter_(-1, order, sorted_logits.masked_fill_(drop, -math.inf))
    return logits


def _sample(stepper, first, num_preds, vocab, emit, *, temperature, top_k, top_p, generator, stop=None):
    """``B = len(first)`` streams drawn together; returns each stream's tokens."""
    B, dev, V = first.shape[0], first.device, len(vocab)
    out = torch.empty(num_preds + 1, B, dtype=torch.long, device=dev)  # (steps, B)
    out[0] = first
    u = torch.empty(B, 1, dtype=torch.float64, device=dev)
    draw = torch.empty(B, 1, dtype=torch.long, device=dev)
    for t in range(num_preds):
        _check_stop(stop, t)
        logits = stepper.step(out[t])  # (B, V)
        if t == 0:
            _check_logits(logits, vocab)
        probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
        # Inverse-CDF draw: ~8x cheaper than torch.multinomial on a CPU for (64, 28). right=True never
        # lands on a zero-probability token; the clamp only guards float rounding of u up to the total.
        cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V)
        torch.rand(B, 1, dtype=torch.float64, generator=generator, device=dev, out=u)
        torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True, out=draw)  # (B, 1)
        out[t + 1] = draw.view(B).clamp_(max=V - 1)
        if emit is not None:
            emit(out[t + 1])
    return out[1:].T.tolist()  # (B, num_preds)


def _beam(stepper, first, num_preds, vocab, beam_width, stop=None) -> list[list[int]]:
    """Beam search by total log-probability; beams (best first) of exactly ``num_preds`` tokens."""
    dev = first.device
    scores = torch.zeros(1, device=dev)  # (beams,) log-probability of each beam so far
    seqs = torch.empty(1, 0, dtype=torch.long, device=dev)  # (beams, t)
    tokens = first
    for t in range(num_preds):
        _check_stop(stop, t)
        logits = stepper.step(tokens)  # (beams, V)
        if t == 0:
            _check_logits(logits, vocab)
        V = logits.shape[-1]
        cand = scores[:, None] + torch.log_softmax(logits.float(), dim=-1)  # (beams, V)
        scores, flat = torch.topk(cand.view(-1), min(beam_width, cand.numel()))  # sorted, best first
        parent, tokens = flat // V, flat % V
        seqs = torch.cat([seqs.index_select(0, parent), tokens[:, None]], dim=1)
        if t + 1 < num_preds:
            stepper.reorder(parent)
    return seqs.tolist() if num_preds else [[]]
