#!/usr/bin/env python
"""Simulation overhead: ``python simulations/bench_overhead.py [fleet flags]``.

Runs the fleet twice in one process (the first fills the cloud's store), then through Flower
and Ray against the same cloud, and prints the wall-time ratio and the cloud's embed counters.
The same as ``mist-fed bench sim``.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mist_fed.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    verbose = [a for a in args if a in ("-v", "-vv", "--verbose")]
    sys.exit(main([*verbose, "bench", "sim", *(a for a in args if a not in verbose)]))
