#!/usr/bin/env python
"""Simulation overhead: ``python simulations/bench_overhead.py [fleet flags] [--small N]``.

At two fleet sizes (``--small``, default 50, and ``--devices``) runs the same rounds as a plain
loop in one process and through Flower and Ray, each in its own process against one warm
cloud, and prints the overhead per device-round, Ray's start-up apart, and the driver's peak
RSS (the embedded cloud excluded). The same as ``mist-fed bench sim``.
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
