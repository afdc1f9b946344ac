"""Subcommands of `mist-fed`: one module each, with ``register(subparsers)`` adding its parser.

A command parses its flags and calls one library function; new commands add a module here
and one line to ``COMMANDS`` in :mod:`mist_fed.cli`.
"""
