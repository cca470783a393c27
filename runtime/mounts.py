"""The container's filesystem: rootfs bind, spec mounts, pivot_root, masked/readonly paths.

Destinations are resolved with openat2(RESOLVE_IN_ROOT) under the rootfs, so a symlink in the
image (`/proc -> /`, `../../etc`) can never make a mount land outside it; the mount then
targets the opened fd through /proc/self/fd.
"""

from __future__ import annotations

import errno
import os
import stat

from . import mountinfo
from . import syscalls as sc
from .errors import StockadeError
from .spec import MOUNT_PROPAGATION, Mount

_ATIME = sc.MS_NOATIME | sc.MS_NODIRATIME | sc.MS_RELATIME | sc.MS_STRICTATIME
# statvfs f_flag bits -> mount flags that a user namespace locks on a remount.
_ST_TO_MS = (
    (2, sc.MS_NOSUID),
    (4, sc.MS_NODEV),
    (8, sc.MS_NOEXEC),
    (1024, sc.MS_NOATIME),
    (2048, sc.MS_NODIRATIME),
    (4096, sc.MS_RELATIME),
)


def prepare_root(rootfs: str, propagation: str) -> None:
    """Stop mount events leaking to the host (unless the spec asks for shared mounts, which
    propagate both ways as with runc), then make the rootfs a mount point of its own."""
    if propagation in ("shared", "rshared"):
        sc.mount(None, "/", None, MOUNT_PROPAGATION[propagation])
        _make_private(mountinfo.containing(rootfs))
    else:
        private = propagation in ("private", "rprivate")
        sc.mount(None, "/", None, sc.MS_REC | (sc.MS_PRIVATE if private else sc.MS_SLAVE))
    try:
        sc.mount(rootfs, rootfs, None, sc.MS_BIND | sc.MS_REC)
    except OSError as exc:
        raise StockadeError(
            f"cannot bind the rootfs onto itself: {exc.strerror}", where="root.path"
        ) from None


def _make_private(parent: mountinfo.Mount) -> None:
    """A shared mount under the rootfs would copy the rootfs bind (and everything the container
    mounts on it) back to the host, and pivot_root refuses a new root whose parent is shared."""
    if parent.shared:
        sc.mount(None, parent.point, None, sc.MS_PRIVATE)


def open_root(rootfs: str) -> int:
    return os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_in_root(rootfd: int, path: str, create: str = "") -> int:
    """O_PATH fd for `path` resolved inside the root; create="dir"/"file" makes it (and parents)."""
    rel = path.strip("/") or "."
    how = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
    try:
        return sc.openat2(rootfd, rel, os.O_PATH, how)
    except FileNotFoundError:
        if not create:
            raise
    parent, _, name = rel.rpartition("/")
    pfd = open_in_root(rootfd, parent, "dir") if parent else os.dup(rootfd)
    try:
        if create == "dir":
            os.mkdir(name, 0o755, dir_fd=pfd)
        else:
            os.close(
                os.open(name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=pfd)
            )
    except FileExistsError:
        pass  # a dangling symlink: the reopen below reports it
    finally:
        os.close(pfd)
    try:
        return sc.openat2(rootfd, rel, os.O_PATH, how)
    except FileNotFoundError:
        raise StockadeError(f"{path!r} is a dangling symlink in the rootfs", hint="fix the image") from None


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def locked_flags(path: str, wanted: int) -> int:
    """Flags a bind remount must keep (a user namespace refuses to clear them): nosuid/nodev/noexec,
    and the current atime mode unless the spec chose one."""
    current = 0
    f_flag = os.statvfs(path).f_flag
    for st, ms in _ST_TO_MS:
        if f_flag & st:
            current |= ms
    keep = current & (sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    if not wanted & _ATIME:
        keep |= current & _ATIME
    return keep


def remount_bind(path: str, flags: int) -> None:
    flags &= ~(sc.MS_BIND | sc.MS_REC | sc.MS_REMOUNT)
    sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | flags | locked_flags(path, flags))


def detach_sources(mounts: list[Mount], bundle: str, root_ids: tuple[int, int] | None) -> dict[int, int]:
    """Bind sources the container's mapped root could not reach ({mount index: fd}), taken by the
    init while it is still host root, before it enters the user namespace: kubelet's volumes
    live below /var/lib/kubelet (0700). Each is a detached copy of the source's mount tree
    (open_tree OPEN_TREE_CLONE) that mount_all attaches in place of a bind by path.

    Only where needed: mounts below such a copy are not locked to it in the user namespace as a
    bind's are (the kernel locks only what a namespace copy brings in), so the container could
    unmount them and see the directory under them."""
    detached: dict[int, int] = {}
    try:
        for i, m in enumerate(mounts):
            source = os.path.join(bundle, m.source)
            if m.type == "bind" and os.path.exists(source) and not _reachable(source, root_ids):
                try:
                    detached[i] = sc.clone_tree(source, recursive=bool(m.flags & sc.MS_REC))
                except OSError as exc:
                    raise StockadeError(f"cannot take the bind source {source}: {exc.strerror}",
                                        where=f"mounts[{i}]") from None
    except BaseException:
        for fd in detached.values():
            os.close(fd)
        raise
    return detached


