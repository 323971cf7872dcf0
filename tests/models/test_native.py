"""The C++ window kernels (``deeprnn.models.native``) equal the Python loops in ``scratch``.

Both sides take the same arguments and return the same lists, so every tensor is compared: the saved
activations and states, the outputs, and the gradients from a random upstream gradient. float64 to
rounding, float32 to ~1e-5; with bf16 products (lp) the two differ only where a last-bit difference in
float32 flips a bf16 rounding, so those compare within bf16 tolerance and, on average, much closer.
Skips only if the extension cannot be built here.
"""

from __future__ import annotations

import itertools
import logging
import warnings

import pytest
import torch
from torch.testing import assert_close

from deeprnn.generate import _CellStepper
from deeprnn.models import ModelConfig, build_model, native
from deeprnn.models import scratch as S

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
SHAPES = [(1, 1, 1), (1, 4, 8), (5, 1, 3), (6, 3, 7), (4, 2, 33), (3, 19, 33)]  # (T, B, H): T=1, B=1, odd H;
# the last: row shares of 9 and 10 rows on 2 threads (a block of 8 and a narrower one), and gate widths
# that end in a partly filled panel of 32 columns.


def _tol(dtype, lp):
    if lp is not None:
        return {"atol": 3e-2, "rtol": 3e-2}
    return {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-5}


