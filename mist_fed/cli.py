"""`mist-fed`: the command line. Each subcommand lives in :mod:`mist_fed.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

from mist_fed.errors import MistError

Handler = Callable[[argparse.Namespace], int]
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report for Ctrl-C
STUCK_GRACE_S = 10.0
log = logging.getLogger("mist_fed.cli")

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
    except KeyboardInterrupt as e:  # commands clean up on their way out (see fleet.runtime.session)
        print(f"mist-fed: interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        _exit_if_stuck(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED


def _exit_if_stuck(code: int, grace_s: float = STUCK_GRACE_S) -> None:
    """After Ctrl-C, end the process even if a library thread is stuck in a blocking call.

    The interpreter joins every non-daemon thread before it exits; a thread blocked in C code
    (a Ray or gRPC call whose peer is gone) would keep it running after Ctrl-C. Such threads
    get ``grace_s`` in all; then the process exits at once, its cleanup already done.
    """
    me = threading.current_thread()
    end = time.monotonic() + grace_s
    for t in threading.enumerate():
        if t is not me and not t.daemon:
            t.join(max(0.0, end - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not me and not t.daemon]
    if stuck:
        log.warning("exiting without waiting for stuck thread(s): %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
