"""Run the reliability tests and print the figures they measured (see docs/reliability.md).

    python simulations/reliability_report.py

Each reliability test prints one ``RELIABILITY <guarantee>: key=value ...`` line; this script
runs them with ``pytest -s`` and collects those lines. The exit status is pytest's.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("reliability_report")

ROOT = Path(__file__).resolve().parents[1]
TESTS = [
    "tests/test_load_faults.py",
    "tests/test_store_faults.py",
    "tests/test_fleet_faults.py",
    "tests/test_fuzz.py",
    "tests/test_security.py",
    "tests/test_link_faults.py",
    "tests/test_cloud_token.py",
]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RELIABILITY ")]
    summary = [ln for ln in proc.stdout.splitlines() if " passed" in ln or " failed" in ln]
    for ln in lines + summary[-1:]:
        log.info("%s", ln)
    if proc.returncode != 0:
        log.error("%s", proc.stdout[-4000:] + proc.stderr[-2000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
