"""What `stockade image pull` shows while it works: a bar per layer on a terminal (bytes, rate,
ETA), plain lines when the output is not a terminal (a log), nothing with --quiet.

Layers are fetched by several threads at once, so every report takes the lock and a terminal
is redrawn at most ten times a second.
"""

from __future__ import annotations

import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

WIDTH = 24  # characters of a bar
REDRAW = 0.1  # seconds between redraws of a terminal


class Bars:
    def __init__(self, out: TextIO, terminal: bool) -> None:
        self.out, self.terminal = out, terminal
        self.lock = threading.Lock()
        self.rows: dict[str, str] = {}  # digest -> its line, in the order first heard of
        self.started: dict[str, float] = {}
        self.drawn, self.last = 0, 0.0

    def __call__(self, digest: str, phase: str, done: int, total: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = self.started.setdefault(digest, now)
            if not self.terminal:
                if phase != "fetch":
                    self.out.write(f"{digest[:19]} {phase} {size(total)}\n")
                    self.out.flush()
                return
            self.rows[digest] = _line(digest, phase, done, total, now - start)
            if phase != "fetch" or now - self.last >= REDRAW:
                self._draw(now)

    def close(self) -> None:
        with self.lock:
            if self.terminal and self.rows:
                self._draw(time.monotonic())

    def _draw(self, now: float) -> None:
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "".join(f"\x1b[2K{row}\n" for row in self.rows.values()))
        self.out.flush()
        self.drawn, self.last = len(self.rows), now


def _line(digest: str, phase: str, done: int, total: int, elapsed: float) -> str:
    if phase != "fetch":
        return f"{digest[:19]}  {phase:<8} {size(total)}"
    filled = WIDTH * done // total if total else 0
    rate = done / elapsed if elapsed > 0 else 0.0  # from the first chunk: 0 until a second one
    speed = f"{size(int(rate))}/s" if rate else ""
    eta = f"ETA {(total - done) / rate:.0f}s" if rate and total > done else ""
    bar = "#" * filled + "." * (WIDTH - filled)
    return f"{digest[:19]}  [{bar}] {size(done)} / {size(total)}  {speed}  {eta}"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