def _reachable(path: str, ids: tuple[int, int] | None) -> bool:
    """Whether uid/gid IDS (host ids; None: unmapped root, the overflow ids) may search every
    directory on PATH's way."""
    uid, gid = ids if ids is not None else (-1, -1)
    parts = os.path.realpath(path).split("/")[1:-1]
    for n in range(len(parts) + 1):
        st = os.stat("/" + "/".join(parts[:n]))
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return False
    return True


def mount_all(mounts: list[Mount], rootfd: int, bundle: str, cgroups: dict[str, str],
              detached: dict[int, int] | None = None) -> None:
    """`cgroups`: hierarchy name -> the container's cgroup directory (see _mount_cgroup);
    `detached`: detach_sources' fds, each attached and closed here."""
    detached = detached or {}
    try:
        for i, m in enumerate(mounts):
            try:
                _mount_one(m, rootfd, bundle, cgroups, detached.pop(i, None))
            except StockadeError as exc:
                raise StockadeError(exc.what, where=exc.where or f"mounts[{i}]", hint=exc.hint) from None
            except OSError as exc:
                raise StockadeError(
                    f"cannot mount {m.type} on {m.destination}: {exc.strerror}",
                    where=f"mounts[{i}]",
                    hint=_hint(m, exc),
                ) from None
    finally:
        for fd in detached.values():
            os.close(fd)


def _hint(m: Mount, exc: OSError) -> str:
    if exc.errno == errno.EPERM and m.type in ("proc", "sysfs", "mqueue", "cgroup"):
        return f"{m.type} needs the matching namespace (pid/network/ipc/cgroup) owned by the container"
    if exc.errno in (errno.ENOENT, errno.EACCES) and m.type == "bind":
        return "the bind source must exist on the host (relative sources are relative to the bundle)"
    return ""


def _mount_one(m: Mount, rootfd: int, bundle: str, cgroups: dict[str, str], tree: int | None) -> None:
    if tree is not None:
        create = "dir" if stat.S_ISDIR(os.fstat(tree).st_mode) else "file"
        source = ""
    elif m.type == "bind":
        source = os.path.join(bundle, m.source)
        create = "dir" if os.path.isdir(source) else "file"
        if not os.path.exists(source):
            raise OSError(errno.ENOENT, "no such file or directory", source)
    else:
        source, create = m.type if not m.source or m.source == "none" else m.source, "dir"
    if m.type in ("proc", "sysfs"):
        _refuse_symlinks(rootfd, m.destination)
    fd = open_in_root(rootfd, m.destination, create)
    try:
        if tree is not None:
            try:
                sc.move_mount(tree, fd)
            finally:
                os.close(tree)
        elif m.type == "bind":
            sc.mount(source, fd_path(fd), None, m.flags & (sc.MS_BIND | sc.MS_REC))
        elif m.type == "cgroup":
            _mount_cgroup(fd, rootfd, m, cgroups)
        elif m.type == "sysfs":
            _mount_sysfs(fd, m, source)
        else:
            sc.mount(source, fd_path(fd), m.type, m.flags, m.data or None)
    finally:
        os.close(fd)
    extra = m.flags & ~(sc.MS_BIND | sc.MS_REC)
    if m.type == "bind" and extra or m.propagation:
        # The fd named the directory under the mount; reopen to reach the new mount itself.
        fd = open_in_root(rootfd, m.destination)
        try:
            if m.type == "bind" and extra:
                remount_bind(fd_path(fd), extra)
            for flag in m.propagation:
                sc.mount(None, fd_path(fd), None, flag)
        finally:
            os.close(fd)


def _mount_sysfs(fd: int, m: Mount, source: str) -> None:
    """A new sysfs; where the kernel refuses one (a user namespace in a network namespace it
    does not own: a hostNetwork pod), the host's /sys bound instead, as runc does, but with the
    mount's flags (read-only) on every mount below it too and made a slave."""
    try:
        sc.mount(source, fd_path(fd), m.type, m.flags, m.data or None)
    except PermissionError:
        tree = sc.restricted_tree("/sys", m.flags)
        try:
            sc.move_mount(tree, fd)
        finally:
            os.close(tree)


def _refuse_symlinks(rootfd: int, path: str) -> None:
    """procfs/sysfs must land where the runtime later looks for them (e.g. /proc/self/fd, /proc/sys):
    an image symlink like /proc -> /etc would quietly move them (runc refuses the same)."""
    try:
        os.close(sc.openat2(rootfd, path.strip("/"), os.O_PATH, sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_SYMLINKS))
    except FileNotFoundError:
        return  # created as a plain directory
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StockadeError(f"{path} is a symlink in the rootfs", hint="fix the image") from None
        raise


