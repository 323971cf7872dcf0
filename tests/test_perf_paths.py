"""The fast paths equal their references: values and gradients, never timed.

* The scratch window kernels under ``torch.autocast(bfloat16)`` (products in bf16, state and gates in
  fp32) against the same model in float32, within bf16 tolerance, and against the plain autograd loop.
* ``benchmarks/gpu.sh``'s Python side on a CPU: it falls back, says so, and runs a tiny config.
* The benchmark scripts end to end at token sizes (the suite, ``profile_step.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deeprnn.models import ModelConfig, build_model
from deeprnn.models.convert import scratch_to_concise, state_dict_to_scratch
from deeprnn.precision import native_bf16

ROOT = Path(__file__).resolve().parents[1]
CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]


def _run(model, X, Y, state, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, final = model(X, state)  # (T, B, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), Y.T.reshape(-1))
    loss.backward()
    finals = final if isinstance(final, tuple) else (final,)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.float(), [f.float() for f in finals], grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("input_kind", ["one_hot", "embedding"])
def test_scratch_bf16_kernels_match_fp32(cell, input_kind):
    """Under bf16 autocast the scratch model stays as close to its fp32 self as torch.nn's twin does."""
    torch.manual_seed(0)
    V, B, T = 11, 4, 9
    cfg = ModelConfig(vocab_size=V, cell=cell, num_layers=2, num_hiddens=32, impl="scratch", input=input_kind)
    model = build_model(cfg)
    twin_model = scratch_to_concise(model)
    X = torch.randint(0, V, (B, T))
    Y = torch.randint(0, V, (B, T))
    state = model.begin_state(B)
    state = (tuple(torch.randn_like(s) * 0.5 for s in state) if isinstance(state, tuple)
             else torch.randn_like(state) * 0.5)
    ref_logits, ref_final, ref_grads = _run(model, X, Y, state, bf16=False)
    logits, final, grads = _run(model, X, Y, state, bf16=True)
    assert final[0].dtype == torch.float32  # the carried state stays in the parameters' dtype
    assert _rel(logits, ref_logits) < 2e-2
    for f, r in zip(final, ref_final):
        assert _rel(f, r) < 2e-2
    # torch.nn's own bf16 error on the same gradient, in scratch names. Its two biases map to one
    # summed b_h whose gradient is not comparable, so b_h is held to the layer's W_hh figure. On a CPU
    # without AVX-512 torch.nn.LSTM has no bf16 (deeprnn.precision.check_precision): the 4% bound alone.
    twin = None
    if cell != "lstm" or native_bf16(torch.device("cpu")):
        twin = convert_grads(_run(twin_model, X, Y, state, bf16=True)[2], cfg)
    for name, g in ref_grads.items():
        twin_name = name.replace("b_h", "W_hh") if name.endswith(".b_h") else name
        twin_err = 0.0 if twin is None else _rel(twin[twin_name], ref_grads[twin_name])
        assert _rel(grads[name], g) < max(4e-2, 1.5 * twin_err), name


def convert_grads(grads: dict, cfg: ModelConfig) -> dict:
    """Concise-named gradients mapped onto the scratch names (same mapping as the weights)."""
    return state_dict_to_scratch(grads, cfg)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_scratch_bf16_kernel_matches_autograd_loop(cell):
    """The bf16 kernel against the plain per-step autograd loop fed the same bf16-rounded products."""
    torch.manual_seed(1)
    H, B, T = 16, 3, 7
    cfg = ModelConfig(vocab_size=5, cell=cell, num_layers=1, num_hiddens=H, impl="scratch")
    layer = build_model(cfg).layers[0]
    G = layer.W_hh.shape[1]
    xproj = torch.randn(T, B, G, requires_grad=True)
    h0 = torch.randn(B, H)
    state = (h0, torch.randn(B, H)) if cell == "lstm" else h0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, final = layer(xproj, state)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    g_fast, gW_fast = xproj.grad.clone(), layer.W_hh.grad.clone()
    xproj.grad, layer.W_hh.grad = None, None
    ref_out, ref_final = layer.forward_reference(xproj, state)  # float32
    ref_out.sum().backward()
    assert _rel(out.float(), ref_out) < 1e-2
    assert _rel(xproj.grad, g_fast) < 3e-2
    assert _rel(layer.W_hh.grad, gW_fast) < 3e-2


