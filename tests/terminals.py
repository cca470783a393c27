"""A terminal for tests of interactive runs: a real pty pair with the command on its slave."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time


class Pty:
    """A caller's terminal for `stockade run -t` or `podman run -t`: a real pty pair, ARGV on its slave."""

    def __init__(self, argv: list[str], rows: int = 30, cols: int = 100) -> None:
        self.master, slave = os.openpty()
        self.resize(rows, cols)
        self.proc = subprocess.Popen(
            argv,
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        )
        os.close(slave)

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def expect(self, text: str, seconds: float = 15) -> str:
        """Read the terminal until TEXT appears; return everything read."""
        out, deadline = b"", time.monotonic() + seconds
        while text.encode() not in out:
            assert time.monotonic() < deadline, f"never saw {text!r} in {out!r}"
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    out += os.read(self.master, 4096)
                except OSError:
                    break
        return out.decode(errors="replace")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:  # a failed test: let the run clean up after itself first
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        os.close(self.master)
