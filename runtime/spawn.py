"""The runtime's side of making a container process: fork it into its cgroup (and, where one
clone3 can, into its namespaces), then serve its requests until it is ready or fails.

The calling process becomes a child subreaper so the init (a grandchild when a pid namespace is
created) is reparented to it and can be waited for.
"""

from __future__ import annotations

import os

from . import syscalls as sc
from . import trampoline
from .channel import ERROR, HOOKS, MAP, MOVED, OK, PID, READY, Channel, child_main, decode_error
from .errors import StockadeError
from .idmap import write_maps

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .init import Launch
    from .spec import Process, Spec


def fork_child(
    body: Callable[[Channel, int], None],
    preserve_fds: int,
    cgroup_dir: str | None = None,
    clone_namespaces: int = 0,
) -> tuple[int, Channel]:
    """Fork with a pipe each way. The child runs body(its channel, the CLONE_NEW* flags it was
    born with) and never returns; the parent gets (pid, its channel). As child subreaper, the
    parent can reap the grandchild that becomes the container's process. With `cgroup_dir`
    (cgroup2) the child is born in that cgroup, or joins it first where clone3 cannot place it.

    The parent becomes non-dumpable first (the child inherits it): see trampoline. The child starts
    a session of its own, without a controlling terminal (the caller's terminal stays out of reach
    of TIOCSTI), and closes every descriptor but stdio, the `preserve_fds` after them, its pipes
    and the trampoline: close-on-exec is not enough while the init runs, since a working
    directory of /proc/self/fd/N reaches any open one (CVE-2024-21626)."""
    sc.set_dumpable(False)
    sc.set_child_subreaper()
    exec_fd = trampoline.fd()
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    pid, join, cloned = fork_into(cgroup_dir, clone_namespaces)
    if pid == 0:
        os.close(to_parent_r)
        os.close(to_child_w)
        channel = Channel(to_parent_w, to_child_r)

        def child() -> None:
            sc.close_fds_from(3 + preserve_fds, keep=(to_parent_w, to_child_r, exec_fd))
            os.setsid()
            join_cgroups(join)
            body(channel, cloned)

        child_main(child, channel)
    os.close(to_parent_w)
    os.close(to_child_r)
    return pid, Channel(to_child_w, to_parent_r)