def test_gpu_script_falls_back_on_cpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--tiny"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fell back to CPU" in proc.stdout
    assert "tokens/s" in proc.stdout


def test_cpu_suite_prints_every_row():
    """``python -m benchmarks`` end to end at a token size: every workload row, the hardware-limit column,
    and the same greedy text as the book's ``predict_ch8`` on the same weights."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--rounds", "1", "--seconds", "0.002", "--skip-ingest", "--no-save",
         "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "greedy output identical to predict_ch8: yes" in out
    assert "book's training steps: a child process with glibc's default malloc" in out
    header = next(line for line in out.splitlines() if line.startswith("workload"))
    assert header.split()[-3:] == ["ratio", "at", "ceiling"]
    rows = ["concise LSTM fp32 vs book nn.LSTM", "scratch LSTM fp32 vs book-style scratch",
            "generation greedy, 1 stream vs predict_ch8", "torch's step products alone (3.3 MB fp32 read/char)",
            "generation sampling, 64 streams"]
    if native_bf16(torch.device("cpu")):
        rows += ["scratch GRU bf16 vs book nn.GRU", "concise LSTM bf16 vs book nn.LSTM"]
        assert "bf16 matmul 2048^3: " in out
    else:  # emulated bf16 would say nothing about the code and take minutes
        assert "bf16 vs" not in out
        assert ("no bf16 rows: this CPU has no AVX-512, so torch emulates bf16 (slower than fp32) and "
                "torch.nn.LSTM has none") in out
    for row in rows:
        assert row in out, row


def test_benchmark_set_overrides():
    """``--set`` of the benchmark scripts: literals, lists, booleans, text; an unknown key is one line."""
    from benchmarks.common import parse_sets

    assert parse_sets(["num-layers=3", "lr=0.002", "source_weights=[2.0, 1.0]", "residual=true",
                       "locked_dropout=no", "cell=gru", "corpus=['timemachine', 'war-of-the-worlds']"]) == {
        "num_layers": 3, "lr": 0.002, "source_weights": [2.0, 1.0], "residual": True, "locked_dropout": False,
        "cell": "gru", "corpus": ["timemachine", "war-of-the-worlds"]}
    with pytest.raises(SystemExit, match=r"^--set: 'num_layerz' is not a TrainConfig field$"):
        parse_sets(["num_layerz=2"])


def test_quality_script_bad_input_is_one_line(tmp_path):
    """``benchmarks/quality.py`` on a missing corpus file: one line naming the file, exit status 1."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    missing = tmp_path / "missing.txt"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--preset", "tiny", "--minutes", "0.05",
         "--set", f"corpus=['{missing}']"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"quality.py: error: no such file: '{missing}'; check the path"]


@pytest.mark.parametrize("keep", [False, True])
def test_quality_script_interrupted_keeps_a_run_that_can_be_resumed(monkeypatch, capsys, tmp_path, keep):
    """SIGTERM during ``benchmarks/quality.py``: train() checkpoints and stops, and the line names the run to
    resume. Without --run-dir that run is in a temporary directory, which is kept (no work lost) and said to be
    temporary. Exit status 128 + the signal, as ``deeprnn train``."""
    import signal
    import tempfile

    sys.path.insert(0, str(ROOT))
    from benchmarks import quality
    from deeprnn.train import TrainingInterrupted

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    seen = []

    def interrupted(cfg, **_):
        seen.append(Path(cfg.run_dir))
        seen[0].mkdir(parents=True)
        raise TrainingInterrupted(signal.SIGTERM, seen[0])

    monkeypatch.setattr(quality, "train", interrupted)
    argv = ["--preset", "tiny", "--minutes", "1"] + (["--run-dir", str(tmp_path / "run")] if keep else [])
    assert quality.main(argv) == 128 + signal.SIGTERM
    resume = f"quality.py: SIGTERM received: checkpoint saved; resume with: deeprnn train --resume {seen[0]}"
    assert capsys.readouterr().err.splitlines() == [
        resume if keep else resume + " (kept in a temporary directory; pass --run-dir DIR to choose where)"]
    assert seen[0] == (tmp_path / "run" if keep else next((tmp_path / "tmp").glob("deeprnn-quality-*")) / "run")
    assert seen[0].is_dir()


