"""process.terminal: a pty from the container's own devpts, master sent over --console-socket.

Same protocol as runc: connect to the AF_UNIX stream socket, send one message whose data is
the pty name and whose SCM_RIGHTS carries the master fd. The slave becomes the controlling
terminal and stdio of the workload and is bind-mounted over /dev/console.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from . import syscalls as sc
from .errors import StockadeError
from .spec import ConsoleSize

TIOCSPTLCK = 0x40045431
TIOCGPTN = 0x80045430
TIOCGPTPEER = 0x5441
TIOCSWINSZ = 0x5414
TIOCSCTTY = 0x540E
DEVPTS_SUPER_MAGIC = 0x1CD1


def connect(path: str) -> socket.socket:
    """Connect early, while the socket path is still reachable and we are host root."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise StockadeError(
            f"cannot connect to console socket {path!r}: {exc.strerror}", where="--console-socket"
        ) from None
    return sock


def open_pty(ptmx: str, size: ConsoleSize | None) -> tuple[int, int, int]:
    """Open a pty pair from `ptmx`; returns (master, slave, pty number)."""
    try:
        master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise StockadeError(
            f"cannot open {ptmx}: {exc.strerror}",
            where="process.terminal",
            hint="a terminal needs a devpts mount at /dev/pts (newinstance,ptmxmode=0666)",
        ) from None
    try:
        if sc.fs_type(master) != DEVPTS_SUPER_MAGIC:  # a device node the image brought along
            raise OSError(errno.ENOTTY, f"{ptmx} is not on a devpts filesystem")
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        number = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, struct.pack("I", 0)))[0]
        # TIOCGPTPEER opens the slave through the master: no path lookup to race with.
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if size is not None and size.height and size.width:
            fcntl.ioctl(master, TIOCSWINSZ, struct.pack("HHHH", size.height, size.width, 0, 0))
    except OSError as exc:
        os.close(master)
        raise StockadeError(f"cannot set up the pty: {exc.strerror}", where="process.terminal") from None
    return master, slave, number


def send_master(sock: socket.socket, master: int, name: str) -> None:
    try:
        socket.send_fds(sock, [name.encode()], [master])
    except OSError as exc:
        raise StockadeError(
            f"cannot send the pty master over the console socket: {exc.strerror}", where="--console-socket"
        ) from None
    finally:
        os.close(master)
        sock.close()


def make_controlling(slave: int) -> None:
    """The pty slave as controlling terminal (of a new session, unless we lead one) and fds 0-2."""
    if os.getsid(0) != os.getpid():
        os.setsid()
    fcntl.ioctl(slave, TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)


def recv_master(sock: socket.socket) -> tuple[str, int]:
    """Receiver side (tests, `run`): accept one pty master from a console socket connection."""
    msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    if not fds:
        raise StockadeError("no pty master received on the console socket")
    return msg.decode(), fds[0]
