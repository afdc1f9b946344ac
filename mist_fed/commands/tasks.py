"""`mist-fed tasks`: every registered task, its classes, and whether its data is here."""

from __future__ import annotations

import argparse
import json
from typing import Any


def run(args: argparse.Namespace) -> int:
    from mist_fed.assets.defaults import default_backbone, default_task
    from mist_fed.data import registered_tasks, task_entry

    rows = []
    for name in registered_tasks():
        entry = task_entry(name)
        avail = entry.availability()
        rows.append(
            {
                "task": name,
                "classes": entry.num_classes,
                "available": avail.available,
                "downloadable": avail.downloadable,
                "where": avail.where,
                "how": avail.how,
                "description": entry.description,
            }
        )
    if args.json:
        print(
            json.dumps(
                {
                    "default_task": default_task(),
                    "default_backbone": default_backbone(),
                    "tasks": rows,
                },
                indent=2,
            )
        )
        return 0
    print(f"{'task':<15}{'classes':>8}  {'here':<6}where")
    for r in rows:
        here = "yes" if r["available"] else ("dl" if r["downloadable"] else "no")
        classes = "-" if r["classes"] is None else str(r["classes"])
        print(f"{r['task']:<15}{classes:>8}  {here:<6}{r['where']}")
        if not r["available"] and r["how"]:
            print(f"{'':<31}to get it: {r['how']}")
    print(f"\ndefault task: {default_task()}   default backbone: {default_backbone()}")
    print(
        "protocols: vtab-1k (800 train + 200 val, official test or a fixed 20% where there is "
        "none), few-shot (1/2/4/8/16), full"
    )
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("tasks", help="registered tasks and whether their data is here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)
