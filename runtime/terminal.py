"""`stockade run -t`: the container's pty on the caller's terminal.

The container gets a pty from its own devpts (console.open_pty, in the init); the master comes
back over a console socket only this process can reach, as with `--console-socket`. The caller's
terminal goes raw so every key (Ctrl-C, Ctrl-Z) reaches the container's line discipline, where
job control happens; SIGWINCH copies the caller's size onto the master, and the kernel signals
the container's foreground process group. Output is copied until the last holder of the pty's
other end is gone.
"""

from __future__ import annotations

import _signal as signal
import fcntl
import os
import select
import socket
import struct
import tempfile
import termios
import threading

from . import console
from ._lite.contextlib import suppress
from .errors import StockadeError

ACCEPT_SECONDS = 10.0  # the init sends the master during create; create has returned by now
DRAIN_SECONDS = 2.0  # after the container exits, for output still in the pty


def size_of(fd: int) -> tuple[int, int] | None:
    """(rows, columns) of the terminal on FD, None when it is not a terminal."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return rows, cols


class Terminal:
    """Owns the console socket, then the master, the pump thread and the caller's tty mode."""

    def __init__(self, stdin: bool) -> None:
        self.stdin = stdin  # -i: the caller's input goes to the container
        self.dir = tempfile.mkdtemp(prefix="stockade-console-")  # 0700: no one else can connect
        self.path = os.path.join(self.dir, "console.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.master = -1
        self.saved_mode: list | None = None
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC)
        self.pump: threading.Thread | None = None

    def attach(self) -> None:
        """After create: take the master, go raw, start copying."""
        self.listener.settimeout(ACCEPT_SECONDS)
        try:
            conn, _ = self.listener.accept()
        except TimeoutError:
            raise StockadeError("the container never sent its pty", where="--tty") from None
        with conn:
            _, self.master = console.recv_master(conn)
        self.resize()
        if self.stdin and os.isatty(0):
            self.saved_mode = termios.tcgetattr(0)
            raw = termios.tcgetattr(0)
            raw[0] &= ~(termios.BRKINT | termios.ICRNL | termios.INPCK | termios.ISTRIP | termios.IXON)
            raw[1] &= ~termios.OPOST
            raw[3] &= ~(termios.ECHO | termios.ICANON | termios.IEXTEN | termios.ISIG)
            raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
            termios.tcsetattr(0, termios.TCSAFLUSH, raw)
        self.pump = threading.Thread(target=self._pump, name="stockade-tty", daemon=True)
        self.pump.start()

    def resize(self, *_: object) -> None:
        """SIGWINCH handler: the caller's size onto the container's pty."""
        size = size_of(0) or size_of(1)
        if size and self.master >= 0:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))

    def _pump(self) -> None:
        # Every signal goes to the main thread, whose handlers resize the pty and forward the rest:
        # one delivered here would wait there until the container exits.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        readers = [self.master, self.stop_r] + ([0] if self.stdin else [])
        while True:
            ready, _, _ = select.select(readers, [], [])
            if self.master in ready:
                data = _read(self.master)  # b"" once every holder of the other end is gone
                if not data or not _write_all(1, data):
                    return
            if 0 in ready:
                data = _read(0)
                if not data or not _write_all(self.master, data):
                    readers.remove(0)  # stdin ended; the container keeps running
            if self.stop_r in ready:
                return

    def close(self) -> None:
        """After the container is gone: drain, give the caller its terminal back, remove the socket."""
        self.listener.close()
        os.unlink(self.path)
        os.rmdir(self.dir)
        if self.pump is not None:
            self.pump.join(DRAIN_SECONDS)
            os.write(self.stop_w, b"x")
            self.pump.join(DRAIN_SECONDS)
        if self.saved_mode is not None:
            with suppress(OSError):  # the caller's terminal may be gone (hung up)
                termios.tcsetattr(0, termios.TCSAFLUSH, self.saved_mode)
        for fd in (self.master, self.stop_r, self.stop_w):
            if fd >= 0:
                os.close(fd)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: a terminal that hung up
        return b""


def _write_all(fd: int, data: bytes) -> bool:
    """False when FD is gone (the caller's terminal hung up, the pty closed)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        return False
    return True
