"""/dev inside the container: the default nodes, linux.devices, and the standard symlinks.

Outside a user namespace nodes are made with mknod(2). Inside one mknod is refused by the
kernel, so the host's node at the same path is bind-mounted over an empty file (as runc does).
"""

from __future__ import annotations

import os
import stat

from . import syscalls as sc
from .errors import StockadeError
from .mounts import fd_path, open_in_root
from .spec import Device

DEFAULT_DEVICES = (
    Device("/dev/null", "c", 1, 3, 0o666, 0, 0),
    Device("/dev/zero", "c", 1, 5, 0o666, 0, 0),
    Device("/dev/full", "c", 1, 7, 0o666, 0, 0),
    Device("/dev/random", "c", 1, 8, 0o666, 0, 0),
    Device("/dev/urandom", "c", 1, 9, 0o666, 0, 0),
    Device("/dev/tty", "c", 5, 0, 0o666, 0, 0),
)
SYMLINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
_KIND = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


def setup(rootfd: int, devices: list[Device], in_userns: bool) -> None:
    asked = {d.path for d in devices}
    wanted = [d for d in DEFAULT_DEVICES if d.path not in asked]
    for i, dev in enumerate(wanted + list(devices)):
        where = "linux.devices" if i < len(wanted) else f"linux.devices[{i - len(wanted)}]"
        try:
            (_bind_host if in_userns else _mknod)(rootfd, dev)
        except OSError as exc:
            raise StockadeError(f"cannot create {dev.path}: {exc.strerror}", where=where) from None
    _symlinks(rootfd)


def _parent(rootfd: int, path: str) -> tuple[int, str]:
    parent, _, name = path.rpartition("/")
    return open_in_root(rootfd, parent, "dir"), name


def _mknod(rootfd: int, dev: Device) -> None:
    pfd, name = _parent(rootfd, dev.path)
    try:
        try:
            os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        old = os.umask(0)
        try:
            mode = (0o666 if dev.file_mode is None else dev.file_mode) | _KIND[dev.type]
            os.mknod(name, mode, os.makedev(dev.major, dev.minor), dir_fd=pfd)
        finally:
            os.umask(old)
        os.chown(
            name,
            0 if dev.uid is None else dev.uid,
            0 if dev.gid is None else dev.gid,
            dir_fd=pfd,
            follow_symlinks=False,
        )
    finally:
        os.close(pfd)


def _bind_host(rootfd: int, dev: Device) -> None:
    st = os.stat(dev.path)  # the host's node with the same path
    if stat.S_IFMT(st.st_mode) != _KIND[dev.type] or (
        dev.type != "p" and st.st_rdev != os.makedev(dev.major, dev.minor)
    ):
        raise OSError(
            0, f"the host's {dev.path} is not the requested device (needed to bind it in a user namespace)"
        )
    fd = open_in_root(rootfd, dev.path, "file")
    try:
        sc.mount(dev.path, fd_path(fd), None, sc.MS_BIND)
    finally:
        os.close(fd)


def _symlinks(rootfd: int) -> None:
    devfd = open_in_root(rootfd, "/dev", "dir")
    try:
        for name, target in SYMLINKS:
            try:
                os.symlink(target, name, dir_fd=devfd)
            except FileExistsError:
                pass
        # /dev/ptmx must reach the container's own devpts instance, never the host's.
        try:
            os.unlink("ptmx", dir_fd=devfd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise StockadeError("/dev/ptmx is a directory in the rootfs", where="linux.devices") from None
        os.symlink("pts/ptmx", "ptmx", dir_fd=devfd)
    finally:
        os.close(devfd)
