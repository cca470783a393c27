"""What every benchmark ends with: its results as JSON on stdout, and in a file when asked."""

from __future__ import annotations

import json
from pathlib import Path


def report(result: dict, path: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text)
    return 0
