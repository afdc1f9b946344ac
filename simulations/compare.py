#!/usr/bin/env python
"""The paper's Table 1 through our pipeline (cloud -> Arrow Flight -> edge trainer).

    python simulations/compare.py                       # offline real task + backbone
    python simulations/compare.py --tasks synthetic --backbone vit_tiny_patch16_224 --random-init
    python simulations/compare.py --few-shot            # 1/2/4/8/16 shots, 3 seeds

Writes ``results/<run-id>/compare.md``, ``compare.parquet``, ``compare_seeds.parquet`` and a
plot of accuracy vs MB per image (see :mod:`mist_fed.experiments.compare`).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mist_fed.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
