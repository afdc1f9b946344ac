"""`mist-fed`: the entry point. Every parser lives in :mod:`mist_fed.commands` (one module per
subcommand); this module runs the chosen one and turns errors into one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

from mist_fed.commands import build_parser
from mist_fed.errors import MistError

Handler = Callable[[argparse.Namespace], int]
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what shells report for Ctrl-C
STUCK_GRACE_S = 10.0
log = logging.getLogger("mist_fed.cli")


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
