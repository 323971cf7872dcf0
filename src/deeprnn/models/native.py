"""The compiled kernels (``csrc/windows.cpp``, ``csrc/greedy.cpp``), built on first use, or None where they cannot be.

The scratch layers' window functions (``scratch._LSTMWindow`` and its siblings) run their CPU time
loops in this C++ extension when it loads, and their Python loops otherwise (and always on GPUs);
``deeprnn.generate`` runs greedy decoding of one CPU stream in its ``GreedyDecoder``. It
is compiled by ``torch.utils.cpp_extension.load`` the first time a process needs it (about 15 s with
g++ 12 on the benchmark machine; torch caches the build under its extensions directory,
``TORCH_EXTENSIONS_DIR``, so later processes only load it, in well under a second). If it cannot be
built (no compiler, no headers, any error) the Python loops run instead, with one warning saying why.
``DEEPRNN_NATIVE=0`` in the environment turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
# The window kernels with the module definition, and the greedy decoding loop (deeprnn.generate).
SOURCES = (CSRC / "windows.cpp", CSRC / "greedy.cpp")
HEADERS = (CSRC / "pointwise.h",)
ENV = "DEEPRNN_NATIVE"

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None  # why the build failed; set at most once per process
_build_seconds: float | None = None


def disabled() -> bool:
    """Whether ``DEEPRNN_NATIVE`` turns the extension off (``0``, ``false``, ``no``, ``off``)."""
    return os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off")


def _isa_flags() -> list[str]:
    """Vector ISA flags for the pointwise loops, from the instruction set torch itself dispatches to here.

    Not ``-march=native``: these name a feature level rather than this CPU, and torch's extension cache
    keys a build on its flags, so a machine that reports another level gets its own build instead of
    loading one it cannot run.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []  # e.g. aarch64: NEON is the baseline, -O3 vectorises for it
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):  # the LSTM step's pointwise pass: ~9 us, against ~20 us with AVX2
        return ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if capability == "AVX2":
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def load() -> ModuleType | None:
    """The extension module, built on the first call in a process; None if disabled or it cannot be built.

    Thread-safe; a failed build is not retried in the same process and warns once.
    """
    global _module, _failure, _build_seconds
    if disabled():
        return None
    if _module is not None or _failure is not None:
        return _module
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        started = time.perf_counter()
        try:
            from torch.utils import cpp_extension

            _find_ninja()
            # A build cached already first (so a toolchain that cannot link OpenMP does not try that build
            # again in every process), then the others in order of preference.
            flag_sets = sorted(_flag_sets(), key=lambda flags: not _is_cached(cpp_extension, flags))
            for i, flags in enumerate(flag_sets):
                name = build_name(flags)
                build_dir = _build_directory(cpp_extension, name)
                if build_dir is not None:
                    _clear_stale_lock(build_dir)
                    if not _built(build_dir, name):  # else loading takes a fraction of a second
                        log.info("building the scratch layers' C++ kernels for this machine (once, about 15 s)")
                try:
                    _module = cpp_extension.load(name=name, sources=[str(f) for f in SOURCES], extra_cflags=flags,
                                                 extra_ldflags=[f for f in flags if f == "-fopenmp"], verbose=False)
                    break
                except Exception:
                    if i == len(flag_sets) - 1:
                        raise
                    # A toolchain without libgomp to link: the kernels still build, without the row split.
                    log.info("building the C++ kernels with OpenMP failed; building them without it")
            _build_seconds = time.perf_counter() - started
        except Exception as exc:  # any failure means "use the Python loops", never a crash
            _failure = f"{type(exc).__name__}: {_gist(str(exc))}"
            message = f"C++ window kernels unavailable, using the Python loops ({_failure})"
            try:
                warnings.warn("deeprnn: " + message, RuntimeWarning, stacklevel=2)
            except Warning:  # -W error: the fallback must still not become a crash
                log.warning(message)
    return _module


def _flag_sets() -> list[list[str]]:
    """The builds to try, best first: with OpenMP where torch uses it, then without it."""
    # -fno-trapping-math: without it GCC will not if-convert the clamp in the sigmoid, and leaves those
    # loops scalar (3-10x slower); nothing here reads floating-point flags.
    base = ["-O3", "-fno-trapping-math", *_isa_flags()]
    openmp = _openmp_flags()
    return [base + openmp, base] if openmp else [base]


def _is_cached(cpp_extension: ModuleType, flags: list[str]) -> bool:
    """Whether the build with ``flags`` is compiled already in torch's extensions directory."""
    name = build_name(flags)
    # torch's helper makes the directory it names, and asking must neither leave an empty one behind nor
    # remove one that another process's build has just made (and not yet locked). Named "", the directory
    # is the extensions root itself, which a build would make anyway.
    root = _build_directory(cpp_extension, "")
    return root is not None and _built(root / name, name)