def test_quality_script_removes_its_temporary_run_once_done_or_failed(monkeypatch, capsys, tmp_path):
    """Without --run-dir a finished run's temporary directory is removed after the curve is printed, and so is
    one whose training failed (nothing to resume)."""
    import tempfile

    sys.path.insert(0, str(ROOT))
    from benchmarks import quality
    from deeprnn.errors import DeepRNNError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert quality.main(["--preset", "tiny", "--minutes", "1"]) == 0  # tiny stops after 5 steps
    out = capsys.readouterr().out
    assert "best held-out: loss " in out and "run dir " + str(tmp_path / "deeprnn-quality-") in out
    assert list(tmp_path.glob("deeprnn-quality-*")) == []  # (torch keeps its own caches there)
    with pytest.raises(DeepRNNError, match="^no such file: "):
        quality.main(["--preset", "tiny", "--set", f"corpus=['{tmp_path / 'missing.txt'}']"])
    assert list(tmp_path.glob("deeprnn-quality-*")) == []


def test_profile_step_lists_ops_and_the_products_share(capsys):
    """``benchmarks/profile_step.py`` on one step: the op table with the products' row, and the line that
    turns their share into a rate against the ceiling; bad counts are one argparse line, exit 2."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import profile_step

    profile_step.main(["--cell", "rnn_tanh", "--steps", "1", "--rows", "40"])
    out = capsys.readouterr().out
    assert "scratch rnn_tanh fp32, book config:" in out and "tokens/s (without the profiler)" in out
    assert "_RNNWindow" in out
    assert "matrix products outside the window kernels:" in out and "the window kernels (" in out
    assert "of the fp32 2048^3 ceiling measured now" in out
    with pytest.raises(SystemExit) as err:
        profile_step.main(["--steps", "0"])
    assert err.value.code == 2
    assert "--steps and --rows must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["profile_step", "bench_masks"])
def test_timing_scripts_refuse_a_bf16_lstm_where_bf16_is_emulated(script, monkeypatch, capsys):
    """On a CPU without native bf16 (``native_bf16`` made False, so this runs on every machine) the two
    timing scripts refuse bf16 with torch.nn.LSTM in one line, exit 2, instead of oneDNN's traceback."""
    import deeprnn.precision as precision_mod

    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_masks, profile_step

    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: False)
    main, argv, fix = {
        "profile_step": (profile_step.main, ["--impl", "concise", "--precision", "bf16"], "use --precision fp32"),
        "bench_masks": (bench_masks.main, ["--set", "impl=concise", "precision=bf16"],
                        "use --set precision=auto"),
    }[script]
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    [line] = capsys.readouterr().err.splitlines()  # one line: no usage block before it
    prog, message = line.split(": error: ", 1)
    assert message == (f"precision 'bf16' with torch.nn.LSTM (impl 'concise') needs a CPU with AVX-512, which this "
                       f"one lacks; {fix} (see {prog} --help)")


