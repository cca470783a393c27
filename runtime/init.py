"""The container init: fork, namespaces, ID maps, mounts, pivot_root, then wait for `start` and exec.

Process layout (runc semantics):

    runtime ──fork──> stage 1: joins cgroups, setns to namespaces given by path, unshares the
      │                        user ns (the runtime writes its maps), unshares the rest;
      │                        forks stage 2 when there is a pid namespace, then exits
      │                        (the runtime is a child subreaper, so stage 2 becomes its child)
      └─ stage 2 (the init, PID 1 in a new pid ns): mounts, devices, pivot_root, hostname,
                 sysctl, rlimits, AppArmor, no_new_privs, seccomp, caps, user, the executable
                 (all of it `create`'s errors), reports "ready", blocks opening the exec fifo
                 for writing, and once `start` reads it: startContainer hooks, exec.

The runtime and the init talk over a channel (channel.py); any error in the init travels back as
a StockadeError and the init exits, so `create` fails with nothing left behind (mounts live in the
init's mount namespace and die with it). The runtime's side is spawn.py; the workload's last
steps, shared with `exec` (exec_process.py), are workload.py. This module is the init's own steps,
in order (`_Init.run`).

Every module the child needs is imported before fork: after pivot_root the runtime's files are
out of sight. Until its last execve the init is the host's Python binary: it is non-dumpable from
its fork, and that execve goes through a sealed trampoline (trampoline.py), so nothing in the
container can reach the host's binary through /proc.
"""

from __future__ import annotations

import os

from . import capabilities, devices, mounts, namespaces, procfs, rlimits, workload
from . import spawn as spawn_
from . import syscalls as sc
from ._lite.dataclasses import dataclass
from .channel import HOOKS, MAP, MOVED, PID, READY, Channel, Reported, stderr
from .errors import SpecError, StockadeError
from .spec import sysctl_namespace, sysctl_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .spawn import CgroupMove
    from .spec import Spec


@dataclass
class Launch:
    spec: Spec
    bundle: Path
    rootfs: Path
    exec_fifo: Path
    cgroup_procs: list[str]  # cgroup.procs files (v1 hierarchies) the runtime moves the init into
    seccomp_program: bytes | None
    seccomp_flags: list[str]
    console_socket: str | None = None
    no_pivot: bool = False
    on_created: Callable[[int], None] | None = None
    # Called with the init's host pid as soon as it is known, while the init goes on setting up:
    # the runtime's own work (BPF policy, state) overlaps with the init's.
    on_pid: Callable[[int], None] | None = None
    cgroup_move: CgroupMove | None = None  # set by spawn: wait() before the container may start
    # In-container hooks, called in the init with its host pid (for the state the hooks get).
    run_create_container_hooks: Callable[[int], None] | None = None
    run_start_container_hooks: Callable[[int], None] | None = None
    preserve_fds: int = 0
    cgroup_dir: str | None = None  # the cgroup2 directory the init is born in (CLONE_INTO_CGROUP)
    cgroup_mounts: dict[str, str] | None = None  # hierarchy name -> container's dir, for `cgroup` mounts


def spawn(launch: Launch) -> int:
    """Create the container; returns the init's host pid once it is about to block on the exec fifo.
    Its moves into v1 hierarchies may still be under way then: call launch.cgroup_move.wait()
    before anything can release it (container.create does, after its own remaining work).

    The calling process becomes a child subreaper (see spawn.py).
    """
    if launch.spec.process.terminal and not launch.console_socket:
        raise SpecError(
            "a terminal needs a console socket",
            where="process.terminal",
            hint="pass --console-socket, or set terminal to false",
        )
    _give_fifo_to_container_root(launch)
    spawn_.preload(launch.spec.process, launch.seccomp_program)
    _preload_hooks(launch)
    pid, channel = spawn_.fork_child(
        lambda ch, cloned: _Init(launch, ch, cloned).run(),
        launch.preserve_fds,
        launch.cgroup_dir,
        _clone_namespaces(launch),
    )
    return spawn_.supervise(pid, channel, launch=launch)


