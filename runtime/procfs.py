"""Writes into /proc from inside the container, made only to the real procfs file.

After pivot_root the container's /proc is whatever the bundle mounted there, and anything can
have been mounted over a file below it (a tmpfs at /proc/sys, a host file bound onto
/proc/sys/kernel/x). A sysctl written there would silently not apply, or apply somewhere else
(CVE-2019-16884, CVE-2019-19921). So /proc must be a procfs, and the path below it is resolved
with openat2 without crossing a mount or following a symlink: the file written is the one the
kernel keeps at that name in the container's own procfs, or the write is refused.
"""

from __future__ import annotations

import os

from . import syscalls as sc
from .errors import StockadeError

PROC_SUPER_MAGIC = 0x9FA0


def open_file(path: str, flags: int, where: str) -> int:
    """Open `path` (absolute, under /proc) in the container's procfs; an fd (close-on-exec)."""
    relative = path.removeprefix("/proc/")
    if relative == path:
        raise ValueError(path)
    root = _open_root(where)
    try:
        how = sc.RESOLVE_NO_XDEV | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS
        try:
            return sc.openat2(root, relative, flags, how)
        except OSError as exc:
            reason = "something is mounted over it" if exc.errno == 18 else exc.strerror  # EXDEV
            raise StockadeError(f"cannot open {path}: {reason}", where=where) from None
    finally:
        os.close(root)


def _open_root(where: str) -> int:
    try:
        root = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StockadeError(f"cannot open /proc: {exc.strerror}", where=where) from None
    if sc.fs_type(root) != PROC_SUPER_MAGIC:
        os.close(root)
        raise StockadeError("/proc in the container is not a procfs", where=where, hint="mount proc at /proc")
    return root


def check_root(where: str) -> None:
    """/proc is a procfs (so /proc/self/fd/N names our own descriptor N)."""
    os.close(_open_root(where))


def write(path: str, text: str, where: str) -> None:
    fd = open_file(path, os.O_WRONLY, where)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def self_path(name: str) -> str:
    """/proc/<our pid>/name: "self" is a symlink, which open_file does not follow."""
    return f"/proc/{os.getpid()}/{name}"