def _openmp_flags() -> list[str]:
    """-fopenmp where torch runs its threads on OpenMP (Linux builds): ``at::parallel_for`` is a header
    template whose ``#pragma omp parallel`` is compiled into the extension, so without the flag it runs on
    one thread. The extension then needs libgomp.so.1, which torch has loaded already (one runtime, one
    thread pool)."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def ready() -> bool:
    """Whether ``load()`` would return the module without compiling it: loaded already, or built before and
    cached. Callers for whom a ~15 s build is not worth it (a short greedy decode) ask this first."""
    if disabled() or _failure is not None:
        return False
    if _module is not None:
        return True
    try:
        from torch.utils import cpp_extension

        return any(_is_cached(cpp_extension, flags) for flags in _flag_sets())
    except Exception:  # no cpp_extension, unreadable cache: then it is not ready
        return False


def build_name(flags: list[str]) -> str:
    """The extension's name, which is also its build directory under torch's extensions root.

    torch keys that directory on the name alone, and across processes it only asks ninja whether the
    files changed. A name that holds torch's version, the vector level and a hash of the sources, the
    flags and the sources' folder gives each combination its own directory, so a cache shared between machines (an NFS home,
    several nodes) never hands an AVX-512 build to an AVX2 machine, or one torch's build to another.
    """
    isa = torch.backends.cpu.get_cpu_capability().lower() if _isa_flags() else "base"
    code = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))  # ninja does not see header changes
    # The sources' folder too: ninja rebuilds when a build's recorded source paths change, so two
    # checkouts sharing one name would rebuild each other's module (15 s) on every switch.
    digest = hashlib.sha1(code + " ".join(flags).encode() + str(CSRC).encode()).hexdigest()[:10]
    return f"deeprnn_windows_{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}_{isa}_{digest}"


def _build_directory(cpp_extension: ModuleType, name: str) -> Path | None:
    """Where torch builds ``name`` (its own rule: extensions root, Python and accelerator). The helper is
    private, so None where it moved: then no stale-lock cleanup and no build announcement, nothing worse."""
    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except Exception:
        return None


def _built(build_dir: Path, name: str) -> bool:
    """Whether ``build_dir`` holds a compiled ``name`` module (torch then only loads it)."""
    return any(build_dir.glob(name + ".*so"))


STALE_LOCK_SECONDS = 600  # a build takes ~15 s; a lock this old was left by a process that died


def _clear_stale_lock(build_dir: Path) -> None:
    """Remove a build lock left by a process killed mid-build: torch would wait for it forever."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing a stale C++ build lock (%.0f s old): %s", age, lock)
        with contextlib.suppress(OSError):
            lock.unlink()


def _find_ninja() -> None:
    """torch runs ``ninja`` from PATH. The ``ninja`` package installs it next to this Python, which is not on
    PATH when a venv's ``bin/deeprnn`` runs without activating the venv: put that directory last on PATH."""
    here = Path(sys.executable).parent
    if shutil.which("ninja") is None and shutil.which("ninja", path=str(here)) is not None:
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + str(here)


def _gist(message: str) -> str:
    """The line of a build failure that says why (the compiler's first error), not ninja's last words."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    telling = [line for line in lines if re.search(r"error|not found|no such file|cannot", line, re.IGNORECASE)
               and not line.startswith("Error building extension")]
    line = (telling or lines or ["no message"])[0]
    return line if len(line) <= 200 else line[:197] + "..."


def kernels_for(x: torch.Tensor, W_hh: torch.Tensor, lp: torch.dtype | None) -> ModuleType | None:
    """The extension if it serves a window with input ``x``, recurrent weight ``W_hh`` and products in
    ``lp`` (CPU; float32 or float64 state; no lp, bfloat16 or float16) and it loads, else None."""
    if x.device.type != "cpu" or W_hh.device.type != "cpu":
        return None
    if W_hh.dtype not in (torch.float32, torch.float64) or lp not in (None, torch.bfloat16, torch.float16):
        return None
    if getattr(torch.compiler, "is_compiling", lambda: False)():  # keep the Python loops traceable
        return None
    return load()


def backend() -> str:
    """One line for reports: which kernels the scratch layers' CPU windows use, and why."""
    if disabled():
        return f"python window kernels ({ENV}=0)"
    module = load()
    if module is None:
        return f"python window kernels (C++ build failed: {_failure})"
    isa = torch.backends.cpu.get_cpu_capability() if _isa_flags() else "baseline ISA"
    rows = f"; float32 windows split by rows, {module.row_kernel_isa()} products" if module.row_products() else ""
    return f"C++ window kernels (vectorised for {isa}{rows}; built or loaded in {_build_seconds:.1f} s)"
