"""Thin ctypes wrappers for the Linux calls Python 3.11's os module lacks.

Every wrapper raises OSError(errno, strerror, path) on failure, like the os module does.
x86_64 syscall numbers are used where glibc has no wrapper (pivot_root, openat2, close_range).
"""

from __future__ import annotations

import ctypes
import os

from .linux import (  # noqa: F401 - the flags callers pass, re-exported
    AT_EMPTY_PATH,
    AT_RECURSIVE,
    CLONE_INTO_CGROUP,
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWTIME,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MNT_DETACH,
    MOUNT_ATTR_BY_FLAG,
    MOUNT_ATTR_IDMAP,
    MOVE_MOUNT_F_EMPTY_PATH,
    MOVE_MOUNT_T_EMPTY_PATH,
    MS_BIND,
    MS_DIRSYNC,
    MS_I_VERSION,
    MS_LAZYTIME,
    MS_MANDLOCK,
    MS_MOVE,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_NOSYMFOLLOW,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_SHARED,
    MS_SILENT,
    MS_SLAVE,
    MS_STRICTATIME,
    MS_SYNCHRONOUS,
    MS_UNBINDABLE,
    OPEN_TREE_CLONE,
    PR_CAP_AMBIENT,
    PR_CAP_AMBIENT_CLEAR_ALL,
    PR_CAP_AMBIENT_IS_SET,
    PR_CAP_AMBIENT_RAISE,
    PR_CAPBSET_DROP,
    PR_CAPBSET_READ,
    PR_GET_NO_NEW_PRIVS,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_DUMPABLE,
    PR_SET_KEEPCAPS,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    RESOLVE_NO_XDEV,
)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


# x86_64 syscall numbers for the calls glibc does not wrap
_SYS_PIVOT_ROOT = 155
_SYS_OPENAT2 = 437
_SYS_CLOSE_RANGE = 436
_SYS_SETNS = 308
_SYS_KEYCTL = 250
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
KEYCTL_JOIN_SESSION_KEYRING = 1


def _check(ret: int, what: str = "") -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what) if what else OSError(err, os.strerror(err))
    return ret


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_syscall(_SYS_PIVOT_ROOT, _b(new_root), _b(put_old)), new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), "setdomainname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)
        ),
        "prctl",
    )


def cap_ambient_raise(cap: int) -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap)


def cap_ambient_clear_all() -> None:
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def personality(persona: int) -> None:
    if _libc.personality(ctypes.c_ulong(persona)) == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), "personality")


def set_dumpable(on: bool) -> None:
    prctl(PR_SET_DUMPABLE, 1 if on else 0)


def join_session_keyring() -> int:
    """keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL): a new anonymous session keyring; its serial."""
    return _check(_syscall(_SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, None), "keyctl")


def set_keepcaps(on: bool) -> None:
    prctl(PR_SET_KEEPCAPS, 1 if on else 0)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def socket(family: int, kind: int, protocol: int = 0) -> int:
    """A socket fd (for ioctls) without the socket modules' imports."""
    return _check(_libc.socket(family, kind | os.O_CLOEXEC, protocol), "socket")


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): `resolve=RESOLVE_IN_ROOT` makes `path` (even "..", symlinks) stay under dirfd."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _check(_syscall(_SYS_OPENAT2, dirfd, _b(path), ctypes.byref(how), ctypes.sizeof(how)), path)


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def malloc_for_bulk_io() -> None:
    """Let glibc's malloc serve megabyte buffers from its heap and keep freed memory for reuse,
    instead of a fresh mmap (and a page fault per 4 KiB) for each: a pull copies every layer
    through such buffers several times. For short-lived commands only (bench/README.md)."""
    _libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
    _libc.mallopt(M_TRIM_THRESHOLD, 128 << 20)


def idmapped_tree(path: str, userns_fd: int) -> int:
    """A detached copy of the mount tree at PATH (open_tree OPEN_TREE_CLONE) whose file owners are
    seen through USERNS_FD's id maps (mount_setattr MOUNT_ATTR_IDMAP, Linux 5.12+): a file owned
    by 0 on disk shows as the host id the namespace maps 0 to. Returns its fd; attach it with
    move_mount."""
    return _tree(path, AT_RECURSIVE, _MountAttr(attr_set=MOUNT_ATTR_IDMAP, userns_fd=userns_fd))


