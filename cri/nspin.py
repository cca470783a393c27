"""A pod's namespaces without a process: made by a short-lived child, kept by bind mounts of
their /proc/<pid>/ns files (as `ip netns add` keeps a network namespace), joined by path by
every container of the pod, and gone when the mounts are.

With a user namespace the pod's network, IPC and UTS namespaces are created inside it, in one
unshare(2): they belong to the pod's user namespace, so root in a container holds
CAP_NET_BIND_SERVICE and CAP_NET_ADMIN over its pod's network only. The child sets the hostname,
brings loopback up and writes the pod's namespaced sysctls before it is pinned.
"""

from __future__ import annotations

import os
import sys

# The helper process (`python -S -m stockade.cri.nspin`) is on every pod's start path: only what
# it needs is imported at the top, the parent's side imports the rest where it is used.
from stockade.runtime import procfs
from stockade.runtime import syscalls as sc
from stockade.runtime._lite import json
from stockade.runtime.errors import StockadeError
from stockade.runtime.linux import sysctl_path
from stockade.runtime.namespaces import FLAGS, PROC_NAMES, loopback_up

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from stockade.runtime.spec import IDMapping

    from .forker import Forker


def pin(base: str, kinds: Iterable[str], hostname: str = "", sysctls: dict[str, str] | None = None,
        maps: list[IDMapping] | None = None, forker: Forker | None = None) -> dict[str, str]:
    """New namespaces of KINDS (OCI names: user, network, ipc, uts) pinned as files in BASE;
    returns type -> path. MAPS: the user namespace's id maps (uid and gid alike). The child
    comes from FORKER when given (a server), else it is a fresh process."""
    from stockade.runtime.idmap import write_maps

    kinds = list(kinds)
    if "user" in kinds and not maps:
        raise StockadeError("a user namespace needs id maps", where="pod")
    os.makedirs(base, mode=0o711, exist_ok=True)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    request = {"kinds": kinds, "hostname": hostname, "sysctls": sysctls or {}}
    try:
        pid, child = _child_process(request, ready_w, go_r, forker)
    finally:
        os.close(ready_w)
        os.close(go_r)
    pinned: dict[str, str] = {}
    try:
        answer = os.read(ready_r, 4096)
        if "user" in kinds and answer == b"u":  # unshared: map its ids, then it goes on
            write_maps(pid, maps or [], maps or [])
            os.write(go_w, b"g")
            answer = os.read(ready_r, 4096)
        if answer != b"r":
            reason = answer.decode(errors="replace") or "the helper died"
            raise StockadeError(f"cannot make the pod's namespaces: {reason}", where="pod")
        for kind in sorted(kinds, key=lambda k: k != "user"):
            pinned[kind] = pin_of(pid, kind, base)
    except BaseException:
        unpin(pinned.values())
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)  # the child exits when it reads EOF
        if child is not None:
            child.wait()
    return pinned


def _child_process(request: dict, ready: int, go: int, forker: Forker | None) -> tuple[int, Any]:
    """(pid, Popen or None) of a single-threaded child running `run_child` on READY and GO."""
    if forker is not None:
        return forker.spawn(request, [ready, go]), None
    import subprocess

    from .forker import python, python_env

    # A fresh process, not a fork: a caller's other threads follow a fork into the child, and
    # unshare(CLONE_NEWUSER) refuses a multithreaded caller.
    argv = python("stockade.cri.nspin", json.dumps({**request, "ready": ready, "go": go}))
    child = subprocess.Popen(argv, env=python_env(), pass_fds=(ready, go), stdin=subprocess.DEVNULL)
    return child.pid, child


def pin_of(pid: int, kind: str, base: str) -> str:
    """Pin PID's namespace of KIND (an OCI type) as the file BASE/KIND; its path."""
    path = os.path.join(base, kind)
    with open(path, "x"):
        pass
    sc.mount(f"/proc/{pid}/ns/{PROC_NAMES[kind]}", path, None, sc.MS_BIND)
    return path


