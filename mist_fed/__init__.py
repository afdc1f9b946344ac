"""mist-fed: separated tuning (MIST) of frozen cloud ViTs by tiny edge networks, and fleet simulation."""

import os

# Flower reports telemetry by default; every code path that imports mist_fed keeps it off.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"
