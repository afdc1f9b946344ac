"""`mist-fed compare`: the paper's Table 1 through the pipeline (also ``python simulations/compare.py``).

Flags, behaviour and output are those of :mod:`mist_fed.experiments.cli`: this command parses
with its parser and runs its ``main``. That parser is built only when ``compare`` is the
command, since its imports (datasets, the trainer, pandas) take seconds that the other
commands should not pay.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

ARGV = "compare_argv"


class _CompareParser(argparse.ArgumentParser):
    """Stands in for experiments.cli's parser and hands the parsing over to it on first use."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        from mist_fed.experiments.cli import parser

        real = parser()
        real.prog = self.prog
        ns, rest = real.parse_known_args(args, namespace)  # --help prints and exits here
        setattr(ns, ARGV, list(args or []))
        ns.handler = run
        return ns, rest


def run(args: argparse.Namespace) -> int:
    from mist_fed.experiments.cli import main

    # `mist-fed` configured logging (WARNING) before main's own basicConfig, which is then a
    # no-op: give the run main's levels, INFO (progress) or DEBUG with -v.
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
    return main(getattr(args, ARGV), prog="mist-fed compare")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        add_help=False,  # --help is the compare parser's own
        help="the paper's methods side by side through the pipeline (simulations/compare.py)",
    )
    p.__class__ = _CompareParser  # add_parser takes no parser class of its own
