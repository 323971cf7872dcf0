"""The book's API for its RNN chapters, on deeprnn: ``from deeprnn import d2l``.

*Dive into Deep Learning* (d2l 0.17.x, Chinese edition 2.0.0) code written against
``from d2l import torch as d2l`` runs unchanged with this module: the same names, signatures,
defaults (``load_data_time_machine(..., max_tokens=10000)``), the same batches for the same
``random.seed`` and the same printed lines (``perplexity 1.0, 27727.4 tokens/sec on cpu``). What
differs is underneath: the data comes from the bundled, checksum-verified Time Machine (no network
needed), text files in Windows-1252 are read, and ``train_ch8`` runs the book's algorithm (SGD,
clipping at θ = 1, state re-initialised or detached, a perplexity print every 10 epochs) with less
Python overhead, giving the same weights to the bit as the book's loop for the same seeds; except
for ``RNNModel`` wrapping ``nn.RNN`` on the CPU, which trains through deeprnn's scratch kernel (a
hand-written backward sweep, which outruns torch's per-step autograd there), equal to torch's path
only to float rounding.

Covered: the names the RNN sections use (8.2-8.6, 9.1-9.4). Others of the book's package (8.1's
``load_array``, 9.5-9.8's machine translation) raise an AttributeError that says so.

Quarantine: this module imports the core; the core never imports it. Names follow the book, so
some shadow what a reader might expect from Python (``tensor``, ``size``, ``reshape``, ...).
Section numbers below are the book's (Chinese edition 2.0.0 / d2l 0.17).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import os
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deeprnn import batching, corpus
from deeprnn import vocab as _vocab
from deeprnn.errors import CorpusError
from deeprnn.models import LanguageModel, ModelConfig, ScratchModel, detach_state
from deeprnn.models.convert import state_dict_to_scratch

# --- plotting (sections 2.4 and 3.6) ---------------------------------------------------------------


def __getattr__(name: str):
    """``d2l.plt`` is ``matplotlib.pyplot``, imported on first use (it picks a GUI backend). Another name
    of the book's package is an AttributeError that says what this module covers."""
    if name == "plt":
        from matplotlib import pyplot

        return pyplot
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}: it covers the book's RNN language-model "
                         "sections (8.2-8.6, 9.1-9.4); for the others use the book's own package "
                         "(pip install d2l==0.17.6)")


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython is then already imported; we never import it)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    if shell is None:
        return False
    return type(shell).__name__ == "ZMQInteractiveShell" or "IPKernelApp" in getattr(shell, "config", {})


def use_svg_display():
    """Use the svg format to display a plot in Jupyter (section 2.4); a no-op outside Jupyter."""
    if not _in_notebook():
        return
    try:
        from matplotlib_inline import backend_inline

        backend_inline.set_matplotlib_formats("svg")
    except ImportError:  # older IPython without matplotlib-inline
        from IPython.display import set_matplotlib_formats

        set_matplotlib_formats("svg")


def set_figsize(figsize=(3.5, 2.5)):
    """Set the default figure size for matplotlib (section 2.4)."""
    import matplotlib

    use_svg_display()
    matplotlib.rcParams["figure.figsize"] = figsize


def set_axes(axes, xlabel, ylabel, xlim, ylim, xscale, yscale, legend):
    """Set labels, limits, scales, legend and grid of matplotlib axes (section 2.4)."""
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_xscale(xscale)
    axes.set_yscale(yscale)
    axes.set_xlim(xlim)
    axes.set_ylim(ylim)
    if legend:
        axes.legend(legend)
    axes.grid()


def plot(X, Y=None, xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None, xscale="linear",
         yscale="linear", fmts=("-", "m--", "g-.", "r:"), figsize=(3.5, 2.5), axes=None):
    """Plot one or several curves on pyplot's current axes or ``axes`` (section 2.4)."""
    if legend is None:
        legend = []
    set_figsize(figsize)
    if axes is None:
        from matplotlib import pyplot

        axes = pyplot.gca()

    def has_one_axis(X):  # a tensor/array with one axis, or a flat list
        return (hasattr(X, "ndim") and X.ndim == 1) or (isinstance(X, list) and not hasattr(X[0], "__len__"))

    if has_one_axis(X):
        X = [X]
    if Y is None:
        X, Y = [[]] * len(X), X
    elif has_one_axis(Y):
        Y = [Y]
    if len(X) != len(Y):
        X = X * len(Y)
    axes.cla()
    for x, y, fmt in zip(X, Y, fmts):
        if len(x):
            axes.plot(x, y, fmt)
        else:
            axes.plot(y, fmt)
    set_axes(axes, xlabel, ylabel, xlim, ylim, xscale, yscale, legend)


