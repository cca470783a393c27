"""What the short-lived command lines share: a lean argparse set-up and an exit without teardown."""

from __future__ import annotations

import argparse
import os
import sys


def lean_argparse() -> None:
    """argparse looks up translations (gettext, which imports locale and searches for catalogues)
    for every message and asks shutil for the terminal width when it builds a parser: ~3 ms of
    every container start. Python ships no catalogues for argparse's messages, so plain strings
    are what users see anyway."""
    argparse._ = str  # type: ignore[attr-defined]
    argparse.ngettext = lambda singular, plural, n: singular if n == 1 else plural  # type: ignore[attr-defined]


def formatter(prog: str) -> argparse.HelpFormatter:
    """A help formatter with a fixed width: no shutil import (help output is rare, starts are not)."""
    return argparse.HelpFormatter(prog, width=min(int(os.environ.get("COLUMNS", "100") or 100), 120))


def fast_exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
