"""``python -m benchmarks``: the CPU suite (see ``benchmarks/suite.py``)."""

from benchmarks.suite import main

main()
