"""Namespaces: OCI names -> clone flags, joining by path (setns) and creating (unshare)."""

from __future__ import annotations

import errno
import os

from . import syscalls as sc
from .errors import StockadeError
from .spec import Namespace
from .state import process_start_time

FLAGS = {
    "user": sc.CLONE_NEWUSER,
    "mount": sc.CLONE_NEWNS,
    "uts": sc.CLONE_NEWUTS,
    "ipc": sc.CLONE_NEWIPC,
    "network": sc.CLONE_NEWNET,
    "cgroup": sc.CLONE_NEWCGROUP,
    "pid": sc.CLONE_NEWPID,
    "time": sc.CLONE_NEWTIME,
}
# /proc/<pid>/ns/<name> for each OCI type.
PROC_NAMES = {
    "user": "user",
    "mount": "mnt",
    "uts": "uts",
    "ipc": "ipc",
    "network": "net",
    "cgroup": "cgroup",
    "pid": "pid",
    "time": "time",
}
# Order to join an existing container's namespaces (`exec`): user first so we hold capabilities
# over the others; mount last because it changes our root.
JOIN_ORDER = ("user", "cgroup", "ipc", "uts", "network", "pid", "time", "mount")


def open_paths(namespaces: list[Namespace], where: str = "linux.namespaces") -> list[tuple[str, int]]:
    """Open every namespace given by path (before anything changes our view of the filesystem)."""
    opened = []
    try:
        for i, ns in enumerate(namespaces):
            if ns.path:
                try:
                    opened.append((ns.type, os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)))
                except OSError as exc:
                    raise StockadeError(
                        f"cannot open {ns.type} namespace {ns.path!r}: {exc.strerror}",
                        where=f"{where}[{i}].path",
                    ) from None
    except BaseException:
        close_all(opened)
        raise
    return sorted(opened, key=lambda item: JOIN_ORDER.index(item[0]))


def join(opened: list[tuple[str, int]]) -> None:
    """setns into each opened namespace (user namespace first), closing the fds."""
    for kind, fd in opened:
        try:
            sc.setns(fd, FLAGS[kind])
        except OSError as exc:
            raise StockadeError(
                f"cannot join the {kind} namespace: {exc.strerror}", where="linux.namespaces"
            ) from None
        finally:
            os.close(fd)


def close_all(opened: list[tuple[str, int]]) -> None:
    for _, fd in opened:
        os.close(fd)


def new_flags(namespaces: list[Namespace], exclude: tuple[str, ...] = ()) -> int:
    flags = 0
    for ns in namespaces:
        if not ns.path and ns.type not in exclude:
            flags |= FLAGS[ns.type]
    return flags


def unshare(flags: int) -> None:
    try:
        sc.unshare(flags)
    except OSError as exc:
        names = [k for k, v in FLAGS.items() if v & flags]
        raise StockadeError(
            f"cannot create namespaces {', '.join(names)}: {exc.strerror}", where="linux.namespaces"
        ) from None


def inode(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{PROC_NAMES[kind]}").st_ino


def same_namespace(pid: int, kind: str) -> bool:
    """True when `pid` is already in our namespace of this kind (setns to our own user ns is EINVAL)."""
    return inode(pid, kind) == inode("self", kind)


def open_process(pid: int, start_time: int = 0) -> list[tuple[str, int]]:
    """Open the namespaces of a running process that differ from ours, in join order. With
    `start_time` (clock ticks, /proc/<pid>/stat) they must be that process's: a container init
    that exited and whose pid went to another process (the host's, say) is refused."""
    pidfd = -1
    try:
        if start_time:
            pidfd = os.pidfd_open(pid)  # holds on to this very process
        if start_time and process_start_time(pid) != start_time:
            raise OSError(errno.ESRCH, "the container's process has exited")
        opened = _open_namespaces(pid)
        if start_time and _exited(pidfd):
            close_all(opened)
            raise OSError(errno.ESRCH, "the container's process has exited")
    except OSError as exc:
        raise StockadeError(
            f"cannot open the namespaces of process {pid}: {exc.strerror}",
            hint="is the container still running?",
        ) from None
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return opened


def _exited(pidfd: int) -> bool:
    import select  # only `exec` needs it

    return bool(select.select([pidfd], [], [], 0)[0])  # a pidfd is readable once its process exits


def _open_namespaces(pid: int) -> list[tuple[str, int]]:
    opened = []
    try:
        for kind in JOIN_ORDER:
            if kind == "time" and not os.path.exists("/proc/self/ns/time"):
                continue  # kernel without time namespaces
            if not same_namespace(pid, kind):
                opened.append(
                    (kind, os.open(f"/proc/{pid}/ns/{PROC_NAMES[kind]}", os.O_RDONLY | os.O_CLOEXEC))
                )
    except OSError:
        close_all(opened)
        raise
    return opened


def set_time_offsets(offsets: dict[str, tuple[int, int]]) -> None:
    """Offsets of the time namespace our children will enter (writable until the first one does)."""
    text = "".join(f"{clock} {secs} {nanosecs}\n" for clock, (secs, nanosecs) in offsets.items())
    try:
        with open("/proc/self/timens_offsets", "w") as f:
            f.write(text)
    except OSError as exc:
        raise StockadeError(
            f"cannot set time namespace offsets: {exc.strerror}", where="linux.timeOffsets"
        ) from None


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH22x"  # struct ifreq: name, then ifr_flags in the union


def loopback_up() -> None:
    """A new network namespace starts with lo down; bring it up, as runc and crun do, so a
    workload can reach its own services on 127.0.0.1 (and nothing else: no other interface)."""
    import fcntl
    import struct

    fd = sc.socket(2, 2)  # AF_INET, SOCK_DGRAM; not through the socket module, a slow import
    try:
        _, flags = struct.unpack(_IFREQ, fcntl.ioctl(fd, SIOCGIFFLAGS, struct.pack(_IFREQ, b"lo", 0)))
        fcntl.ioctl(fd, SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | IFF_UP))
    finally:
        os.close(fd)
