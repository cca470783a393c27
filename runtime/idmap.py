"""User namespace ID maps, written by the runtime (root on the host may map any range)."""

from __future__ import annotations

from .errors import StockadeError
from .spec import IDMapping


def render(maps: list[IDMapping]) -> str:
    return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)


def write_maps(pid: int, uid_maps: list[IDMapping], gid_maps: list[IDMapping]) -> None:
    """Write /proc/<pid>/{uid_map,gid_map} exactly as linux.uidMappings/gidMappings say.

    setgroups stays "allow": the writer is privileged in the parent namespace, so the kernel
    does not require "deny", and the container may need setgroups(2) for additionalGids.
    """
    for name, maps in (("uid_map", uid_maps), ("gid_map", gid_maps)):
        try:
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(render(maps))
        except OSError as exc:
            key = "uidMappings" if name == "uid_map" else "gidMappings"
            raise StockadeError(
                f"cannot write {name}: {exc.strerror}",
                where=f"linux.{key}",
                hint="mappings must not overlap and host IDs must exist",
            ) from None


def is_mapped(ident: int, maps: list[IDMapping]) -> bool:
    return any(m.container_id <= ident < m.container_id + m.size for m in maps)


def userns_fd(uid_maps: list[IDMapping], gid_maps: list[IDMapping]) -> int:
    """An fd of a new, empty user namespace with these maps: what an idmapped mount is given.

    A child unshares it and waits; its maps are written, the namespace opened, the child ended
    (the fd keeps the namespace alive). A forked child of a multithreaded process (a server:
    gRPC's threads follow a fork) may not unshare a user namespace, so there the child is a
    fresh `unshare --user` process instead."""
    import os

    if _threads() > 1:
        return _userns_fd_spawned(uid_maps, gid_maps)
    from .syscalls import CLONE_NEWUSER, unshare

    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    done_r, done_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(done_w)  # else the read below never sees the parent's close
            unshare(CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise StockadeError("cannot make a user namespace for an idmapped mount",
                                where="user namespace", hint="is user.max_user_namespaces 0?")
        write_maps(pid, uid_maps, gid_maps)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def _threads() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 1


def _userns_fd_spawned(uid_maps: list[IDMapping], gid_maps: list[IDMapping]) -> int:
    import os
    import subprocess
    import time

    own = os.readlink("/proc/self/ns/user")
    child = subprocess.Popen(["unshare", "--user", "--", "cat"], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:  # until it has unshared (its namespace is no longer ours)
            try:
                if os.readlink(f"/proc/{child.pid}/ns/user") != own:
                    break
            except OSError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                error = child.stderr.read().decode(errors="replace").strip() if child.stderr else ""
                raise StockadeError(f"cannot make a user namespace for an idmapped mount: {error}",
                                    where="user namespace", hint="is user.max_user_namespaces 0?")
            time.sleep(0.0005)
        write_maps(child.pid, uid_maps, gid_maps)
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()