def fork_into(cgroup_dir: str | None, clone_namespaces: int = 0) -> tuple[int, list[str], int]:
    """(pid, cgroup.procs files the child must still write itself into, the CLONE_NEW* flags it
    was born with: `clone_namespaces` or 0)."""
    if cgroup_dir is None:
        return os.fork(), [], 0
    try:
        fd = os.open(cgroup_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StockadeError(
            f"cannot open cgroup {cgroup_dir}: {exc.strerror}", where="linux.cgroupsPath"
        ) from None
    try:
        # A raw clone3 skips glibc's fork handling, which a process with other threads (the CRI
        # daemon serving gRPC) needs: malloc locks held by them would stay locked in the child.
        if len(os.listdir("/proc/self/task")) == 1:
            return sc.fork_into_cgroup(fd, clone_namespaces), [], clone_namespaces
    except OSError:  # no clone3 or CLONE_INTO_CGROUP (Linux < 5.7), or a seccomp filter refuses it
        pass
    finally:
        os.close(fd)
    return os.fork(), [os.path.join(cgroup_dir, "cgroup.procs")], 0


def preload(process: Process, seccomp_program: bytes | None) -> None:
    """Import, before forking, every module the child may need: after pivot_root (or setns into the
    container's mount namespace) the runtime's own files are out of reach, and importing once in the
    parent is cheaper than in each child."""
    if process.terminal:
        from . import console  # noqa: F401
    if seccomp_program is not None:
        from . import seccomp  # noqa: F401
    from ._lite import json as jsonlite  # noqa: F401 - error reports


def supervise(stage1: int, channel: Channel, launch: Launch | None = None) -> int:
    """Serve the child's requests until it is ready; on any failure kill and reap everything."""
    init_pid = 0
    alive = {stage1}  # our unreaped children: only these may be signalled (a reaped pid can be reused)
    try:
        while True:
            tag, payload = channel.recv()
            if tag == MAP:
                write_maps(stage1, launch.spec.linux.uid_mappings, launch.spec.linux.gid_mappings)
                channel.send(OK)
            elif tag == PID:
                init_pid = int(payload) or stage1  # 0: "me", an init born in its pid namespace
                if init_pid != stage1:
                    alive.add(init_pid)  # reparented to us (child subreaper) when stage 1 exits
                    os.waitpid(stage1, 0)  # stage 1 exits once it has forked the init
                    alive.discard(stage1)
                channel.send(OK, str(init_pid).encode())  # its host pid (it may only know itself as 1)
                if launch is not None:
                    launch.cgroup_move = CgroupMove(init_pid, launch.cgroup_procs)
                    if launch.on_pid is not None:
                        launch.on_pid(init_pid)
            elif tag == HOOKS:
                if launch is not None and launch.on_created is not None:
                    if _has_hooks(launch.spec):  # hooks see the container in its cgroups
                        launch.cgroup_move.wait()
                    launch.on_created(init_pid)
                channel.send(OK)
            elif tag == MOVED:  # the init waits for its v1 cgroups before its cgroup namespace
                launch.cgroup_move.wait()
                channel.send(OK)
            elif tag == READY:
                return init_pid
            elif tag == ERROR:
                raise decode_error(payload)
            else:  # EOF: every child end of the pipe is closed, so the children are gone or going
                raise StockadeError(_exit_reason(alive), where="container init")
    except BrokenPipeError:  # the child died while we were answering it (nobody holds the read end)
        reason = _exit_reason(alive)
        _kill_and_reap(alive)
        raise StockadeError(reason, where="container init") from None
    except BaseException:
        _kill_and_reap(alive)
        if launch is not None and launch.cgroup_move is not None:
            launch.cgroup_move.wait(check=False)  # nothing of ours may still be writing
        raise
    finally:
        channel.close()


def _exit_reason(alive: set[int]) -> str:
    reason = "the container init exited before it was ready"
    for pid in sorted(alive):
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            continue
        alive.discard(pid)
        if os.WIFSIGNALED(status):
            reason = f"the container init was killed by signal {os.WTERMSIG(status)} before it was ready"
    return reason


def _kill_and_reap(alive: set[int]) -> None:
    for pid in alive:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _has_hooks(spec: Spec) -> bool:
    h = spec.hooks
    return bool(h.prestart or h.create_runtime or h.create_container or h.start_container)


class CgroupMove:
    """Moves the init into its v1 hierarchies on a thread. Each move waits for an RCU grace
    period (see syscalls.fork_into_cgroup), which then overlaps with the init building
    its rootfs and the runtime installing the BPF policy and writing state; `create` waits for it
    before it returns, so the workload (released by `start`) always runs in its cgroups."""

    def __init__(self, pid: int, files: list[str]) -> None:
        import _thread  # not threading: its imports would cost more than the wait it hides

        self.error: BaseException | None = None
        self._done = _thread.allocate_lock()
        self._done.acquire()
        if files:
            _thread.start_new_thread(self._run, (pid, files))
        else:
            self._done.release()

    def _run(self, pid: int, files: list[str]) -> None:
        try:
            _move_to_cgroups(pid, files)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            self.error = exc
        finally:
            self._done.release()

    def wait(self, check: bool = True) -> None:
        self._done.acquire()
        self._done.release()
        if check and self.error is not None:
            raise self.error


def _move_to_cgroups(pid: int, files: list[str]) -> None:
    for path in files:
        try:
            with open(path, "w") as f:
                f.write(str(pid))
        except OSError as exc:
            raise StockadeError(
                f"cannot move the container init into {path}: {exc.strerror}", where="linux.cgroupsPath"
            ) from None


def join_cgroups(files: list[str]) -> None:
    for path in files:
        try:
            with open(path, "w") as f:
                f.write("0")
        except OSError as exc:
            raise StockadeError(
                f"cannot join cgroup {path}: {exc.strerror}", where="linux.cgroupsPath"
            ) from None