def _inputs(cell, T, B, H, dtype, lp, x_lp, seed=0):
    """Arguments of the cell's forward kernel (after xproj: the state(s), W_hh, b_hn / relu, lp)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=dtype) * scale

    G = {"lstm": 4, "gru": 3}.get(cell, 1) * H
    xproj = rand(T, B, G)
    if x_lp:
        xproj = xproj.to(lp)  # a deeper layer's projection under autocast
    W = rand(H, G, scale=H**-0.5)
    h0 = rand(B, H, scale=0.5)
    if cell == "lstm":
        return (xproj, h0, rand(B, H, scale=0.5), W, lp)
    if cell == "gru":
        return (xproj, h0, W, rand(H, scale=0.1), lp)
    return (xproj, h0, W, cell == "rnn_relu", lp)


KERNELS = {  # cell -> (forward name, Python forward, Python backward)
    "lstm": ("lstm", S._lstm_forward, S._lstm_backward),
    "gru": ("gru", S._gru_forward, S._gru_backward),
    "rnn_tanh": ("rnn", S._rnn_forward, S._rnn_backward),
    "rnn_relu": ("rnn", S._rnn_forward, S._rnn_backward),
}


def _backward_args(cell, saved, T, B, H, dtype, lp, x_lp, args, seed=1):
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(T, B, H, generator=gen, dtype=dtype)
    if lp is not None:
        d_out = d_out.to(lp)  # the outputs come in lp, so does their gradient
    d_h = torch.randn(B, H, generator=gen, dtype=dtype)
    if cell == "lstm":
        return (*saved, d_out, d_h, torch.randn(B, H, generator=gen, dtype=dtype), x_lp)
    if cell == "gru":
        return (*saved, d_out, d_h, x_lp)
    return (*saved, d_out, d_h, args[3], x_lp)


def _assert_lists_close(ours, ref, tol, lp):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert_close(a, b, **tol)
        if lp is not None:  # bf16 flips are rare: the mean difference stays far below bf16's resolution
            assert (a.double() - b.double()).abs().mean() <= 2e-3 * b.double().abs().mean() + 1e-6


CASES = [(c, s, d, None, False) for c, s, d in itertools.product(CELLS, SHAPES, [torch.float64, torch.float32])]
CASES += [(c, s, torch.float32, lp, x_lp) for c, s, lp, x_lp in
          itertools.product(CELLS, SHAPES[2:], [torch.bfloat16], [False, True])]
CASES += [(c, SHAPES[3], torch.float32, torch.float16, True) for c in CELLS]


def _skip_without_row_kernel(ext, what: str) -> None:
    """Skip where the extension has no row product kernel (it needs AVX-512, or AVX2 with FMA, and OpenMP)."""
    if not ext.row_kernel_isa():
        pytest.skip(f"the kernels were built without a row product kernel (AVX-512 or AVX2): no {what}")


@pytest.fixture(params=["rows", "packed", "mm"])
def products(ext, request):
    """The three ways the kernels run a window's products: float32 windows split by rows with the
    AVX-512 or AVX2 kernel (other dtypes then take the next way), oneDNN's prepacked linear per step (float32,
    where torch has it) and at::mm per step."""
    mode = request.param
    ext.set_row_products(mode == "rows")
    ext.set_packed_products(mode != "mm")
    if mode == "rows" and not ext.row_products():
        ext.set_row_products(True)
        _skip_without_row_kernel(ext, "row-split path")
    if mode == "packed" and not ext.packed_products():
        ext.set_row_products(True), ext.set_packed_products(True)
        pytest.skip("this torch build has no oneDNN prepacked linear: at::mm is the only path")
    yield mode
    still_packed = ext.packed_products()
    ext.set_row_products(True), ext.set_packed_products(True)
    if mode == "packed":  # a packed call that threw would have switched itself off and tested at::mm twice
        assert still_packed, "the prepacked products failed and fell back to at::mm during the test"


@pytest.mark.parametrize("cell,shape,dtype,lp,x_lp", CASES)
def test_kernels_equal_python_loops(ext, products, cell, shape, dtype, lp, x_lp):
    """Forward and backward kernels return what the Python loops return, tensor for tensor."""
    T, B, H = shape
    name, py_forward, py_backward = KERNELS[cell]
    args = _inputs(cell, T, B, H, dtype, lp, x_lp)
    tol = _tol(dtype, lp)
    saved, ref_saved = getattr(ext, f"{name}_forward")(*args), py_forward(*args)
    _assert_lists_close(saved, ref_saved, tol, lp)
    # Both backward sweeps start from the Python forward's tensors, so only the sweeps differ.
    bargs = _backward_args(cell, ref_saved, T, B, H, dtype, lp, x_lp, args)
    _assert_lists_close(getattr(ext, f"{name}_backward")(*bargs), py_backward(*bargs), tol, lp)


def _zoneout(T, B, H, dtype, kind, seed=3):
    """Zoneout masks (zc, zh): drawn 0/1 as in training, or every unit at a rate as in evaluation."""
    if kind == "rates":
        return torch.full((T, B, H), 0.3, dtype=dtype), torch.full((T, B, H), 0.1, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.rand(T, B, H, generator=gen) < p).to(dtype) for p in (0.5, 0.2))


@pytest.mark.parametrize("kind", ["drawn", "rates"])
@pytest.mark.parametrize("shape,dtype,lp,x_lp", [c[1:] for c in CASES if c[0] == "lstm"])
def test_lstm_zoneout_kernels_equal_python_loops(ext, products, shape, dtype, lp, x_lp, kind):
    """With zoneout masks, the LSTM kernels return what the Python loops return, forward and backward."""
    T, B, H = shape
    args = (*_inputs("lstm", T, B, H, dtype, lp, x_lp), *_zoneout(T, B, H, dtype, kind))
    tol = _tol(dtype, lp)
    saved, ref_saved = ext.lstm_forward(*args), S._lstm_forward(*args)
    _assert_lists_close(saved, ref_saved, tol, lp)
    bargs = (*_backward_args("lstm", ref_saved, T, B, H, dtype, lp, x_lp, args), *args[-2:])
    _assert_lists_close(ext.lstm_backward(*bargs), S._lstm_backward(*bargs), tol, lp)


@pytest.mark.parametrize("kind", ["drawn", "rates"])
def test_lstm_zoneout_gradcheck(ext, kind):
    """The compiled backward sweep with zoneout against finite differences (float64)."""
    T, B, H = 4, 2, 3
    xproj, h0, c0, W, _ = _inputs("lstm", T, B, H, torch.float64, None, False, seed=6)
    zc, zh = _zoneout(T, B, H, torch.float64, kind)
    leaves = [a.detach().clone().requires_grad_() for a in (xproj, h0, c0, W)]
    assert native.kernels_for(xproj, W, None) is ext
    fn = lambda x, h, c, W: S._LSTMWindow.apply(x, h, c, W, None, zc, zh)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(leaves))


def test_zoneout_masks_are_checked(ext):
    xproj, h0, c0, W, _ = _inputs("lstm", 3, 2, 4, torch.float32, None, False)
    zc, zh = _zoneout(3, 2, 4, torch.float32, "drawn")
    with pytest.raises(RuntimeError, match="zoneout needs both masks"):
        ext.lstm_forward(xproj, h0, c0, W, None, zc, None)
    with pytest.raises(RuntimeError, match="contiguous \\(T, B, H\\) tensor in the state's dtype"):
        ext.lstm_forward(xproj, h0, c0, W, None, zc.double(), zh)
    with pytest.raises(RuntimeError, match="contiguous \\(T, B, H\\) tensor in the state's dtype"):
        ext.lstm_forward(xproj, h0, c0, W, None, zc[:2], zh[:2])


@pytest.mark.parametrize("cell", CELLS)
def test_row_split_is_the_same_on_any_number_of_threads(ext, cell):
    """Split by rows, each row's numbers do not depend on how many shares the batch is cut into: forward
    and backward are bit-equal on 1 and 3 threads, except GRU's b_hn gradient, which is summed per share."""
    _skip_without_row_kernel(ext, "row-split path")
    T, B, H = 4, 21, 40
    name, py_forward, _ = KERNELS[cell]
    args = _inputs(cell, T, B, H, torch.float32, None, False)
    bargs = _backward_args(cell, py_forward(*args), T, B, H, torch.float32, None, False, args)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            runs.append((getattr(ext, f"{name}_forward")(*args), getattr(ext, f"{name}_backward")(*bargs)))
    finally:
        torch.set_num_threads(threads)
    (fwd1, bwd1), (fwd3, bwd3) = runs
    for a, b in zip(fwd1, fwd3):
        assert torch.equal(a, b)
    for i, (a, b) in enumerate(zip(bwd1, bwd3)):
        if cell == "gru" and i == 2:
            assert_close(a, b, atol=1e-5, rtol=1e-5)
            assert not torch.equal(a, torch.zeros_like(a))
        else:
            assert torch.equal(a, b)


