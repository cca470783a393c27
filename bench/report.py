"""What every benchmark starts and ends with: its command line (with --json, run as root), and its
results as JSON on stdout, and in a file when asked."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: DOC's first line, --json; the script adds its own options."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--json", help="also write the results here")
    return p


def as_root(p: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed command line; a benchmark not run as root stops here."""
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    return args


def report(result: dict, path: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
    return 0
