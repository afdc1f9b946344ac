#!/usr/bin/env python
"""Fleet simulation: ``python simulations/run.py --devices 50 --profile rpi4``.

The same as ``mist-fed simulate``; see ``--help`` and ``simulations/fleets/*.toml``.
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
    sys.exit(main([*verbose, "simulate", *(a for a in args if a not in verbose)]))