def test_row_shares_run_on_torch_threads(ext):
    """The row split's ``at::parallel_for`` runs on torch's threads: a header template, it needs the
    extension compiled with OpenMP, and without it ran every share on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert ext.row_share_threads(64) == 2
        assert ext.row_share_threads(1) == 1  # one row: one share
        torch.set_num_threads(1)
        assert ext.row_share_threads(64) == 1
    finally:
        torch.set_num_threads(threads)


def test_backend_line_says_whether_windows_are_split_by_rows(ext):
    """The machine line of every benchmark says which product path the float32 windows took."""
    try:
        ext.set_row_products(False)
        assert native.backend().startswith("C++ window kernels") and "split by rows" not in native.backend()
        ext.set_row_products(True)
        isa = ext.row_kernel_isa()  # empty also where the build fell back to one without OpenMP
        assert isa in ("", "AVX-512" if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else
                       "AVX2" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "")
        assert bool(isa) == ext.row_products()
        assert (f"float32 windows split by rows, {isa} products" in native.backend()) == ext.row_products()
    finally:
        ext.set_row_products(True)


def _window(cell, args):
    if cell == "lstm":
        xproj, h0, c0, W, lp = args
        out, h, c = S._LSTMWindow.apply(xproj, h0, c0, W, lp)
        return out, (h, c), (xproj, h0, c0, W)
    if cell == "gru":
        xproj, h0, W, b_hn, lp = args
        out, h = S._GRUWindow.apply(xproj, h0, W, b_hn, lp)
        return out, (h,), (xproj, h0, W, b_hn)
    xproj, h0, W, relu, lp = args
    out, h = S._RNNWindow.apply(xproj, h0, W, relu, lp)
    return out, (h,), (xproj, h0, W)


def _run_window(cell, args, seed=2):
    """Outputs, final states and the gradients of every differentiable input for a random upstream."""
    args = tuple(a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
                 for a in args)
    out, finals, leaves = _window(cell, args)
    gen = torch.Generator().manual_seed(seed)
    loss = (out.double() * torch.randn(out.shape, generator=gen, dtype=torch.float64)).sum()
    for f in finals:
        loss = loss + (f.double() * torch.randn(f.shape, generator=gen, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, [leaf for leaf in leaves if leaf.requires_grad])
    return [out, *finals, *grads]


@pytest.mark.parametrize("cell,shape,dtype,lp,x_lp", [c for c in CASES if c[1] in (SHAPES[0], SHAPES[3])])
def test_window_functions_native_equals_python(ext, monkeypatch, cell, shape, dtype, lp, x_lp):
    """Through the autograd functions: outputs, final states and all input gradients, native vs Python."""
    T, B, H = shape
    args = _inputs(cell, T, B, H, dtype, lp, x_lp)
    served = _count_native(monkeypatch)
    ours = _run_window(cell, args)
    assert served == [True], "the autograd function did not take the C++ path"
    monkeypatch.setenv(native.ENV, "0")
    ref = _run_window(cell, args)
    assert served == [True, False], "the reference did not take the Python loops"
    _assert_lists_close(ours, ref, _tol(dtype, lp), lp)


def _count_native(monkeypatch) -> list[bool]:
    """Records, for each window forward from now on, whether ``kernels_for`` served the C++ module."""
    served, real = [], native.kernels_for

    def counting(*args):
        module = real(*args)
        served.append(module is not None)
        return module

    monkeypatch.setattr(native, "kernels_for", counting)
    return served


@pytest.mark.parametrize("cell", CELLS)
def test_native_gradcheck(ext, cell):
    """The compiled backward sweeps against finite differences (float64)."""
    args = _inputs(cell, 3, 2, 3, torch.float64, None, False, seed=5)
    leaves = [a.detach().clone().requires_grad_() if torch.is_tensor(a) else a for a in args]
    if cell == "lstm":
        fn = lambda x, h, c, W: S._LSTMWindow.apply(x, h, c, W)  # noqa: E731
        inputs = leaves[:4]
    elif cell == "gru":
        fn = lambda x, h, W, b: S._GRUWindow.apply(x, h, W, b)  # noqa: E731
        inputs = leaves[:4]
    else:
        relu = leaves[3]
        if relu:  # keep pre-activations away from ReLU's kink, where finite differences are wrong
            leaves[0] = (leaves[0].detach() + 0.5 * leaves[0].detach().sign()).requires_grad_()
        fn = lambda x, h, W: S._RNNWindow.apply(x, h, W, relu)  # noqa: E731
        inputs = leaves[:3]
    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("cell", CELLS)
def test_model_under_bf16_autocast_native_equals_python(ext, monkeypatch, cell):
    """A 2-layer scratch model under bf16 autocast (layer 2's projection arrives in bf16): same logits,
    final state and parameter gradients with either kernel."""
    torch.manual_seed(3)
    V, B, T = 9, 3, 6
    model = build_model(ModelConfig(vocab_size=V, cell=cell, num_layers=2, num_hiddens=24, impl="scratch"))
    X, Y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, final = model(X)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, V), Y.T.reshape(-1))
        finals = final if isinstance(final, tuple) else (final,)
        (loss + sum(f.float().square().sum() for f in finals)).backward()
        return [logits.float(), *finals, *(p.grad for p in model.parameters())]

    served = _count_native(monkeypatch)
    ours = run()
    assert served == [True, True], "both layers' windows should take the C++ path"
    monkeypatch.setenv(native.ENV, "0")
    ref = run()
    assert served == [True, True, False, False], "the reference did not take the Python loops"
    for a, b in zip(ours, ref):
        assert_close(a, b, atol=3e-2, rtol=3e-2)
        assert (a - b).abs().mean() <= 2e-3 * b.abs().mean() + 1e-6


def test_disabled_by_environment_uses_python_loops(monkeypatch):
    """DEEPRNN_NATIVE=0: no build, no warning, the Python loops run."""
    monkeypatch.setenv(native.ENV, "0")
    calls = []
    python_forward = S._lstm_forward
    monkeypatch.setattr(S, "_lstm_forward", lambda *a: calls.append(1) or python_forward(*a))
    assert native.load() is None
    assert native.backend().startswith("python window kernels")
    layer = build_model(ModelConfig(vocab_size=5, cell="lstm", num_layers=1, num_hiddens=4,
                                    impl="scratch")).layers[0]
    out, _ = layer(torch.randn(2, 3, 16), (torch.zeros(3, 4), torch.zeros(3, 4)))
    out.sum().backward()
    assert calls == [1] and layer.W_hh.grad is not None


def test_failed_build_falls_back_with_one_warning(monkeypatch):
    """A build that raises (no compiler, no headers, ...) means the Python loops and one warning."""
    from torch.utils import cpp_extension

    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'deeprnn_windows'\ng++: command not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match="using the Python loops .*command not found"):
        assert native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None  # remembered: no second try, no second warning
    assert "build failed" in native.backend()
    layer = build_model(ModelConfig(vocab_size=5, cell="gru", num_layers=1, num_hiddens=4,
                                    impl="scratch")).layers[0]
    out, h = layer(torch.randn(2, 3, 12), torch.zeros(3, 4))
    assert out.shape == (2, 3, 4) and h.shape == (3, 4)


def test_ninja_next_to_python_is_found_without_an_activated_venv(tmp_path, monkeypatch):
    """A venv's bin/deeprnn run without activating the venv: torch looks for ninja on PATH only."""
    venv_bin, elsewhere = tmp_path / "venv-bin", tmp_path / "elsewhere"
    venv_bin.mkdir(), elsewhere.mkdir()
    ninja = venv_bin / "ninja"
    ninja.write_text("#!/bin/sh\necho 1.11.1\n")
    ninja.chmod(0o755)
    monkeypatch.setattr(native.sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(elsewhere))
    native._find_ninja()
    assert native.os.environ["PATH"] == f"{elsewhere}{native.os.pathsep}{venv_bin}"
    native._find_ninja()  # found on PATH now: unchanged
    assert native.os.environ["PATH"] == f"{elsewhere}{native.os.pathsep}{venv_bin}"


def _fresh_load_state(monkeypatch):
    monkeypatch.delenv(native.ENV, raising=False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)


def test_a_build_that_fails_with_openmp_is_retried_without_it(tmp_path, monkeypatch, caplog):
    """A toolchain that cannot link libgomp still gets the C++ kernels, built without OpenMP (and so without
    the row split, which windows.cpp turns off at compile time then); later processes load that build at
    once instead of trying the OpenMP one again."""
    from torch.utils import cpp_extension

    if not native._openmp_flags():
        pytest.skip("torch does not use OpenMP here: the kernels are built without it anyway")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    _fresh_load_state(monkeypatch)
    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        if "-fopenmp" in kwargs["extra_cflags"]:
            raise RuntimeError("ld: cannot find -lgomp")
        (tmp_path / kwargs["name"] / f"{kwargs['name']}.so").touch()  # what a build leaves
        return "module"

    monkeypatch.setattr(cpp_extension, "load", load)
    caplog.set_level(logging.INFO, logger="deeprnn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the second build works
        assert native.load() == "module"
    assert [("-fopenmp" in c["extra_cflags"], c["extra_ldflags"]) for c in calls] == [(True, ["-fopenmp"]),
                                                                                      (False, [])]
    assert calls[1]["name"] == native.build_name([f for f in native._flag_sets()[0] if f != "-fopenmp"]) != calls[0]["name"]
    assert "building the C++ kernels with OpenMP failed; building them without it" in caplog.messages
    # The next process: ready() without compiling, and load() takes the cached build first.
    _fresh_load_state(monkeypatch)
    calls.clear()
    assert native.ready()
    assert native.load() == "module" and [c["name"] for c in calls] == [native.build_name(native._flag_sets()[1])]


def test_failed_build_under_warnings_as_errors_still_falls_back(monkeypatch, caplog):
    """python -W error turns the fallback's warning into an exception: the fallback must survive it."""
    from torch.utils import cpp_extension

    _fresh_load_state(monkeypatch)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: (_ for _ in ()).throw(OSError("no space left")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load() is None
    assert "using the Python loops (OSError: no space left)" in caplog.text


def test_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A lock left by a build that was killed would make torch wait forever; one in use must stay."""
    import os

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    seen = []
    for age, kept in ((native.STALE_LOCK_SECONDS + 60, False), (5, True)):
        _fresh_load_state(monkeypatch)
        flags = native._flag_sets()[0]
        lock = tmp_path / native.build_name(flags) / "lock"
        lock.parent.mkdir(exist_ok=True)
        lock.touch()
        old = lock.stat().st_mtime - age
        os.utime(lock, (old, old))
        monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append(lock.exists()) or "module")
        assert native.load() == "module"
        assert lock.exists() is kept
    assert seen == [False, True]


def test_build_name_separates_torch_versions_vector_levels_flags_and_checkouts(monkeypatch, tmp_path):
    a = native.build_name(["-O3"])
    assert a.startswith("deeprnn_windows_") and a != native.build_name(["-O2"])
    # another checkout (same sources, another folder) gets its own build instead of rebuilding this one
    copy = tmp_path / "csrc"
    copy.mkdir()
    for f in (*native.SOURCES, *native.HEADERS):
        (copy / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(native, "CSRC", copy)
    monkeypatch.setattr(native, "SOURCES", tuple(copy / f.name for f in native.SOURCES))
    monkeypatch.setattr(native, "HEADERS", tuple(copy / f.name for f in native.HEADERS))
    assert native.build_name(["-O3"]) != a
    monkeypatch.undo()
    assert native.build_name(["-O3"]) == a
    monkeypatch.setattr(native.torch, "__version__", "9.9.9+cu999")
    assert "9_9_9_cu999" in native.build_name(["-O3"]) and native.build_name(["-O3"]) != a


def test_a_first_build_is_announced_and_a_cached_one_is_not(tmp_path, monkeypatch, caplog):
    """At a terminal the CLI shows the package's INFO log: one line before a ~15 s build, none for a load."""
    import logging

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: "module")
    caplog.set_level(logging.INFO, logger="deeprnn")
    _fresh_load_state(monkeypatch)
    assert native.load() == "module"
    assert caplog.messages == ["building the scratch layers' C++ kernels for this machine (once, about 15 s)"]
    name = native.build_name(native._flag_sets()[0])
    (tmp_path / name / f"{name}.so").touch()
    caplog.clear()
    _fresh_load_state(monkeypatch)
    assert native.load() == "module" and caplog.messages == []


def test_training_a_scratch_model_loads_the_kernels_before_its_clock_starts(tmp_path, monkeypatch):
    from deeprnn.train import TrainConfig, train

    calls = []
    monkeypatch.setattr(native, "load", lambda: calls.append("load"))
    monkeypatch.setattr(native, "kernels_for", lambda *a: calls.append("window"))  # then the Python loops
    cfg = TrainConfig(impl="scratch", num_layers=1, num_hiddens=8, batch_size=2, num_steps=4, max_tokens=400,
                      max_steps=1, eval_batch_size=2, sample_every=0, precision="fp32", run_dir=str(tmp_path / "r"))
    train(cfg, progress=False, log=lambda *_: None)
    assert calls[:2] == ["load", "window"]  # loaded (built, the first time) before the first window runs


# -- the several-stream step of generation (RowStepper) -----------------------------------------------

_CELL_FNS = _CellStepper._CELLS  # cell -> torch.*_cell


def _stepper_case(cell, B, H, inp, L, V=21, seed=0):
    """Layers of torch.nn-layout weights (layer 2 without b_hh), the output layer, an input and a state."""
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * 0.5  # noqa: E731
    w_ih = [rand(G * H, inp if l == 0 else H) for l in range(L)]
    w_hh = [rand(G * H, H) for _ in range(L)]
    b_ih = [rand(G * H) for _ in range(L)]
    b_hh = [None if l == 1 else rand(G * H) for l in range(L)]
    x = rand(B, inp)
    h = [rand(B, H) for _ in range(L)]
    c = [rand(B, H) for _ in range(L)] if cell == "lstm" else []
    return (w_ih, w_hh, b_ih, b_hh), (rand(V, H), rand(V)), x, h, c


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_row_stepper_equals_torch_cells(ext, cell, residual):
    """One step of B streams through every layer and the output layer equals ``torch.*_cell`` layer by
    layer and ``F.linear`` in float64 (with the residual sums of layers 2..L), to float32 rounding; the
    inputs are left as they were; 1 and 3 threads give the same bits. B = 19: row shares that end in a
    narrower block; H = 33 and V = 21: widths that end in a partly filled panel."""
    _skip_without_row_kernel(ext, "row stepper")
    B, H, inp, L = 19, 33, 10, 3
    layers, (w_out, b_out), x, h, c = _stepper_case(cell, B, H, inp, L)
    before = [t.clone() for t in (x, *h, *c)]
    stepper = ext.RowStepper(cell, *layers, residual, w_out, b_out)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            runs.append(stepper.step(x, h, c))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    out = runs[0]
    assert all(torch.equal(a, b) for a, b in zip(before, (x, *h, *c)))
    xr, hs, cs = x.double(), [], []
    for l, weights in enumerate(zip(*layers)):
        args = [None if w is None else w.double() for w in weights]
        if cell == "lstm":
            hn, cn = _CELL_FNS[cell](xr, (h[l].double(), c[l].double()), *args)
            cs.append(cn)
        else:
            hn = _CELL_FNS[cell](xr, h[l].double(), *args)
        hs.append(hn)
        xr = hn + xr if residual and l > 0 else hn
    assert len(out) == 1 + L + len(cs)
    logits = torch.nn.functional.linear(xr, w_out.double(), b_out.double())
    assert out[0].dtype == torch.float32 and out[0].shape == (B, 21)
    assert_close(out[0].double(), logits, atol=5e-5, rtol=1e-5)
    for got, want in zip(out[1:], [*hs, *cs]):
        assert got.dtype == torch.float32 and got.shape == (B, H)
        assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_row_stepper_refuses_bad_calls(ext):
    """Wrong cells, shapes and dtypes raise torch's RuntimeError with the stepper's own message."""
    _skip_without_row_kernel(ext, "row stepper")
    layers, out, x, h, c = _stepper_case("lstm", 4, 8, 5, 2)
    with pytest.raises(RuntimeError, match="row stepper: unknown cell 'lstmx'"):
        ext.RowStepper("lstmx", *layers, False, *out)
    with pytest.raises(RuntimeError, match=r"layer 1's weights must be float32 CPU \(24, in\) matrices"):
        ext.RowStepper("gru", *layers, False, *out)  # LSTM weights: 4H rows, not 3H
    w_ih, w_hh, b_ih, b_hh = layers
    with pytest.raises(RuntimeError, match="one w_ih, w_hh, b_ih and b_hh per layer"):
        ext.RowStepper("lstm", w_ih, w_hh[:1], b_ih, b_hh, False, *out)
    with pytest.raises(RuntimeError, match="a bias must have 32 values"):
        ext.RowStepper("lstm", w_ih, w_hh, [b_ih[0][:-1], b_ih[1]], b_hh, False, *out)
    with pytest.raises(RuntimeError, match=r"the output weight must be a float32 CPU \(V, 8\) matrix"):
        ext.RowStepper("lstm", *layers, False, out[0][:, :-1], out[1])
    with pytest.raises(RuntimeError, match="a bias must have 21 values"):
        ext.RowStepper("lstm", *layers, False, out[0], out[1][:-1])
    stepper = ext.RowStepper("lstm", *layers, False, *out)
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU \(B, 5\) matrix"):
        stepper.step(x[:, :4], h, c)
    with pytest.raises(RuntimeError, match=r"x must be a float32 CPU \(B, 5\) matrix"):
        stepper.step(x.double(), h, c)
    with pytest.raises(RuntimeError, match="one h per layer, and one c per layer for the LSTM only"):
        stepper.step(x, h, [])
    with pytest.raises(RuntimeError, match=r"each state must be a float32 CPU \(B, H\) matrix"):
        stepper.step(x, [h[0], h[1][:3]], c)
    with pytest.raises(RuntimeError, match=r"each state must be a float32 CPU \(B, H\) matrix"):
        stepper.step(x, h, [c[0], c[1][None]])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_float32_tanh_keeps_its_precision_near_zero(ext, cell):
    """tanh as 2σ(2x) − 1 cancels near 0 in float32 (an absolute error of about an ulp of 1). With the book's
    init (weights N(0, 0.01²)) the pre-activations are that small: the 2x64 scratch models' logits were
    6e-5 (RNN) to 2.4e-4 (LSTM) from float64 torch.nn, relative to the largest; tanh's series near 0 brings
    them to float32 rounding (under 5e-7 here)."""
    from deeprnn.models import scratch_to_concise

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=28, cell=cell, num_layers=2, num_hiddens=64, impl="scratch",
                                    init="d2l")).eval()
    reference = scratch_to_concise(model).double()
    X = torch.randint(0, 28, (8, 35))
    with torch.no_grad():
        got, _ = model(X, None)
        want, _ = reference(X, None)
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 2e-6
