"""`mist-fed profiles`: list the device profiles, or show one with its sources."""

from __future__ import annotations

import argparse
import json
from typing import Any


def run(args: argparse.Namespace) -> int:
    from mist_fed.device.profiles import (
        list_profiles,
        load_profile,
        profile_resources,
        profiles_dir,
    )

    names = args.names or list_profiles()
    profiles = [load_profile(n) for n in names]
    if args.json:
        print(json.dumps([p.as_dict() for p in profiles], indent=2))
        return 0
    print(f"device profiles in {profiles_dir()}")
    header = (
        f"{'name':<13}{'cores':>6}{'memory':>10}{'down':>11}{'up':>11}{'latency':>9}"
        f"{'compute':>12}{'threads':>9}"
    )
    print(header)
    print("-" * len(header))
    for p in profiles:
        plan = profile_resources(p, host_memory_mb=10**9)
        print(
            f"{p.name:<13}{p.cores:>6}{p.memory_mb:>7} MB{p.downlink_mbps:>6.1f} Mb/s"
            f"{p.uplink_mbps:>6.1f} Mb/s{p.latency_ms:>6.0f} ms{p.gflops:>6.1f} GF/s"
            f"{plan.torch_threads:>9}"
        )
    if args.sources:
        for p in profiles:
            print(f"\n{p.name}: {p.description}")
            for key, note in p.sources.items():
                print(f"  {key}: {note}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("profiles", help="list edge device profiles (cores, memory, link, compute)")
    p.add_argument("names", nargs="*", help="profile names or .toml paths (default: all)")
    p.add_argument("--sources", action="store_true", help="print the source note of every number")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)
