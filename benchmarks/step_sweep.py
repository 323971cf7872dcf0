"""Step-matched sweep: variants of a preset, each trained for a fixed number of optimiser steps, several at once.

    python benchmarks/step_sweep.py --preset tm-cpu-fp32 --steps 1230 --seeds 0 1 2 --jobs 12 \\
        --variant ema99 ema_decay=0.99 --variant wider num_hiddens=640 max_steps=790

A recipe tuned for a wall-clock budget on a slow machine is limited by its optimiser steps, not by time.
Given how many steps the slow machine fits in its budget (``--steps``; a variant that changes the cost of a
step sets its own ``max_steps``), what a run reaches depends on its steps, not on the machine that trains
it, so a machine with many cores or a GPU can try many variants in parallel (``--jobs`` worker processes,
one torch thread each) and the slow machine then only has to confirm the winner. On another device the
random streams differ: compare means over seeds with the slow machine's, not single seeds.

Runs go seed by seed (every variant of seed 0 first), so that a ``--deadline`` cuts the last seeds, not the
last variants. The first variant is the baseline (``base``: the preset itself, unless a ``--variant base ...``
comes first). The table compares each variant with the baseline on the seeds both finished (paired: the same
seed gives the same initial weights and the same data order). Every run's configuration is checked before
the first starts; a run that fails anyway (a corpus file gone) does not stop the others, and the exit status
is then 1.

On CUDA the workers turn TF32 off (cuBLAS and cuDNN), so that float32 means what it means on a CPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import loadavg, machine, parse_sets, refuse_repeated_seeds  # noqa: E402
from benchmarks.quality import refuse_invalid  # noqa: E402
from deeprnn.cli import PRESETS  # noqa: E402
from deeprnn.cli import OneLineParser  # noqa: E402


def one_run(values: dict) -> dict:
    """Train ``values`` in this (worker) process; its best held-out perplexity and how long it took."""
    import torch

    from benchmarks.quality import run

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        s = run(values, run_dir=Path(tmp) / "run")
    best = min(s["curve"], key=lambda r: r[2])
    return {"best_ppl": best[3], "best_step": best[1], "steps": s["steps"],
            "final_ppl": s["curve"][-1][3], "wall_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = OneLineParser(prog="step_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="recipe from deeprnn.cli.PRESETS")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps per run (a variant's max_steps wins)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds, run in this order")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="a variant: a name, then TrainConfig fields to change (repeatable)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="change every run (e.g. device=cpu)")
    p.add_argument("--finalists", type=int, default=0, metavar="K",
                   help="then run the baseline and the K variants that did best against it for --more-seeds")
    p.add_argument("--more-seeds", type=int, nargs="*", default=[], metavar="SEED", help="seeds of the finalists")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="runs at a time")
    p.add_argument("--deadline", type=float, default=None, metavar="MINUTES",
                   help="start no run after this many minutes, except the first --jobs of the sweep (runs "
                        "already started finish)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.jobs < 1:
        p.error(f"--steps and --jobs must be >= 1, got {args.steps} and {args.jobs}")
    if args.finalists < 0:
        p.error(f"--finalists must be >= 0, got {args.finalists}")
    if args.finalists and not args.more_seeds:
        p.error("--finalists needs --more-seeds: the seeds to run the finalists on")
    if args.more_seeds and not args.finalists:
        p.error("--more-seeds needs --finalists: how many variants to run on them")
    # A seed given twice would be run twice and counted twice in the means.
    for flag, seeds in (("--seeds", args.seeds), ("--more-seeds", args.more_seeds)):
        refuse_repeated_seeds(p, flag, seeds)
    again = [seed for seed in args.more_seeds if seed in args.seeds]
    if again:
        p.error(f"--more-seeds gives seed {again[0]}, which --seeds already runs; give the finalists other seeds")

    variants: dict[str, dict] = {}
    for name, *sets in ([["base"]] if not args.variant or args.variant[0][0] != "base" else []) + args.variant:
        if name in variants:
            p.error(f"variant {name!r} is given twice; give each variant its own name")
        variants[name] = parse_sets(sets)
    common = parse_sets(args.set)

    def run_values(name: str, seed: int) -> dict:
        return {**PRESETS[args.preset], "time_budget": None, "max_steps": args.steps, "sample_every": 0, **common,
                **variants[name], "seed": seed}

    # A bad --set, seed or variant is one line now, not the same error from every run.
    refuse_invalid(p, {**PRESETS[args.preset], "max_steps": args.steps, **common}, "--set: ")
    for seed in args.seeds + args.more_seeds:
        refuse_invalid(p, {"seed": seed})
    for name in variants:
        refuse_invalid(p, run_values(name, args.seeds[0]), f"variant {name!r}: ")
    t0 = time.time()
    results: dict[tuple[str, int], dict] = {}
    failed: list[tuple[str, int]] = []
    print(f"step sweep of {args.preset}: {len(variants)} variants x seeds {args.seeds}, {args.steps} steps, "
          f"{args.jobs} at a time; every run: {json.dumps(common)}", flush=True)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        def sweep(names: list[str], seeds: list[int], *, first_round: bool) -> None:
            todo = [(name, seed) for seed in seeds for name in names]  # seed by seed
            running: dict[cf.Future, tuple[str, int]] = {}

            def start_next(first: bool = False) -> None:  # one more run, unless none is left or it is too late
                if todo and (first or args.deadline is None or time.time() - t0 < args.deadline * 60):
                    name, seed = todo.pop(0)
                    running[pool.submit(one_run, run_values(name, seed))] = (name, seed)

            for _ in range(args.jobs):
                start_next(first=first_round)
            while running:
                fut = next(cf.as_completed(running))
                name, seed = running.pop(fut)
                start_next()
                try:
                    r = fut.result()
                except Exception as err:  # noqa: BLE001 - one broken variant must not lose the others
                    print(json.dumps({"variant": name, "seed": seed, "error": f"{type(err).__name__}: {err}"}),
                          flush=True)
                    failed.append((name, seed))
                    continue
                results[name, seed] = r
                print(json.dumps({"variant": name, "seed": seed, **{
                    k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)

        sweep(list(variants), args.seeds, first_round=True)
        if args.finalists:
            base, *others = variants
            ranked = sorted((d[0], name) for name in others
                            if (d := paired_change(results, name, base, args.seeds)) is not None)
            finalists = [base] + [name for _, name in ranked[:args.finalists]]
            print(f"finalists for seeds {args.more_seeds}: {', '.join(finalists)}", flush=True)
            sweep(finalists, args.more_seeds, first_round=False)
    print(f"\n{len(results)} runs in {time.time() - t0:.0f} s; {machine()}; load average {loadavg()} at the end\n")
    for line in summary_table(args.preset, variants, results, args.seeds + args.more_seeds, args.steps):
        print(line)
    if failed:
        print(f"step_sweep.py: {len(failed)} of {len(failed) + len(results)} runs failed: "
              f"{', '.join(f'{name} seed {seed}' for name, seed in failed)} (their errors are above)", file=sys.stderr)
        return 1
    return 0


def paired_change(results: dict[tuple[str, int], dict], name: str, base: str,
                  seeds: list[int]) -> tuple[float, int] | None:
    """Mean relative change of ``name``'s best perplexity from ``base``'s over the seeds both finished, and how
    many seeds that is; None if there are none."""
    paired = [s for s in seeds if (name, s) in results and (base, s) in results]
    if not paired:
        return None
    return statistics.mean(results[name, s]["best_ppl"] / results[base, s]["best_ppl"] - 1 for s in paired), len(paired)


def summary_table(preset: str, variants: dict[str, dict], results: dict[tuple[str, int], dict],
                  seeds: list[int], steps: int) -> list[str]:
    """A Markdown table: each variant's mean best held-out perplexity, and its paired difference from the first."""
    names = list(variants)
    base = names[0]
    lines = [f"| variant of `{preset}` | changes | steps | best held-out ppl (mean) | per seed | vs {base} (paired) |",
             "| --- | --- | ---: | ---: | --- | ---: |"]
    for name in names:
        done = [s for s in seeds if (name, s) in results]
        if not done:
            lines.append(f"| {name} | {fmt_changes(variants[name])} | | (no run finished) | | |")
            continue
        ppls = [results[name, s]["best_ppl"] for s in done]
        d = paired_change(results, name, base, seeds) if name != base else None
        vs = f"{100 * d[0] + 0.0:+.2f}% ({d[1]})" if d is not None else ""  # + 0.0: no "-0.00%"
        lines.append(f"| {name} | {fmt_changes(variants[name])} | {variants[name].get('max_steps', steps)} | "
                     f"{statistics.mean(ppls):.3f} | {', '.join(f'{p:.3f}' for p in ppls)} | {vs} |")
    return lines


def fmt_changes(change: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in change.items()) or "(the preset)"


if __name__ == "__main__":
    sys.exit(main())
