"""deeprnn's benchmarks: side-by-side throughput and time-to-quality runs against the book (issue 7).

    python -m benchmarks [--quick] [--threads N]      # the whole CPU suite, one table of ratios
    python benchmarks/time_to_quality.py              # wall time to held-out perplexity 5.07
    bash benchmarks/gpu.sh                            # the CUDA figures (falls back to CPU, says so)

Results are written to ``benchmarks/results/``.
"""