def _own_or_free(path: str, mark: str) -> str:
    """``path`` if it is free or a PNG an Animator wrote (``mark`` in it), else the first ``stem-N.png`` that is."""
    stem, ext = os.path.splitext(path)
    for n in range(1, 1000):
        candidate = path if n == 1 else f"{stem}-{n}{ext}"
        try:
            with open(candidate, "rb") as f:
                head = f.read(4096)  # the Software text chunk comes before the image data
        except FileNotFoundError:
            return candidate
        except OSError:
            continue
        if head.startswith(b"\x89PNG") and mark.encode() in head:
            return candidate
    return path


class Animator:
    """Plot data points as they arrive (section 3.6).

    In Jupyter the figure is redrawn in place in the cell's output, as in the book. Anywhere else
    (a script, a test, a machine without a display) each ``add`` writes the figure to the PNG file
    ``path`` instead (default ``Animator.default_path``, ``animator.png`` in the working directory);
    nothing is printed, so the book's printed lines stay exactly as they are. The default file is
    replaced only when an Animator wrote it (its PNG says so): a file of the user's by that name is
    kept, and the figure goes to ``animator-2.png`` (and so on). A figure that cannot be written (a
    read-only directory) is a warning, once; the training it plots goes on.
    """

    default_path = "animator.png"
    _MARK = "deeprnn.d2l.Animator"  # in the PNG's Software field: the files an Animator may replace

    def __init__(self, xlabel=None, ylabel=None, legend=None, xlim=None, ylim=None, xscale="linear",
                 yscale="linear", fmts=("-", "m--", "g-.", "r:"), nrows=1, ncols=1, figsize=(3.5, 2.5),
                 *, path=None):
        if legend is None:
            legend = []
        self.live = _in_notebook()
        if self.live:
            from matplotlib import pyplot

            use_svg_display()
            self.fig, self.axes = pyplot.subplots(nrows, ncols, figsize=figsize)
        else:
            # A bare Figure: no pyplot, no GUI backend, no figure left open per training run.
            from matplotlib.figure import Figure

            self.fig = Figure(figsize=figsize)
            self.axes = self.fig.subplots(nrows, ncols)
        if nrows * ncols == 1:
            self.axes = [self.axes]
        self.path = path if path is not None or self.live else _own_or_free(self.default_path, self._MARK)
        self._save_failed = False
        self._axes_config = (xlabel, ylabel, xlim, ylim, xscale, yscale, legend)
        self.X, self.Y, self.fmts = None, None, fmts

    def config_axes(self):
        set_axes(self.axes[0], *self._axes_config)

    def add(self, x, y):
        """Append one point per curve (``y`` a number or one number per curve) and redraw."""
        if not hasattr(y, "__len__"):
            y = [y]
        n = len(y)
        if not hasattr(x, "__len__"):
            x = [x] * n
        if not self.X:
            self.X = [[] for _ in range(n)]
        if not self.Y:
            self.Y = [[] for _ in range(n)]
        for i, (a, b) in enumerate(zip(x, y)):
            if a is not None and b is not None:
                self.X[i].append(a)
                self.Y[i].append(b)
        self.axes[0].cla()
        for x, y, fmt in zip(self.X, self.Y, self.fmts):
            self.axes[0].plot(x, y, fmt)
        self.config_axes()
        if self.live:
            from IPython import display

            display.display(self.fig)
            display.clear_output(wait=True)
        if self.path is not None and not self._save_failed:
            try:
                self.fig.savefig(self.path, metadata={"Software": self._MARK})
            except OSError as e:
                self._save_failed = True
                import warnings

                warnings.warn(f"Animator cannot write {self.path} ({e.strerror or e}); the plot is not saved, the "
                              "training goes on (pass Animator(path=...) a writable file)", stacklevel=2)


