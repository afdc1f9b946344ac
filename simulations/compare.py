#!/usr/bin/env python
"""The paper's Table 1 through our pipeline (cloud -> Arrow Flight -> one edge device per row).

    python simulations/compare.py                       # offline real task + backbone
    python simulations/compare.py --tasks synthetic --backbone vit_tiny_patch16_224 --random-init
    python simulations/compare.py --few-shot            # 1/2/4/8/16 shots, 3 seeds
    python simulations/compare.py --methods linear mist --seeds 3   # real data: MIST vs linear
    python simulations/compare.py --methods linear mist --mist-k 12 # the same, k fixed

Every row is trained and measured by an ``EdgeDevice`` (``--profile``, default laptop) whose
feature cache (``--device-dir``, default one per run id) a rerun or ``--resume`` reuses.
Writes ``results/<run-id>/compare.md``, ``compare.parquet`` (one row per seed),
``compare_summary.parquet`` (mean and std over seeds) and a plot of accuracy vs bytes per image
with a JPEG of the same images for reference (see :mod:`mist_fed.report.comparison`); with MIST on
the float32 wire and other wires, each wire's paired difference to it and the wire chosen on
validation under 10,000 bytes per image.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mist_fed.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
