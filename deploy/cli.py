"""``inferpool serve``: start a pool and its OpenAI-compatible HTTP ingress."""

from __future__ import annotations

import argparse
from typing import Any


def add_serve_parser(sub: Any) -> None:
    """Register the ``serve`` subcommand on the CLI's subparsers."""
    sv = sub.add_parser("serve", help="start a pool and its OpenAI-compatible HTTP ingress")
    sv.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    raise SystemExit("inferpool serve: not available yet")