class Timer:
    """Record multiple running times (section 3.1), in seconds."""

    def __init__(self):
        self.times = []
        self.start()

    def start(self):
        """Start the timer."""
        self.tik = time.perf_counter()

    def stop(self):
        """Stop the timer, record the time since ``start`` and return it."""
        self.times.append(time.perf_counter() - self.tik)
        return self.times[-1]

    def avg(self):
        """Return the average time."""
        return sum(self.times) / len(self.times)

    def sum(self):
        """Return the sum of times."""
        return sum(self.times)

    def cumsum(self):
        """Return the accumulated times."""
        return np.array(self.times).cumsum().tolist()


class Accumulator:
    """For accumulating sums over ``n`` variables (section 3.6)."""

    def __init__(self, n):
        self.data = [0.0] * n

    def add(self, *args):
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def reset(self):
        self.data = [0.0] * len(self.data)

    def __getitem__(self, idx):
        return self.data[idx]


def sgd(params, lr, batch_size):
    """Minibatch stochastic gradient descent (section 3.2): ``param -= lr * grad / batch_size``,
    then the gradients are zeroed. The book's arithmetic in the book's order (``lr * grad``, then
    ``/ batch_size``), so the result is the same to the bit, as fused updates over all parameters
    instead of a Python loop."""
    with torch.no_grad():
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
        steps = torch._foreach_mul(grads, lr)
        torch._foreach_div_(steps, batch_size)
        torch._foreach_sub_(params, steps)
        torch._foreach_zero_(grads)


# --- devices (section 5.6) -------------------------------------------------------------------------


def try_gpu(i=0):
    """Return gpu(i) if it exists, otherwise cpu() (section 5.6)."""
    if torch.cuda.device_count() >= i + 1:
        return torch.device(f"cuda:{i}")
    return torch.device("cpu")


