"""The BPF cache directory: program bytecode the agent compiled with bcc (loader) and compiled
policies (policy), each file named by a hash of everything it was made from.

STOCKADE_BPF_CACHE moves it (tests, benchmarks). A cache that cannot be read or written costs
a recompile and nothing else.
"""

from __future__ import annotations

import os

from stockade.runtime.files import write_atomic


def directory() -> str:
    return os.environ.get("STOCKADE_BPF_CACHE") or "/var/cache/stockade/bpf"


def read(name: str) -> str:
    """A cache file's text; OSError when it is not there."""
    with open(os.path.join(directory(), name)) as f:
        return f.read()


def write(name: str, text: str) -> None:
    """Replace a cache file atomically; a directory that cannot be made or written is left alone."""
    try:
        os.makedirs(directory(), exist_ok=True)
        write_atomic(os.path.join(directory(), name), text, mode=0o644)
    except OSError:
        pass
