"""Counting a secret's appearances: in text, in files under a folder, in running processes.

Each function returns a count (0 when the secret is nowhere), so a test asserts it and prints
what it counted, never a figure written by hand.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path


def in_text(text: str, secrets: Iterable[str]) -> int:
    """Occurrences of every secret in ``text``."""
    return sum(text.count(s) for s in secrets)


def in_files(root: Path, secrets: Iterable[str]) -> tuple[int, int]:
    """``(occurrences, files read)`` of every secret in every file under ``root``, as bytes."""
    needles = [s.encode() for s in secrets]
    found = files = 0
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:  # a file that went while we looked
                continue
            files += 1
            found += sum(data.count(n) for n in needles)
    return found, files


def in_processes(secrets: Iterable[str]) -> tuple[int, int]:
    """``(occurrences, processes read)``: every secret in the command line of every process
    this user may read (what ``ps`` shows) and its environment (what ``ps e`` shows)."""
    needles = [s.encode() for s in secrets]
    found = procs = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            data = (d / "cmdline").read_bytes() + (d / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        procs += 1
        found += sum(data.count(n) for n in needles)
    return found, procs


@contextlib.contextmanager
def watching_processes(secrets: Iterable[str], every_s: float = 0.5) -> Iterator[dict[str, int]]:
    """While inside: :func:`in_processes` every ``every_s`` seconds, in a thread. Yields the
    counts so far: ``found`` (occurrences over every scan), ``scans``, ``max_procs``."""
    secrets = list(secrets)
    seen = {"found": 0, "scans": 0, "max_procs": 0}
    stop = threading.Event()

    def watch() -> None:
        while True:
            found, procs = in_processes(secrets)
            seen["found"] += found
            seen["scans"] += 1
            seen["max_procs"] = max(seen["max_procs"], procs)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)
