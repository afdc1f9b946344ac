"""Finding the processes a test started: each carries the test's tag in its environment."""

from __future__ import annotations

from pathlib import Path


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag`` (zombies have none to read)."""
    needle = tag.encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
