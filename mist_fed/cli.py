"""`mist-fed`: the command line. Each subcommand lives in :mod:`mist_fed.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from mist_fed.errors import MistError

Handler = Callable[[argparse.Namespace], int]

# Subcommand modules under mist_fed/commands/, in help order; each has register(subparsers).
COMMANDS = ("inspect", "profiles", "tasks", "cloud", "client", "bench", "simulate")


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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except MistError as e:
        print(f"mist-fed: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