def _clone_namespaces(launch: Launch) -> int:
    """CLONE_NEW* flags the init can be born with (one clone3 instead of fork, unshare and fork
    again for the pid namespace), or 0 when the set-up needs the staged path: namespaces joined
    by path (joined first, as runc does), a user namespace (the init opens the exec fifo and the
    console before it, as host root), a time namespace (offsets precede its first process)."""
    linux = launch.spec.linux
    pidns, timens = linux.namespace("pid"), linux.namespace("time")
    if pidns is None or pidns.path or linux.namespace("user") is not None or timens is not None:
        return 0
    if any(ns.path for ns in linux.namespaces):
        return 0
    late = ("cgroup",) if launch.cgroup_procs else ()  # see _Init.run: unshared after the v1 moves
    return namespaces.new_flags(linux.namespaces, exclude=("user", *late))


def _root_ids(linux) -> tuple[int, int] | None:  # noqa: ANN001 - spec.Linux
    """The host uid and gid the container's root maps to, when the spec names them."""
    uid = next((m.host_id for m in linux.uid_mappings if m.container_id == 0), None)
    gid = next((m.host_id for m in linux.gid_mappings if m.container_id == 0), None)
    return None if uid is None or gid is None else (uid, gid)


def _preload_hooks(launch: Launch) -> None:
    """The startContainer callback runs after pivot_root: load the hook runner it imports now."""
    if launch.run_start_container_hooks is not None or launch.run_create_container_hooks is not None:
        from . import hooks  # noqa: F401


def _give_fifo_to_container_root(launch: Launch) -> None:
    """In a new user namespace the init is not host root: let the container's root open the fifo."""
    linux = launch.spec.linux
    userns = linux.namespace("user")
    if userns is None or userns.path:
        return
    uid = next((m.host_id for m in linux.uid_mappings if m.container_id == 0), None)
    gid = next((m.host_id for m in linux.gid_mappings if m.container_id == 0), None)
    if uid is not None:  # 0622: its other users (the process.user) can open it too
        os.chown(launch.exec_fifo, uid, -1 if gid is None else gid)



# ---------------------------------------------------------------------------------------------
# The init's steps
# ---------------------------------------------------------------------------------------------


