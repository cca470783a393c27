"""`runc exec`: a new process in a running container's namespaces and cgroups.

The runtime forks a child that joins the init's cgroups and namespaces (the init pinned by pidfd
and start time, so a reused pid is refused), forks again into the joined pid namespace, and does
the workload's last steps (workload.finalize) before it reports ready and execs.
"""

from __future__ import annotations

import os

from . import capabilities, namespaces, rlimits, spawn, workload
from .channel import PID, READY, Channel
from .errors import ContainerError, SpecError
from .files import write_atomic

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

    from .spec import Process, Spec


def exec_process(
    pid: int,
    spec: Spec,
    process: Process,
    *,
    cgroup_procs: list[str],
    cgroup_dir: str | None = None,
    seccomp_program: bytes | None,
    seccomp_flags: list[str],
    console_socket: str | None = None,
    detach: bool = False,
    pid_file: Path | None = None,
    preserve_fds: int = 0,
    pid_start: int = 0,
) -> int:
    """Run `process` inside the namespaces and cgroups of container init `pid` (started at
    `pid_start`, in clock ticks). Returns the exit code (128+signal) when attached, the new
    process's host pid when detached."""
    if process.terminal and not console_socket:
        raise SpecError(
            "a terminal needs a console socket",
            where="process.terminal",
            hint="pass --console-socket, or set terminal to false",
        )
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ContainerError(f"container process {pid} is not running") from None
    spawn.preload(process, seccomp_program)
    job = _Exec(
        (pid, pid_start), spec, process, cgroup_procs, seccomp_program, seccomp_flags, console_socket,
        preserve_fds,
    )
    child, channel = spawn.fork_child(lambda ch, _cloned: job.run(ch), preserve_fds, cgroup_dir)
    worker = spawn.supervise(child, channel)
    if pid_file is not None:
        write_atomic(pid_file, str(worker), 0o644)
    if detach:
        return worker
    _, status = os.waitpid(worker, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


class _Exec:
    """The child's steps, in order."""

    def __init__(
        self,
        init: tuple[int, int],
        spec: Spec,
        process: Process,
        cgroup_procs: list[str],
        seccomp_program: bytes | None,
        seccomp_flags: list[str],
        console_socket: str | None,
        preserve_fds: int,
    ) -> None:
        (self.pid, self.pid_start), self.spec, self.process = init, spec, process
        self.cgroup_procs = cgroup_procs
        self.seccomp_program, self.seccomp_flags = seccomp_program, seccomp_flags
        self.console_socket, self.preserve_fds = console_socket, preserve_fds

    def run(self, channel: Channel) -> None:
        process = self.process
        sock = None
        if process.terminal:
            from . import console

            sock = console.connect(self.console_socket)
        capabilities.check_grantable(process.capabilities)
        workload.apply_oom_score_adj(process.oom_score_adj, "process.oomScoreAdj")  # see init
        self._join_container()
        child = os.fork()  # a joined pid namespace applies to children only
        if child:
            channel.send(PID, str(child).encode())
            os._exit(0)
        channel.answer()  # once the runtime has reaped our parent
        if sock is not None:
            from . import console

            master, slave, number = console.open_pty("/dev/pts/ptmx", process.console_size)
            console.send_master(sock, master, f"/dev/pts/{number}")
            console.make_controlling(slave)
        if process.rlimits:
            rlimits.apply(process.rlimits)
        workload.join_new_keyring()
        env = workload.environment(process)
        path = workload.finalize(
            self.spec.linux.personality, process, env, self.preserve_fds, self.seccomp_program,
            self.seccomp_flags, keep=channel.fds(),
        )
        channel.send(READY)
        channel.close()
        workload.exec_workload(path, process, env)

    def _join_container(self) -> None:
        opened = namespaces.open_process(self.pid, self.pid_start)
        spawn.join_cgroups(self.cgroup_procs)
        namespaces.join(opened)
        if any(kind == "user" for kind, _ in opened):
            try:
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            except OSError:
                pass