def try_all_gpus():
    """Return all available GPUs, or ``[cpu()]`` if there is none (section 5.6)."""
    devices = [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return devices if devices else [torch.device("cpu")]


# --- data (sections 4.10, 8.2, 8.3) ----------------------------------------------------------------

DATA_HUB = dict()
DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/"
DATA_HUB["time_machine"] = (DATA_URL + "timemachine.txt", "090b5e7e70c295757f55df93cb0a180b9691891a")



def _sha1_ok(path: Path, sha1_hash: str | None) -> bool:
    if sha1_hash is None:
        return True
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha1.update(chunk)
    return sha1.hexdigest() == sha1_hash


def _local_file(url: str) -> Path | None:
    """The path a DATA_HUB 'URL' names when it is a local file (a path or a ``file://`` URL)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("http", "https", "ftp"):
        return None
    return Path(url).expanduser()


def _known_copies(url: str, basename: str) -> list[Path]:
    """Where deeprnn may already hold this file: the package's bundled copy and the corpus cache
    (``$DEEPRNN_DATA_DIR``, else ``~/.cache/deeprnn``), by the URL's file name or a named corpus's URL."""
    paths = []
    for info in corpus.NAMED_CORPORA.values():
        if info.bundled and info.filename == basename:
            bundled = importlib.resources.files("deeprnn").joinpath("data", info.filename)
            if isinstance(bundled, Path):  # a real file, not inside a zip
                paths.append(bundled)
    cache = corpus.data_dir()
    paths.append(cache / basename)
    paths += [cache / info.filename for info in corpus.NAMED_CORPORA.values() if info.url == url]
    return paths


def download(name, cache_dir=os.path.join("..", "data")):
    """Return the local file name of the ``DATA_HUB`` entry ``name``, downloading it if needed
    (section 4.10).

    ``DATA_HUB[name]`` is ``(url, sha1)``; ``sha1`` may be ``None`` to skip the check. Looked up in
    order: a local path or ``file://`` URL as is; ``cache_dir/<file name>`` (the book's cache);
    deeprnn's bundled copy (The Time Machine) and its corpus cache. A file is used only when its
    SHA-1 matches. Otherwise the file is downloaded into ``cache_dir`` (printing the book's
    ``Downloading ...`` line), verified, then renamed into place.

    Raises :class:`~deeprnn.errors.CorpusError` for an unknown name, a missing or corrupt local file,
    a failed or corrupt download, or a missing file while ``$DEEPRNN_OFFLINE=1``.
    """
    if name not in DATA_HUB:
        raise CorpusError(f"{name!r} is not in d2l.DATA_HUB; register it first: d2l.DATA_HUB[{name!r}] = (url, sha1)")
    url, sha1_hash = DATA_HUB[name]
    local = _local_file(url)
    if local is not None:
        if not local.is_file():
            raise CorpusError(f"DATA_HUB[{name!r}] names {str(local)!r}, which is not a file; check the path")
        if not _sha1_ok(local, sha1_hash):
            raise CorpusError(f"{str(local)!r} does not match the SHA-1 in DATA_HUB[{name!r}]; check the file")
        return str(local)
    basename = url.split("/")[-1]
    fname = os.path.join(cache_dir, basename)
    for path in [Path(fname), *_known_copies(url, basename)]:
        if path.is_file() and _sha1_ok(path, sha1_hash):
            return str(path)
    if corpus.offline():
        raise CorpusError(
            f"{basename} is neither in {cache_dir} nor in deeprnn's data and downloads are off "
            f"($DEEPRNN_OFFLINE=1); save {url} as {fname}, or register a local path in d2l.DATA_HUB[{name!r}]"
        )
    print(f"Downloading {fname} from {url}...")
    checksum = ("sha1", sha1_hash) if sha1_hash is not None else None
    corpus.download(url, Path(fname), checksum, hint=f"save it as {fname} yourself", progress=False)
    return fname


def read_time_machine(path=None, encoding=None):
    """Load The Time Machine as a list of text lines, each reduced to lower-case letters and single
    spaces (section 8.2).

    Beyond the book: ``path`` reads another text file the same way (e.g. The War of the Worlds for
    exercise 8.5.2 / 9.3.3), and the file is decoded as UTF-8, or Windows-1252 when it is not UTF-8,
    unless ``encoding`` names the codec. The same way means every line: a Project Gutenberg file's
    header and licence are read too (the book's copy of The Time Machine has none);
    ``deeprnn.corpus.load_sources`` and ``deeprnn train --corpus FILE`` leave them out. Raises
    :class:`~deeprnn.errors.CorpusError` for a missing, binary or undecodable file, or a directory.
    """
    if path is not None and os.path.isdir(path):
        raise CorpusError(f"{str(path)!r} is a directory; read_time_machine reads one text file: pass its path")
    try:
        text = corpus.read_text(download("time_machine") if path is None else path, encoding)
    except CorpusError as e:  # its fixes name the command line's --encoding; here it is an argument
        raise CorpusError(corpus.respell_encoding_option(str(e), "encoding={!r}", "the encoding argument")) from None
    lines = text.split("\n")
    if lines[-1] == "":  # ``f.readlines()`` has no empty line after the final newline
        lines.pop()
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in lines]


def tokenize(lines, token="word"):
    """Split text lines into word or character tokens (section 8.2).

    As in the book an unknown ``token`` prints ``ERROR: unknown token type: ...`` and returns None.
    """
    if token not in _vocab.TOKEN_KINDS:
        print("ERROR: unknown token type: " + token)
        return None
    return _vocab.tokenize(lines, token)


def count_corpus(tokens):
    """Count token frequencies of a 1-D or 2-D list of tokens (section 8.2)."""
    return _vocab.count_corpus(tokens)


class Vocab(_vocab.Vocab):
    """Vocabulary for text (section 8.2): ``<unk>`` is 0, ``reserved_tokens`` follow, then tokens by
    descending frequency (ties in first-seen order), dropping those rarer than ``min_freq``.

    It is :class:`deeprnn.vocab.Vocab` (same indices as the book), so ``encode``/``decode`` and
    ``save``/``load`` work on it too.
    """

    def __init__(self, tokens=None, min_freq=0, reserved_tokens=None):
        super().__init__(tokens, min_freq, reserved_tokens)


def load_corpus_time_machine(max_tokens=-1):
    """Return the character indices of The Time Machine (a list; only the first ``max_tokens`` when
    positive) and its 28-token vocabulary (section 8.2)."""
    lines = read_time_machine()
    tokens = tokenize(lines, "char")
    vocab = Vocab(tokens)
    # The lines are concatenated without separators, as the book flattens its per-line tokens.
    indices = vocab.encode("".join(lines)).tolist()
    if max_tokens > 0:
        indices = indices[:max_tokens]
    return indices, vocab


def seq_data_iter_random(corpus, batch_size, num_steps):
    """Generate minibatches ``(X, Y)``, each ``(batch_size, num_steps)``, by random sampling
    (section 8.3.4.1): the same ``random.randint`` and ``random.shuffle`` calls as the book, so
    the same ``random.seed`` gives the same batches."""
    return batching.book_seq_data_iter_random(corpus, batch_size, num_steps)


def seq_data_iter_sequential(corpus, batch_size, num_steps):
    """Generate minibatches ``(X, Y)``, each ``(batch_size, num_steps)``, by sequential partitioning
    (section 8.3.4.2): the same ``random.randint`` call as the book, so the same batches."""
    return batching.book_seq_data_iter_sequential(corpus, batch_size, num_steps)


class SeqDataLoader:
    """An iterator to load sequence data (section 8.3): each ``iter()`` is one epoch of batches."""

    def __init__(self, batch_size, num_steps, use_random_iter, max_tokens):
        if use_random_iter:
            self.data_iter_fn = seq_data_iter_random
        else:
            self.data_iter_fn = seq_data_iter_sequential
        self.corpus, self.vocab = load_corpus_time_machine(max_tokens)
        self.batch_size, self.num_steps = batch_size, num_steps

    def __iter__(self):
        return self.data_iter_fn(self.corpus, self.batch_size, self.num_steps)


def load_data_time_machine(batch_size, num_steps, use_random_iter=False, max_tokens=10000):
    """Return the iterator and the vocabulary of The Time Machine (section 8.3); note the book's
    default keeps only the first 10,000 characters."""
    data_iter = SeqDataLoader(batch_size, num_steps, use_random_iter, max_tokens)
    return data_iter, data_iter.vocab


# --- models (sections 8.5 and 8.6) -----------------------------------------------------------------


class RNNModelScratch:
    """An RNN model from user-written functions (section 8.5).

    ``get_params(vocab_size, num_hiddens, device)`` returns the parameter list (``self.params``),
    ``init_state(batch_size, num_hiddens, device)`` the initial state, and
    ``forward_fn(inputs, state, params)`` maps one-hot ``inputs`` (T, B, V) float32 to
    ``(outputs (T*B, V), state)``.
    """

    def __init__(self, vocab_size, num_hiddens, device, get_params, init_state, forward_fn):
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens, device)
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X, state):
        X = F.one_hot(X.T, self.vocab_size).type(torch.float32)  # (T, B, V)
        return self.forward_fn(X, state, self.params)

    def begin_state(self, batch_size, device):
        return self.init_state(batch_size, self.num_hiddens, device)


class RNNModel(nn.Module):
    """An RNN model around a ``torch.nn`` recurrent layer (section 8.6).

    ``forward(inputs (B, T), state)`` returns ``(outputs (T*B, vocab_size), state)``; the output
    layer ``self.linear`` reads the top layer's hidden states (both directions if bidirectional).
    """

    def __init__(self, rnn_layer, vocab_size, **kwargs):
        super().__init__(**kwargs)
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        self.num_directions = 2 if self.rnn.bidirectional else 1
        self.linear = nn.Linear(self.num_hiddens * self.num_directions, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)  # (T, B, V)
        Y, state = self.rnn(X, state)  # (T, B, D*H)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))  # (T*B, V)
        return output, state

    def begin_state(self, device, batch_size=1):
        """Zeros ``(D*L, batch_size, H)``; a ``(h, c)`` pair of them for ``nn.LSTM``."""
        shape = (self.num_directions * self.rnn.num_layers, batch_size, self.num_hiddens)
        if not isinstance(self.rnn, nn.LSTM):
            return torch.zeros(shape, device=device)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)


def _global_module_hooks() -> bool:
    """Whether hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook`` and
    its kin) are set: the scratch engine would call no ``nn.RNN`` for them to see."""
    from torch.nn.modules import module

    return any(getattr(module, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _scratch_engine(net, device):
    """A training forward for ``net`` on deeprnn's scratch kernels, or None where it does not apply.

    On the CPU, ``nn.RNN`` records autograd nodes per time step, while deeprnn's scratch RNN layer
    sweeps a window forward and back by hand (about 10% faster per step, measured). The scratch model
    is evaluated with the ``RNNModel``'s own parameters (``torch.func.functional_call`` on the mapping
    of ``models.convert``), so gradients land on ``net``'s parameters and its training (optimizer,
    clipping) is untouched; the function computed is the same up to float rounding. Only a plain
    ``RNNModel`` qualifies: unidirectional, time-major, with biases, one-hot float32 inputs, no
    dropout in training, no hooks (forward or backward, on its modules or global). ``nn.LSTM`` keeps
    torch's fused oneDNN kernel, and ``nn.GRU`` torch's own path too: both measured faster than the
    scratch layers.
    """
    rnn = getattr(net, "rnn", None)
    if (
        not isinstance(net, RNNModel)
        or type(net).forward is not RNNModel.forward
        or type(rnn) is not nn.RNN
        or torch.device(device).type != "cpu"
        or rnn.bidirectional
        or rnn.batch_first
        or not rnn.bias
        or (rnn.dropout and rnn.training)
        or rnn.input_size != net.vocab_size
        or any(p.dtype != torch.float32 or p.device.type != "cpu" for p in net.parameters())
        or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in net.modules())
        or _global_module_hooks()  # register_module_forward_hook & co. see every module call: torch's path
    ):
        return None
    config = ModelConfig(vocab_size=net.vocab_size, cell=f"rnn_{rnn.nonlinearity}", num_layers=rnn.num_layers,
                         num_hiddens=rnn.hidden_size, impl="scratch", input="one_hot", dropout=0.0)
    with torch.device("meta"):  # a parameter-less shell: drawing no numbers from torch's RNG
        engine = ScratchModel(config)

    def forward(X, state):
        params = {f"rnn.{name}": p for name, p in rnn.named_parameters()}
        params["output.weight"], params["output.bias"] = net.linear.weight, net.linear.bias
        logits, state = torch.func.functional_call(engine, state_dict_to_scratch(params, config), (X, state))
        return logits.reshape(-1, logits.shape[-1]), state  # (T, B, V) -> (T*B, V), as RNNModel

    return forward


# --- training and prediction (section 8.5) ---------------------------------------------------------


def _check_book_model(net, function: str) -> None:
    """A deeprnn model has its own contract ((B, T) in, (T, B, V) logits out, no flattening): the book's loop
    and prediction would fail deep inside with a shape error (a batch size of 35 against 1,120 targets)."""
    if isinstance(net, LanguageModel):
        use = ("generate from a deeprnn model with deeprnn.generate.generate(model, vocab, prefix, num_preds)"
               if function == "predict_ch8" else
               "train a deeprnn model with deeprnn.train.train(TrainConfig(...)) or `deeprnn train`")
        raise TypeError(f"{function} takes the book's models (RNNModel, RNNModelScratch); {use}")


def predict_ch8(prefix, num_preds, net, vocab, device):
    """Generate ``num_preds`` characters after ``prefix`` greedily; the result includes the prefix
    (section 8.5). The prefix warms the state up one token at a time, as in the book."""
    _check_book_model(net, "predict_ch8")
    with torch.no_grad():
        state = net.begin_state(batch_size=1, device=device)
        outputs = [vocab[prefix[0]]]

        def get_input():
            return torch.tensor([outputs[-1]], device=device).reshape((1, 1))

        for y in prefix[1:]:  # warm-up period
            _, state = net(get_input(), state)
            outputs.append(vocab[y])
        for _ in range(num_preds):
            y, state = net(get_input(), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
    return "".join([vocab.idx_to_token[i] for i in outputs])


def _params(net):
    if isinstance(net, nn.Module):
        return [p for p in net.parameters() if p.requires_grad]
    return net.params


def grad_clipping(net, theta):
    """Rescale the gradients so that their global L2 norm is at most ``theta`` (section 8.5):
    when the norm exceeds ``theta`` every gradient is multiplied by ``theta / norm``.

    The norm is summed as the book sums it (``sqrt`` of the sum over parameters of ``sum(grad ** 2)``):
    a fused norm rounds differently, and over a few hundred epochs that changes the text printed."""
    grads = [p.grad for p in _params(net) if p.grad is not None]
    if not grads:
        return
    norm = torch.sqrt(sum(torch.sum(g ** 2) for g in grads))
    if grads[0].device.type == "cpu":
        if norm > theta:
            torch._foreach_mul_(grads, theta / norm)
    else:  # no host sync: a factor of exactly 1 leaves unclipped gradients as they are
        torch._foreach_mul_(grads, torch.clamp(theta / norm, max=1.0))


def _detached(state):
    """The state cut from the graph of the previous window (truncated BPTT); a list stays a list."""
    if isinstance(state, list):
        return [s.detach() for s in state]
    return detach_state(state)


def train_epoch_ch8(net, train_iter, loss, updater, device, use_random_iter):
    """Train ``net`` for one epoch (section 8.5); return ``(perplexity, tokens per second)``.

    The state is initialised for the first batch and, with random sampling, for every batch;
    otherwise it is carried over, detached. Gradients are clipped at θ = 1 before each update;
    ``updater`` is a ``torch.optim.Optimizer`` or a function of ``batch_size`` (called with 1, the
    loss being a mean).
    """
    _check_book_model(net, "train_epoch_ch8")
    state, timer = None, Timer()
    forward = _scratch_engine(net, device) or net
    loss_sum, num_tokens = 0.0, 0
    for X, Y in train_iter:
        if state is None or use_random_iter:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            state = _detached(state)
        y = Y.T.reshape(-1)  # time-major, like the outputs (T*B,)
        X, y = X.to(device), y.to(device)
        y_hat, state = forward(X, state)
        l = loss(y_hat, y.long()).mean()
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            l.backward()
            grad_clipping(net, 1)
            updater.step()
        else:
            l.backward()
            grad_clipping(net, 1)
            updater(batch_size=1)
        loss_sum = loss_sum + l.detach() * y.numel()  # a tensor: no host sync per batch
        num_tokens += y.numel()
    loss_sum = float(loss_sum)
    return math.exp(loss_sum / num_tokens), num_tokens / timer.stop()


def _optimizer(net, lr):
    """SGD over ``net``'s parameters, as one fused update where torch has it for their device."""
    try:
        return torch.optim.SGD(net.parameters(), lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.SGD(net.parameters(), lr)


def train_ch8(net, train_iter, vocab, lr, num_epochs, device, use_random_iter=False):
    """Train a language model with SGD (section 8.5), printing as the book does.

    Every 10 epochs: ``predict('time traveller')`` is printed and the perplexity added to an
    :class:`Animator`. At the end: ``perplexity P, S tokens/sec on DEVICE`` (S from the last epoch)
    and the predictions for ``'time traveller'`` and ``'traveller'``.
    """
    _check_book_model(net, "train_ch8")
    loss = nn.CrossEntropyLoss()
    animator = Animator(xlabel="epoch", ylabel="perplexity", legend=["train"], xlim=[10, num_epochs])
    if isinstance(net, nn.Module):
        updater = _optimizer(net, lr)
    else:
        def updater(batch_size):
            return sgd(net.params, lr, batch_size)

    def predict(prefix):
        return predict_ch8(prefix, 50, net, vocab, device)

    for epoch in range(num_epochs):
        ppl, speed = train_epoch_ch8(net, train_iter, loss, updater, device, use_random_iter)
        if (epoch + 1) % 10 == 0:
            print(predict("time traveller"))
            animator.add(epoch + 1, [ppl])
    print(f"perplexity {ppl:.1f}, {speed:.1f} tokens/sec on {str(device)}")
    print(predict("time traveller"))
    print(predict("traveller"))


# --- tensor aliases the chapters call (the book's config.ini) --------------------------------------

ones = torch.ones
zeros = torch.zeros
tensor = torch.tensor
arange = torch.arange
sin = torch.sin
cos = torch.cos
tanh = torch.tanh
linspace = torch.linspace
exp = torch.exp
log = torch.log
normal = torch.normal
rand = torch.rand
matmul = torch.matmul
int32 = torch.int32
float32 = torch.float32
concat = torch.cat
stack = torch.stack
eye = torch.eye


def numpy(x, *args, **kwargs):
    return x.detach().numpy(*args, **kwargs)


def size(x, *args, **kwargs):
    return x.numel(*args, **kwargs)


def reshape(x, *args, **kwargs):
    return x.reshape(*args, **kwargs)


def to(x, *args, **kwargs):
    return x.to(*args, **kwargs)


def reduce_sum(x, *args, **kwargs):
    return x.sum(*args, **kwargs)


def argmax(x, *args, **kwargs):
    return x.argmax(*args, **kwargs)


def astype(x, *args, **kwargs):
    return x.type(*args, **kwargs)


def transpose(x, *args, **kwargs):
    return x.t(*args, **kwargs)