def test_bf16_quality_compares_both_precisions(capsys):
    """``benchmarks/bf16_quality.py`` at a token size: one row per seed with both perplexities and their
    difference, the verdict line; the fields it sets itself are refused with one line."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bf16_quality

    tiny = ["num_hiddens=16", "batch_size=4", "num_steps=8", "eval_batch_size=4", "eval_num_steps=64"]
    if not native_bf16(torch.device("cpu")):  # torch.nn.LSTM has no bf16 here: one line; the scratch LSTM runs
        with pytest.raises(SystemExit) as err:
            bf16_quality.main(["--steps", "2", "--seeds", "3", "--set", *tiny])
        assert err.value.code == 2
        assert "error: precision 'bf16' with torch.nn.LSTM (impl 'concise') needs a CPU with AVX-512" in \
            capsys.readouterr().err
        tiny.append("impl=scratch")
    assert bf16_quality.main(["--steps", "2", "--seeds", "3", "--set", *tiny]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["3"])
    fp32, bf16, rel = float(row.split()[1]), float(row.split()[2]), float(row.split()[3].rstrip("%")) / 100
    assert 1 < fp32 < 28 and 1 < bf16 < 28  # a 2-step model: near uniform over 28 tokens, not broken
    assert rel == pytest.approx(bf16 / fp32 - 1, abs=2e-4)  # both printed rounded
    assert "target: every seed within 2% of fp32:" in out
    with pytest.raises(SystemExit) as err:
        bf16_quality.main(["--set", "precision=fp32"])
    assert err.value.code == 2
    assert "--set precision=... is set by this script" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        bf16_quality.main(["--steps", "0"])
    assert err.value.code == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_bench_masks_times_both_draws_and_restores_keep_mask(capsys):
    """``benchmarks/bench_masks.py`` at a token size: one line per kind with a time per round, the ratio
    line, and ``regularize.keep_mask`` is deeprnn's own again afterwards; bad counts exit 2."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_masks
    from deeprnn import regularize

    ours = regularize.keep_mask
    tiny = ["num_hiddens=8", "num_layers=2", "embed_size=4", "batch_size=2", "num_steps=3", "precision=fp32"]
    assert bench_masks.main(["--rounds", "2", "--steps", "1", "--set", *tiny]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("bernoulli: ") and len(lines[0].split("ms/step")[0].split()) == 3
    assert lines[1].startswith("     rand: ")
    assert lines[2].startswith("ratio bernoulli_ / rand masks (best rounds): ")
    assert "tm-cpu step, batch 2x3, fp32" in lines[2]
    assert regularize.keep_mask is ours
    with pytest.raises(SystemExit) as err:
        bench_masks.main(["--rounds", "0"])
    assert err.value.code == 2


def test_bench_rows_times_both_ways_and_leaves_the_row_split_on(capsys):
    """``benchmarks/bench_rows.py`` at a token size: per round the step, the forward window and sampling
    both ways, the three ratio lines, the sampling rates, and ``row_products`` on again afterwards; a concise or bf16 step is refused in one
    line, exit 2 (so is a build without a row kernel)."""
    import re

    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_rows
    from deeprnn.models import native

    ext = native.load()
    tiny = ["num_hiddens=8", "num_layers=2", "embed_size=4", "batch_size=3", "num_steps=5", "precision=fp32"]
    if ext is None or not ext.row_kernel_isa():
        with pytest.raises(SystemExit) as err:
            bench_rows.main(["--rounds", "1", "--steps", "1", "--set", *tiny])
        assert err.value.code == 2 and "have no row product kernel" in capsys.readouterr().err
        return
    for cell in ("lstm", "gru", "rnn_relu"):
        no_zoneout = [] if cell == "lstm" else ["zoneout_cell=0", "zoneout_hidden=0"]  # tm-cpu's, LSTM only
        assert bench_rows.main(["--rounds", "2", "--steps", "1", "--streams", "5", "--set", *tiny, f"cell={cell}",
                                *no_zoneout]) == 0
        lines = capsys.readouterr().out.splitlines()
        for i, what in enumerate(("training step", "forward window", "sampling 100 chars x 5 streams")):
            times = [re.fullmatch(rf"{what}, +{name}: ([0-9.e -]+) ms \(best ([0-9.e-]+)\)", line)
                     for name, line in zip(("per-step", "rows"), lines[3 * i: 3 * i + 2])]
            assert all(times) and all(len(m[1].split()) == 2 for m in times)
            ratio = float(lines[3 * i + 2].rsplit(" ", 1)[1])
            assert lines[3 * i + 2].startswith(f"ratio per-step / rows, {what} (best rounds): ")
            assert ratio == pytest.approx(float(times[0][2]) / float(times[1][2]), rel=2e-3, abs=1e-3)  # rounded
        assert re.fullmatch(f"tm-cpu: {cell} 2x8, batch 3x5, fp32, {torch.get_num_threads()} threads, "
                            f"{ext.row_kernel_isa()} row kernel; sampling [0-9,]+ chars/s with the row stepper, "
                            "[0-9,]+ without", lines[9])
        assert ext.row_products()
    for bad in (["impl=concise"], ["precision=bf16"]):
        with pytest.raises(SystemExit) as err:
            bench_rows.main(["--set", *tiny, *bad])
        assert err.value.code == 2
        assert "error: the row split runs scratch layers in float32; this step is impl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        bench_rows.main(["--set", *tiny, "cell=gru"])
    assert err.value.code == 2
    assert "error: zoneout_cell and zoneout_hidden apply to cell='lstm'" in capsys.readouterr().err


def test_bench_generate_lists_every_workload_and_the_stepper_ratios(capsys):
    """``benchmarks/bench_generate.py`` at a short size: the identity check, one row per workload (the
    row stepper, the oneDNN ops and the torch cells among them), the targets and the two sampling ratios,
    which are the rows' rates divided."""
    import re

    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_generate

    bench_generate.main(["--repeats", "1", "--seconds", "0.02"])
    out = capsys.readouterr().out
    assert "greedy output identical to the book's (600 chars, same weights): yes" in out
    rates = {m[1].strip(): float(m[2].replace(",", "")) for m in
             re.finditer(r"^(\([a-z'\"]+\) .+?) +([0-9,]+) +[0-9.]+x +[0-9.]+%$", out, re.M)}
    assert list(rates) == ["(a) book predict_ch8", "(b) greedy", "(b'') greedy, Python loop",
                           "(b') greedy via forward", "(c) sample x64 streams", "(c'') sample x64, oneDNN ops",
                           "(c') sample x64, torch cells", "(d) beam width 4"]
    m = re.search(r"the row stepper vs the cells as torch ops on oneDNN's products: ([0-9.]+)x; those vs the "
                  r"stepper on torch.\*_cell: ([0-9.]+)x", out)
    assert m and float(m[1]) == pytest.approx(rates["(c) sample x64 streams"] / rates["(c'') sample x64, oneDNN ops"],
                                              rel=0.01)
    assert float(m[2]) == pytest.approx(rates["(c'') sample x64, oneDNN ops"] / rates["(c') sample x64, torch cells"],
                                        rel=0.01)


def test_precision_probe_says_what_auto_means_and_measures_both(capsys):
    """``benchmarks/precision_probe.py`` at a small size: what auto means here, and every product in both
    precisions with the ratio of the window product."""
    import re

    sys.path.insert(0, str(ROOT))
    from benchmarks import precision_probe
    from deeprnn.precision import resolve_precision

    assert precision_probe.main(["--size", "64"]) == 0
    out = capsys.readouterr().out
    native = native_bf16(torch.device("cpu"))
    assert (f"native bf16: {'yes' if native else 'no'}; --precision auto means "
            f"{resolve_precision('auto', torch.device('cpu'))} here") in out
    assert ("bf16" if native else "fp32") == resolve_precision("auto", torch.device("cpu"))
    assert re.search(r"^fp32 2048\^3: torch.mm [0-9.]+ GFLOP/s, oneDNN [0-9.]+ GFLOP/s$", out, re.M)
    assert re.search(r"^bf16 64\^3: torch.mm [0-9.]+ GFLOP/s$", out, re.M)
    m = re.search(r"fp32 ([0-9.]+) GFLOP/s, bf16 ([0-9.]+) GFLOP/s, bf16/fp32 ([0-9.]+)x$", out, re.M)
    assert m and float(m[3]) == pytest.approx(float(m[2]) / float(m[1]), abs=0.01)