def unpin(paths: Iterable[str]) -> None:
    """Unmount and remove pinned namespace files (those already gone are fine)."""
    from stockade.runtime.mountinfo import read as read_mounts

    mounted = {m.point for m in read_mounts()}
    for path in paths:
        if path in mounted:
            sc.umount2(path, sc.MNT_DETACH)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _pin_steps(kinds: list[str], hostname: str, sysctls: dict[str, str], ready: int, go: int) -> None:
    """Unshare, wait for the id maps, set the pod up, report, wait for the pins."""
    flags = 0
    for kind in kinds:
        flags |= FLAGS[kind]
    sc.unshare(flags)
    if "user" in kinds:
        os.write(ready, b"u")
        if os.read(go, 1) != b"g":
            os._exit(1)
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    if "uts" in kinds and hostname:
        sc.sethostname(hostname)
    if "network" in kinds:
        loopback_up()
    for key, value in sysctls.items():
        procfs.write(sysctl_path(key), value, f"sysctl {key}")
    os.write(ready, b"r")
    os.read(go, 1)  # EOF once the parent has pinned everything


def start_init(joins: dict[str, str], argv: list[str], forker: Forker | None = None) -> int:
    """A PID namespace for a pod that shares one: created inside the pod's namespaces JOINS (OCI
    type -> pinned path, its user namespace first), with ARGV (catatonit -P) as its PID 1, which
    holds it. Returns the init's host pid."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, child = _child_process({"init": argv, "joins": joins}, ready_w, go_r, forker)
    finally:
        os.close(ready_w)
        os.close(go_r)
    try:
        answer = os.read(ready_r, 4096)
    finally:
        os.close(ready_r)
        os.close(go_w)
        if child is not None:
            child.wait()
    if not answer.startswith(b"p") or not answer[1:].isdigit():
        reason = answer.decode(errors="replace") or "the helper died"
        raise StockadeError(f"cannot start the pod's PID namespace init: {reason}", where="pod")
    del pid  # the helper's; the init is its child, now on its own
    return int(answer[1:])


def _init_steps(joins: dict[str, str], argv: list[str], ready: int) -> None:
    """Join the pod's namespaces, unshare a PID namespace, fork its PID 1 and exec ARGV there;
    report its pid (or why not), leaving it to its own."""
    from stockade.runtime.namespaces import JOIN_ORDER

    for kind in sorted(joins, key=JOIN_ORDER.index):
        fd = os.open(joins[kind], os.O_RDONLY | os.O_CLOEXEC)
        sc.setns(fd, FLAGS[kind])
        os.close(fd)
        if kind == "user":
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
    sc.unshare(sc.CLONE_NEWPID)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - PID 1 of the pod
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for target in (0, 1, 2):
                os.dup2(null, target)
            os.execv(argv[0], argv)
        except OSError as exc:
            os.write(err_w, f"{argv[0]}: {exc.strerror}".encode())
        os._exit(127)
    os.close(err_w)
    failed = os.read(err_r, 4096)  # EOF: the exec happened (close-on-exec)
    os.write(ready, failed or f"p{pid}".encode())


def run_child(request: dict, ready: int, go: int) -> None:
    """The child's steps for REQUEST; a failure is reported on READY. Never returns."""
    status = 0
    try:
        if "init" in request:
            _init_steps(request["joins"], request["init"], ready)
        else:
            _pin_steps(request["kinds"], request["hostname"], request["sysctls"], ready, go)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        try:
            os.write(ready, str(exc).encode()[:4000] or b"error")
        except OSError:
            pass
        status = 1
    os._exit(status)


if __name__ == "__main__":  # the helper process pin() starts without a forker
    _args = json.loads(sys.argv[1])
    run_child(_args, _args["ready"], _args["go"])


def socket_in(netns: int | str, family: int, kind: int, proto: int = 0):  # noqa: ANN201 - socket.socket
    """A socket of network namespace NETNS (an fd or a path): a thread enters the namespace only
    to create it (setns changes the calling thread alone; the socket stays in the namespace it was
    made in, whoever uses it afterwards). Raises OSError."""
    import socket
    import threading

    box: dict = {}

    def make() -> None:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if isinstance(netns, str) else netns
        try:
            sc.setns(fd, sc.CLONE_NEWNET)
            box["sock"] = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        except OSError as exc:
            box["error"] = exc
        finally:
            if isinstance(netns, str):
                os.close(fd)

    thread = threading.Thread(target=make, name="netns-socket")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["sock"]