_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _mount_cgroup(fd: int, rootfd: int, m: Mount, cgroups: dict[str, str]) -> None:
    """`cgroup` mount: the container's own cgroup directories, bound with the mount's flags.

    Never a new cgroup filesystem: without a cgroup namespace that shows the host's whole
    hierarchy (every other tenant's cgroup), and mounting cgroup2 waits for an RCU grace period.
    A bind of the container's directory is what a cgroup namespace would show as its root.
    Pure v2 (`cgroups` == {"": dir}): that directory at the destination. v1/hybrid: a tmpfs with
    one directory per hierarchy the container is in (memory, pids, ..., unified).
    """
    if "" in cgroups:
        sc.mount(cgroups[""], fd_path(fd), None, sc.MS_BIND)
        _remount_fd(open_in_root(rootfd, m.destination), m.flags)
        return
    flags = m.flags & ~sc.MS_RDONLY
    sc.mount("tmpfs", fd_path(fd), "tmpfs", flags, "mode=755")
    top = open_in_root(rootfd, m.destination)  # the new tmpfs, not the directory under it
    try:
        for name, source in sorted(cgroups.items()):
            os.mkdir(name, 0o755, dir_fd=top)
            sub = os.open(name, _DIR_PATH, dir_fd=top)
            try:
                sc.mount(source, fd_path(sub), None, sc.MS_BIND)
            finally:
                os.close(sub)
            _remount_fd(os.open(name, _DIR_PATH, dir_fd=top), m.flags)
        if m.flags & sc.MS_RDONLY:
            sc.mount(None, fd_path(top), None, sc.MS_REMOUNT | sc.MS_RDONLY | flags, "mode=755")
    finally:
        os.close(top)


def _remount_fd(fd: int, flags: int) -> None:
    """Apply `flags` to the bind mount `fd` was opened on (after the bind: before, it names the
    directory under the mount), then close fd."""
    try:
        remount_bind(fd_path(fd), flags)
    finally:
        os.close(fd)


def pivot(rootfs: str) -> None:
    """pivot_root into the rootfs and detach the old root, without a temporary directory."""
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        sc.pivot_root(".", ".")
        os.fchdir(old)
        # Never let the unmount of the old root propagate to the host.
        sc.mount(None, ".", None, sc.MS_SLAVE | sc.MS_REC)
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
    except OSError as exc:
        raise StockadeError(
            f"pivot_root failed: {exc.strerror}",
            where="root.path",
            hint="a rootfs on ramfs/initramfs needs --no-pivot",
        ) from None
    finally:
        os.close(old)
        os.close(new)


def move_root(rootfs: str) -> None:
    """--no-pivot: move the rootfs mount over / and chroot (old root stays reachable by fd tricks)."""
    os.chdir(rootfs)
    sc.mount(rootfs, "/", None, sc.MS_MOVE)
    os.chroot(".")
    os.chdir("/")


def set_root_propagation(propagation: str) -> None:
    if propagation:
        sc.mount(None, "/", None, MOUNT_PROPAGATION[propagation])


def mask(paths: list[str]) -> None:
    """Hide files behind /dev/null and directories behind an empty read-only tmpfs."""
    if not paths:
        return
    null = _real_dev_null()
    try:
        for i, path in enumerate(paths):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    sc.mount("tmpfs", path, "tmpfs", sc.MS_RDONLY, "size=0k")
                else:
                    sc.mount(fd_path(null), path, None, sc.MS_BIND)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StockadeError(
                    f"cannot mask {path}: {exc.strerror}", where=f"linux.maskedPaths[{i}]"
                ) from None
    finally:
        os.close(null)


def _real_dev_null() -> int:
    """The container's /dev/null, held open, once it is known to be the null device: bound by
    name, a /dev/null the image (or a racing process) made a symlink to some /proc file would put
    that file where a masked path was meant to hide one (the CVE-2025-31133 class)."""
    from . import procfs

    where = "linux.maskedPaths"
    try:
        fd = os.open("/dev/null", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StockadeError(f"cannot open /dev/null: {exc.strerror}", where=where) from None
    st = os.fstat(fd)
    if not (stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3):
        os.close(fd)
        raise StockadeError(
            "/dev/null in the container is not the null device",
            where=where,
            hint="mount a tmpfs at /dev (as runc spec does) or fix the image's /dev/null",
        )
    procfs.check_root(where)  # fd_path(fd) goes through the container's /proc
    return fd


def make_readonly(paths: list[str]) -> None:
    for i, path in enumerate(paths):
        try:
            sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
            remount_bind(path, sc.MS_RDONLY)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StockadeError(
                f"cannot make {path} read-only: {exc.strerror}", where=f"linux.readonlyPaths[{i}]"
            ) from None


def readonly_root() -> None:
    try:
        remount_bind("/", sc.MS_RDONLY)
    except OSError as exc:
        raise StockadeError(
            f"cannot make the rootfs read-only: {exc.strerror}", where="root.readonly"
        ) from None
