"""Subcommands of `mist-fed`: one module each, with ``register(subparsers)`` adding its parser.

A command parses its flags and calls one library function; new commands add a module here
and one line to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib

# Subcommand modules under mist_fed/commands/, in help order; each has register(subparsers).
COMMANDS = ("inspect", "profiles", "tasks", "cloud", "client", "bench", "simulate", "compare")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mist-fed", description="Separated tuning of frozen cloud ViTs by tiny edge networks."
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(f"mist_fed.commands.{module}").register(sub)
    return parser