class _Init:
    """The container init, in the forked child: `run` is the whole story, one call per step."""

    def __init__(self, launch: Launch, channel: Channel, cloned: int) -> None:
        self.launch, self.spec, self.channel = launch, launch.spec, channel
        self.cloned = cloned  # CLONE_NEW* flags the init was born with (spawn_.fork_child)
        self.host_pid = 0  # as the runtime sees it; the init may know itself only as 1
        self.late_cgroupns = False
        self.detached: dict[int, int] = {}  # mounts.detach_sources

    def run(self) -> None:
        process = self.spec.process
        sock = self._connect_console()
        capabilities.check_grantable(process.capabilities)
        # Before any user namespace: the init is non-dumpable, so its /proc/self files stay the
        # host root's (runc also writes this first).
        workload.apply_oom_score_adj(process.oom_score_adj, "process.oomScoreAdj")
        fifo = self._open_exec_fifo()
        in_userns = self._enter_namespaces()
        pty = self._mount_rootfs(in_userns)
        self._run_create_hooks()
        self._enter_rootfs()
        self._set_identity_and_sysctls()
        self._protect_paths()
        if pty is not None:
            self._hand_over_console(sock, pty)
        if process.rlimits:
            rlimits.apply(process.rlimits)
        env, path, fd_dir = self._ready_workload(fifo)
        self.channel.send(READY)
        self.channel.close()
        self._wait_for_start(fifo, fd_dir)
        self._run_start_hooks()
        workload.exec_workload(path, process, env)

    # -- before the rootfs

    def _connect_console(self):  # noqa: ANN202 - a socket, or None without a terminal
        if not self.spec.process.terminal:
            return None
        from . import console

        return console.connect(self.launch.console_socket)

    def _open_exec_fifo(self) -> int:
        try:
            return os.open(self.launch.exec_fifo, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise StockadeError(
                f"cannot open the exec fifo: {exc.strerror}", where=str(self.launch.exec_fifo)
            ) from None

    def _enter_namespaces(self) -> bool:
        """Into the container's namespaces; returns whether a new user namespace was made."""
        if self.cloned:  # born in its namespaces: none to join, unshare or fork for
            self._born_in_namespaces()
            return False
        return self._join_and_unshare()

    def _born_in_namespaces(self) -> None:
        linux = self.spec.linux
        self.late_cgroupns = bool(self.launch.cgroup_procs) and linux.namespace("cgroup") is not None
        if linux.namespace("network") is not None:
            namespaces.loopback_up()
        self.host_pid = int(self.channel.ask(PID, b"0"))

    def _join_and_unshare(self) -> bool:
        linux = self.spec.linux
        runtime_ns = {kind: namespaces.inode("self", kind) for kind in ("uts", "ipc", "network")}
        userns = linux.namespace("user")
        if userns is not None:  # while still host root: sources the container's root cannot reach
            self.detached = mounts.detach_sources(self.spec.mounts, str(self.launch.bundle), _root_ids(linux))
        # Namespaces given by path first (user first), as runc does, so that e.g. a netns owned by
        # the host user namespace can still be joined before we create a new user namespace.
        namespaces.join(namespaces.open_paths(linux.namespaces))
        if userns is not None and not userns.path:
            namespaces.unshare(sc.CLONE_NEWUSER)
            self.channel.ask(MAP)
        if userns is not None:
            try:
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            except OSError:
                pass  # root is not mapped: setup continues with the capabilities the user ns gave us
        # A cgroup namespace is rooted at the cgroups current at unshare: with v1 hierarchies to
        # join (the runtime moves the init while it builds the rootfs) it waits for those moves.
        cgroupns = linux.namespace("cgroup")
        self.late_cgroupns = bool(self.launch.cgroup_procs) and cgroupns is not None and not cgroupns.path
        exclude = ("user", "cgroup") if self.late_cgroupns else ("user",)
        namespaces.unshare(namespaces.new_flags(linux.namespaces, exclude=exclude))
        self._refuse_runtime_namespaces(runtime_ns)
        netns = linux.namespace("network")
        if netns is not None and not netns.path:
            namespaces.loopback_up()
        if linux.time_offsets:
            # timens_offsets of a non-dumpable process belongs to host root, not to the new user
            # namespace's root; the init is still outside the container's pid namespace here.
            sc.set_dumpable(userns is not None)
            namespaces.set_time_offsets(linux.time_offsets)
            sc.set_dumpable(False)
        self.host_pid = self._fork_into_pid_namespace()
        return userns is not None

    def _fork_into_pid_namespace(self) -> int:
        """New pid and time namespaces apply to children only: the init is the child, and the
        runtime (child subreaper) adopts it when we exit. Returns its host pid."""
        timens = self.spec.linux.namespace("time")
        if self.spec.linux.namespace("pid") is None and (timens is None or timens.path):
            return int(self.channel.ask(PID, str(os.getpid()).encode()))
        child = os.fork()
        if child:
            self.channel.send(PID, str(child).encode())
            os._exit(0)
        return int(self.channel.answer())

    def _refuse_runtime_namespaces(self, runtime_ns: dict[str, int]) -> None:
        """hostname/domainname/sysctls would change the host if a namespace joined by path is the
        runtime's own (e.g. linux.namespaces[].path=/proc/1/ns/net): refuse, as runc does."""
        spec = self.spec
        wants = [
            (key, kind) for key, kind in (("hostname", "uts"), ("domainname", "uts")) if getattr(spec, key)
        ]
        wants += [(f"linux.sysctl.{key}", sysctl_namespace(key)) for key in spec.linux.sysctl]
        for where, kind in wants:
            if kind and namespaces.inode("self", kind) == runtime_ns[kind]:
                raise SpecError(
                    f"the {kind} namespace joined by path is the host's: setting this would change the host",
                    where=where,
                    hint=f"use a private {kind} namespace",
                )

    # -- the root filesystem

    def _mount_rootfs(self, in_userns: bool) -> tuple[int, int, int] | None:
        """Mounts and devices under the rootfs; the pty (master, slave, number) when asked."""
        launch, spec = self.launch, self.spec
        workload.join_new_keyring()
        mounts.prepare_root(str(launch.rootfs), spec.linux.rootfs_propagation)
        rootfd = mounts.open_root(str(launch.rootfs))
        try:
            cgroups = launch.cgroup_mounts or {}
            mounts.mount_all(spec.mounts, rootfd, str(launch.bundle), cgroups, self.detached)
            devices.setup(rootfd, spec.linux.devices, in_userns)
            return self._open_console(rootfd) if spec.process.terminal else None
        finally:
            os.close(rootfd)

    def _open_console(self, rootfd: int) -> tuple[int, int, int]:
        from . import console
        from .mounts import fd_path, open_in_root

        ptmx = open_in_root(rootfd, "/dev/pts/ptmx")
        try:
            master, slave, number = console.open_pty(fd_path(ptmx), self.spec.process.console_size)
        finally:
            os.close(ptmx)
        target = open_in_root(rootfd, "/dev/console", "file")
        try:
            sc.mount(fd_path(slave), fd_path(target), None, sc.MS_BIND)
        finally:
            os.close(target)
        return master, slave, number

    def _run_create_hooks(self) -> None:
        self.channel.ask(HOOKS)  # the runtime runs createRuntime/prestart hooks (on_created)
        if self.launch.run_create_container_hooks is not None:
            self.launch.run_create_container_hooks(self.host_pid)

    def _enter_rootfs(self) -> None:
        rootfs = str(self.launch.rootfs)
        if self.launch.no_pivot:
            mounts.move_root(rootfs)
        else:
            mounts.pivot(rootfs)
        mounts.set_root_propagation(self.spec.linux.rootfs_propagation)

    def _set_identity_and_sysctls(self) -> None:
        spec = self.spec
        if spec.hostname:
            sc.sethostname(spec.hostname)
        if spec.domainname:
            sc.setdomainname(spec.domainname)
        for key, value in spec.linux.sysctl.items():
            try:
                procfs.write(sysctl_path(key), value, f"linux.sysctl.{key}")
            except OSError as exc:
                raise StockadeError(
                    f"cannot set sysctl {key}={value!r}: {exc.strerror}", where=f"linux.sysctl.{key}"
                ) from None

    def _protect_paths(self) -> None:
        linux = self.spec.linux
        mounts.make_readonly(linux.readonly_paths)
        mounts.mask(linux.masked_paths)
        if self.spec.root.readonly:
            mounts.readonly_root()

    def _hand_over_console(self, sock, pty: tuple[int, int, int]) -> None:  # noqa: ANN001
        from . import console

        master, slave, number = pty
        console.send_master(sock, master, f"/dev/pts/{number}")
        console.make_controlling(slave)

    # -- the workload

    def _ready_workload(self, fifo: int) -> tuple[dict[str, str], str, int]:
        """Everything but the exec (workload.finalize); returns (environment, executable, the
        /proc/self/fd directory the exec fifo is reopened through)."""
        launch, process = self.launch, self.spec.process
        if not os.path.isdir("/proc/self/fd"):
            raise SpecError(
                "the container has no /proc",
                where="mounts",
                hint="mount proc at /proc: the exec fifo is reopened through it",
            )
        env = workload.environment(process)
        if self.late_cgroupns:  # rooted at the v1 cgroups the runtime moves us into: wait for them
            self.channel.ask(MOVED)
            namespaces.unshare(sc.CLONE_NEWCGROUP)
        fd_dir = procfs.open_file(procfs.self_path("fd"), os.O_PATH | os.O_DIRECTORY, "exec fifo")
        path = workload.finalize(
            self.spec.linux.personality,
            process,
            env,
            launch.preserve_fds,
            launch.seccomp_program,
            launch.seccomp_flags,
            keep=(fifo, fd_dir, *self.channel.fds()),
        )
        return env, path, fd_dir

    def _wait_for_start(self, fifo: int, fd_dir: int) -> None:
        """Block until `start` opens the fifo for reading. The O_PATH fd is reopened through
        /proc/self/fd (the host path is gone after pivot_root), a directory checked before the
        seccomp filter went in, so this takes only openat, whatever the filter allows."""
        try:
            fd = os.open(str(fifo), os.O_WRONLY | os.O_CLOEXEC, dir_fd=fd_dir)
        finally:
            os.close(fd_dir)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.close(fifo)

    def _run_start_hooks(self) -> None:
        if self.launch.run_start_container_hooks is None:
            return
        try:
            self.launch.run_start_container_hooks(self.host_pid)
        except Exception as exc:  # noqa: BLE001 - a failing hook must stop the container, loudly
            stderr(f"stockade: startContainer hook failed: {exc}")
            raise Reported(1) from None