def clone_tree(path: str, recursive: bool) -> int:
    """A detached copy of the mount at PATH (with the mounts below it when RECURSIVE): what a
    bind would show, held by an fd (close-on-exec) to attach anywhere with move_mount. The copy
    of a shared mount would be the host's peer, so it is made a slave: host mounts still reach
    it, none made on it reach the host."""
    return _tree(path, AT_RECURSIVE if recursive else 0, _MountAttr(propagation=MS_SLAVE))


def restricted_tree(path: str, flags: int) -> int:
    """A detached copy of the whole mount tree at PATH, a slave like clone_tree's, with the
    mount(2) FLAGS among MS_RDONLY/NOSUID/NODEV/NOEXEC set on every mount in it, not only the top."""
    attrs = sum(attr for flag, attr in MOUNT_ATTR_BY_FLAG.items() if flags & flag)
    return _tree(path, AT_RECURSIVE, _MountAttr(attr_set=attrs, propagation=MS_SLAVE))


def _tree(path: str, recursive: int, attr: _MountAttr) -> int:
    """open_tree(OPEN_TREE_CLONE) of PATH, then mount_setattr ATTR on the copy; its fd."""
    fd = _check(_syscall(_SYS_OPEN_TREE, -100, _b(path), OPEN_TREE_CLONE | os.O_CLOEXEC | recursive), path)
    try:
        _check(_syscall(_SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | recursive, ctypes.byref(attr),
                        ctypes.sizeof(attr)), path)
    except OSError:
        os.close(fd)
        raise
    return fd


def move_mount(fd: int, target: str | int) -> None:
    """Attach the detached mount FD at TARGET: a path, or an fd (O_PATH) naming the mount point
    (not /proc/self/fd/N, whose magic link move_mount would not follow)."""
    if isinstance(target, int):
        flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
        _check(_syscall(_SYS_MOVE_MOUNT, fd, b"", target, b"", flags), f"fd {target}")
    else:
        _check(_syscall(_SYS_MOVE_MOUNT, fd, b"", -100, _b(target), MOVE_MOUNT_F_EMPTY_PATH), target)


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]  # struct statfs: 120 bytes


def fs_type(fd: int) -> int:
    """fstatfs(2)'s f_type: which filesystem `fd` is on (PROC_SUPER_MAGIC, DEVPTS_SUPER_MAGIC...)."""
    buf = _StatFs()
    _check(_libc.fstatfs(fd, ctypes.byref(buf)), "fstatfs")
    return buf.f_type


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    _check(_syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(last), 0), "close_range")


def close_fds_from(first: int, keep: tuple[int, ...] = ()) -> None:
    """Close every descriptor from `first` up, except those in `keep`."""
    for fd in sorted(k for k in keep if k >= first):
        if fd > first:
            close_range(first, fd - 1)
        first = fd + 1
    close_range(first)


_SYS_CLONE3 = 435


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
                     "tls", "set_tid", "set_tid_size", "cgroup")
    ]


def fork_into_cgroup(cgroup_fd: int, namespaces: int = 0) -> int:
    """os.fork(), but the child is born in the cgroup2 directory `cgroup_fd` (clone3 with
    CLONE_INTO_CGROUP, Linux 5.7+), as crun does. Writing a pid into cgroup.procs instead takes
    the kernel's global threadgroup lock for writing, which waits for an RCU grace period:
    the largest single cost of a container start (bench/README.md).

    PyDLL keeps the GIL across the call and the PyOS_* hooks do what os.fork does around fork(2).
    Only for single-threaded callers: glibc's fork bookkeeping (atfork handlers, the cached thread
    id) is skipped, which matters only when other threads exist."""
    pyapi = ctypes.pythonapi
    # `namespaces`: CLONE_NEW* flags; the child is then born in new namespaces too (PID 1 of a new
    # pid namespace), which saves the unshare-and-fork-again of a second stage.
    args = _CloneArgs(flags=CLONE_INTO_CGROUP | namespaces, exit_signal=17, cgroup=cgroup_fd)  # SIGCHLD
    call = ctypes.PyDLL(None, use_errno=True).syscall
    call.restype = ctypes.c_long
    pyapi.PyOS_BeforeFork()
    pid = call(_SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:
        pyapi.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    pyapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, os.strerror(err))
    return pid
