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

The runtime and the init talk over two pipes with tiny framed messages; any error in the init
travels back as a StockadeError and the init exits, so `create` fails with nothing left behind
(mounts live in the init's mount namespace and die with it).

Every module the child needs is imported before fork: after pivot_root the runtime's files are
out of sight. Until its last execve the init is the host's Python binary: it is non-dumpable from
its fork, and that execve goes through a sealed trampoline (trampoline.py), so nothing in the
container can reach the host's binary through /proc.
"""

from __future__ import annotations

import errno
import os

from . import capabilities, devices, mounts, namespaces, procfs, rlimits, trampoline
from . import syscalls as sc
from ._lite.dataclasses import record
from .errors import ContainerError, NotSupported, SpecError, StockadeError
from .idmap import write_maps
from .spec import Linux, Process, Spec, sysctl_namespace, sysctl_path

TYPE_CHECKING = False  # typing itself costs ~2 ms of every start
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Message tags, child -> runtime.
_MAP, _PID, _HOOKS, _MOVED, _READY, _ERROR = b"M", b"P", b"H", b"V", b"R", b"E"
_OK = b"K"  # runtime -> child


@record
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
    cgroup_move: _CgroupMove | None = None  # set by spawn: wait() before the container may start
    run_create_container_hooks: Callable[[], None] | None = None
    run_start_container_hooks: Callable[[], None] | None = None
    preserve_fds: int = 0
    cgroup_dir: str | None = None  # the cgroup2 directory the init is born in (CLONE_INTO_CGROUP)
    cgroup_mounts: dict[str, str] | None = None  # hierarchy name -> container's dir, for `cgroup` mounts


_host_pid = 0


def host_pid() -> int:
    """Inside the container init (e.g. in run_start_container_hooks): its pid as the runtime sees it,
    for the OCI state given to hooks (os.getpid() there says 1 in a new pid namespace)."""
    return _host_pid or os.getpid()


# ---------------------------------------------------------------------------------------------
# Runtime side
# ---------------------------------------------------------------------------------------------


def spawn(launch: Launch) -> int:
    """Create the container; returns the init's host pid once it is about to block on the exec fifo.
    Its moves into v1 hierarchies may still be under way then: call launch.cgroup_move.wait()
    before anything can release it (container.create does, after its own remaining work).

    The calling process becomes a child subreaper so the init (a grandchild when a pid namespace
    is created) is reparented to it and can be waited for.
    """
    if launch.spec.process.terminal and not launch.console_socket:
        raise SpecError(
            "a terminal needs a console socket",
            where="process.terminal",
            hint="pass --console-socket, or set terminal to false",
        )
    _give_fifo_to_container_root(launch)
    _preload(launch.spec.process, launch.seccomp_program)
    _preload_hooks(launch)
    body = lambda w, r: _Init(launch, w, r).run()  # noqa: E731
    pid, to_parent_r, to_child_w = _fork_child(
        body, launch.preserve_fds, launch.cgroup_dir, _clone_namespaces(launch)
    )
    return _supervise(pid, to_parent_r, to_child_w, launch=launch)


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


# In a child of _fork_child: the CLONE_NEW* flags it was born with.
_cloned_namespaces = 0


def _fork_child(
    body: Callable[[int, int], None],
    preserve_fds: int,
    cgroup_dir: str | None = None,
    clone_namespaces: int = 0,
) -> tuple[int, int, int]:
    """Fork with a pipe each way. The child runs body(to_parent_w, to_child_r) and never returns;
    the parent gets (pid, to_parent_r, to_child_w). As child subreaper, the parent can reap the
    grandchild that becomes the container's process. With `cgroup_dir` (cgroup2) the child is born
    in that cgroup, or joins it first where clone3 cannot place it.

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
    pid, join, cloned = _fork_into(cgroup_dir, clone_namespaces)
    if pid == 0:
        os.close(to_parent_r)
        os.close(to_child_w)

        def child() -> None:
            global _cloned_namespaces
            _cloned_namespaces = cloned
            sc.close_fds_from(3 + preserve_fds, keep=(to_parent_w, to_child_r, exec_fd))
            os.setsid()
            _join_cgroups(join)
            body(to_parent_w, to_child_r)

        _child_main(child, to_parent_w)
    os.close(to_parent_w)
    os.close(to_child_r)
    return pid, to_parent_r, to_child_w


def _fork_into(cgroup_dir: str | None, clone_namespaces: int = 0) -> tuple[int, list[str], int]:
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


def _preload(process: Process, seccomp_program: bytes | None) -> None:
    """Import, before forking, every module the child may need: after pivot_root (or setns into the
    container's mount namespace) the runtime's own files are out of reach, and importing once in the
    parent is cheaper than in each child."""
    if process.terminal:
        from . import console  # noqa: F401
    if seccomp_program is not None:
        from . import seccomp  # noqa: F401
    from ._lite import json as jsonlite  # noqa: F401 - error reports


def _preload_hooks(launch: Launch) -> None:
    """The startContainer callback runs after pivot_root: load the hook runner it imports now."""
    if launch.run_start_container_hooks is not None or launch.run_create_container_hooks is not None:
        try:
            from . import hooks  # noqa: F401
        except ImportError:
            pass


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
    """`runc exec`: run `process` inside the namespaces and cgroups of container init `pid`
    (started at `pid_start`, in clock ticks: a pid that was reused is refused).

    Returns the exit code (128+signal) when attached, the new process's host pid when detached.
    """
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
    _preload(process, seccomp_program)

    def body(to_parent_w: int, to_child_r: int) -> None:
        _Exec(
            (pid, pid_start),
            spec,
            process,
            cgroup_procs,
            seccomp_program,
            seccomp_flags,
            console_socket,
            preserve_fds,
            to_parent_w,
            to_child_r,
        ).run()

    child, to_parent_r, to_child_w = _fork_child(body, preserve_fds, cgroup_dir)
    worker = _supervise(child, to_parent_r, to_child_w)
    if pid_file is not None:
        _write_pid_file(str(pid_file), worker)
    if detach:
        return worker
    _, status = os.waitpid(worker, 0)
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _write_pid_file(path: str, pid: int) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.replace(tmp, path)


def _supervise(stage1: int, rfd: int, wfd: int, launch: Launch | None = None) -> int:
    """Serve the child's requests until it is ready; on any failure kill and reap everything."""
    init_pid = 0
    alive = {stage1}  # our unreaped children: only these may be signalled (a reaped pid can be reused)
    try:
        while True:
            tag, payload = _recv(rfd)
            if tag == _MAP:
                write_maps(stage1, launch.spec.linux.uid_mappings, launch.spec.linux.gid_mappings)
                _send(wfd, _OK)
            elif tag == _PID:
                init_pid = int(payload) or stage1  # 0: "me", an init born in its pid namespace
                if init_pid != stage1:
                    alive.add(init_pid)  # reparented to us (child subreaper) when stage 1 exits
                    os.waitpid(stage1, 0)  # stage 1 exits once it has forked the init
                    alive.discard(stage1)
                _send(wfd, _OK, str(init_pid).encode())  # its host pid (it may only know itself as 1)
                if launch is not None:
                    launch.cgroup_move = _CgroupMove(init_pid, launch.cgroup_procs)
                    if launch.on_pid is not None:
                        launch.on_pid(init_pid)
            elif tag == _HOOKS:
                if launch is not None and launch.on_created is not None:
                    if _has_hooks(launch.spec):  # hooks see the container in its cgroups
                        launch.cgroup_move.wait()
                    launch.on_created(init_pid)
                _send(wfd, _OK)
            elif tag == _MOVED:  # the init waits for its v1 cgroups before its cgroup namespace
                launch.cgroup_move.wait()
                _send(wfd, _OK)
            elif tag == _READY:
                return init_pid
            elif tag == _ERROR:
                raise _decode_error(payload)
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
        os.close(rfd)
        os.close(wfd)


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


# ---------------------------------------------------------------------------------------------
# Framing: tag (1 byte) + length (4 bytes) + payload
# ---------------------------------------------------------------------------------------------


def _send(fd: int, tag: bytes, payload: bytes = b"") -> None:
    os.write(fd, tag + len(payload).to_bytes(4, "little") + payload)


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def _recv(fd: int) -> tuple[bytes, bytes]:
    head = _read_exact(fd, 5)
    if len(head) < 5:
        return b"", b""
    return head[:1], _read_exact(fd, int.from_bytes(head[1:], "little"))


def _encode_error(exc: BaseException) -> bytes:
    from ._lite import json as jsonlite

    if isinstance(exc, StockadeError):
        d = {"type": type(exc).__name__, "what": exc.what, "where": exc.where, "hint": exc.hint}
    elif isinstance(exc, OSError):
        what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
        d = {"type": "StockadeError", "what": what, "where": "container init"}
    else:
        d = {
            "type": "StockadeError",
            "what": f"internal error: {type(exc).__name__}: {exc}",
            "where": "container init",
        }
    return jsonlite.dumps(d).encode()


def _decode_error(payload: bytes) -> StockadeError:
    from ._lite import json as jsonlite

    d = jsonlite.loads(payload)
    cls = {"SpecError": SpecError, "NotSupported": NotSupported, "ContainerError": ContainerError}.get(
        d.get("type"), StockadeError
    )
    return cls(d.get("what", "unknown error"), where=d.get("where", ""), hint=d.get("hint", ""))


def _child_main(body: Callable[[], None], report_fd: int) -> None:
    """Run `body` in a forked child; never return to the caller's code."""
    code = 1
    try:
        body()
        code = 0
    except _Reported as exc:
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the runtime
        try:
            _send(report_fd, _ERROR, _encode_error(exc))
        except OSError:
            _stderr(f"stockade: {exc}")
    finally:
        os._exit(code)


class _Reported(Exception):
    """A failure after `ready`: already written to the container's stderr; exit with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code


def _stderr(text: str) -> None:
    try:
        os.write(2, (text + "\n").encode(errors="replace"))
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Child side: shared steps
# ---------------------------------------------------------------------------------------------


def _has_hooks(spec: Spec) -> bool:
    h = spec.hooks
    return bool(h.prestart or h.create_runtime or h.create_container or h.start_container)


class _CgroupMove:
    """Moves the init into its v1 hierarchies on a thread. Each move waits for an RCU grace
    period (see syscalls.fork_into_cgroup: 7-25 ms), which then overlaps with the init building
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


def _join_cgroups(files: list[str]) -> None:
    for path in files:
        try:
            with open(path, "w") as f:
                f.write("0")
        except OSError as exc:
            raise StockadeError(
                f"cannot join cgroup {path}: {exc.strerror}", where="linux.cgroupsPath"
            ) from None


def _find_executable(process: Process, env: dict[str, str]) -> str:
    """Resolve args[0] in the container (after pivot_root) the way execvp would, so `create` can fail."""
    name = process.args[0]
    if "/" in name:
        path = os.path.join(process.cwd, name)
        if not os.path.isfile(path):
            raise StockadeError(f"exec: {name!r}: no such file", where="process.args[0]")
        if not os.access(path, os.X_OK):
            raise StockadeError(f"exec: {name!r}: permission denied", where="process.args[0]")
        return path
    for directory in env.get("PATH", DEFAULT_PATH).split(":"):
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise StockadeError(f"exec: {name!r}: executable file not found in $PATH", where="process.args[0]")


def _environment(process: Process) -> dict[str, str]:
    env = dict(item.split("=", 1) for item in process.env)
    if "HOME" not in env:
        env["HOME"] = _home_of(process.user.uid)
    return env


def _home_of(uid: int) -> str:
    try:
        with open("/etc/passwd") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) >= 6 and parts[2] == str(uid):
                    return parts[5]
    except OSError:
        pass
    return "/"


def _apply_oom_score_adj(value: int | None, where: str) -> None:
    if value is None:
        return
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as exc:
        hint = "lowering the OOM score needs CAP_SYS_RESOURCE, which the runtime lacks" if value < 0 else ""
        raise StockadeError(
            f"cannot set oomScoreAdj to {value}: {exc.strerror}", where=where, hint=hint
        ) from None


def _become_user(process: Process) -> None:
    """Switch to process.user, keeping the permitted capabilities for the capset that follows."""
    user = process.user
    try:
        sc.set_keepcaps(True)
        os.setgroups(user.additional_gids)
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
        sc.set_keepcaps(False)
    except OSError as exc:
        raise StockadeError(
            f"cannot switch to uid {user.uid} gid {user.gid}: {exc.strerror}",
            where="process.user",
            hint="the IDs must be mapped in the user namespace",
        ) from None
    if user.umask is not None:
        os.umask(user.umask)
    _enter_cwd(process.cwd, user.uid)


def _enter_cwd(cwd: str, uid: int = 0) -> None:
    """chdir, then make sure the directory is inside the container's root: a cwd such as
    /proc/self/fd/N resolves to whatever descriptor N is and can leave the root (CVE-2024-21626);
    the kernel then reports the path as unreachable and getcwd fails."""
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise StockadeError(
            f"cannot enter cwd {cwd!r} as uid {uid}: {exc.strerror}", where="process.cwd"
        ) from None
    try:
        os.getcwd()
    except FileNotFoundError:
        raise StockadeError(
            f"cwd {cwd!r} is outside the container's root filesystem: refusing a possible breakout",
            where="process.cwd",
            hint="use a directory inside the container; /proc/self/fd/N names the runtime's descriptors",
        ) from None


def _join_new_keyring() -> None:
    """A fresh anonymous session keyring, as runc does: the caller's session keyring (and the keys
    it links) stays out of the container. Where keyctl itself is unavailable (no CONFIG_KEYS, or a
    filter this process runs under already denies it), so is every keyring to the workload."""
    try:
        sc.join_session_keyring()
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM):
            raise StockadeError(
                f"cannot join a new session keyring: {exc.strerror}", where="container init"
            ) from None


def _finalize(
    personality: int | None,
    process: Process,
    env: dict[str, str],
    preserve_fds: int,
    seccomp_program: bytes | None,
    seccomp_flags: list[str],
    keep: tuple[int, ...],
) -> str:
    """Everything from the AppArmor label to the seccomp filter, done before the process is
    released, so that a failure is `create`'s (or `exec`'s) error, as with runc: after `start`
    only the exec is left. Returns the executable, found with the user's permissions. `keep`:
    descriptors still needed until then (every other one past the preserved ones is closed)."""
    if seccomp_program is not None:
        from .seccomp import load_program
    # Without no_new_privs the kernel loads a filter only for CAP_SYS_ADMIN: then it goes in
    # while we still have it, and also covers the user switch and the capability drop (runc's
    # order; engines' default profiles allow those calls). With no_new_privs, as late as possible.
    early = seccomp_program is not None and not process.no_new_privileges
    if process.apparmor_profile:
        _set_apparmor(process.apparmor_profile)
    if process.no_new_privileges:
        sc.set_no_new_privs()
    if early:
        load_program(seccomp_program, seccomp_flags)
    capabilities.drop_bounding(process.capabilities)
    _become_user(process)
    capabilities.apply(process.capabilities)
    if personality is not None:
        sc.personality(personality)
    path = _find_executable(process, env)
    sc.close_fds_from(3 + preserve_fds, keep=(trampoline.fd(), *keep))
    if seccomp_program is not None and not early:
        load_program(seccomp_program, seccomp_flags)  # the filter applies to us from here on
    return path


def _exec(path: str, process: Process, env: dict[str, str]) -> None:
    """The last step, through the trampoline; a failure goes to the container's stderr."""
    exec_path, exec_argv = trampoline.argv(path, process.args)
    # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive execve, so restore them.
    import _signal

    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(sig, _signal.SIG_DFL)
    try:
        os.execve(exec_path, exec_argv, env)
    except OSError as exc:
        _stderr(f"stockade: exec {process.args[0]!r}: {exc.strerror}")
        raise _Reported(127 if exc.errno == 2 else 126) from None


def _set_apparmor(profile: str) -> None:
    for name in ("attr/apparmor/exec", "attr/exec"):
        try:
            procfs.write(procfs.self_path(name), f"exec {profile}", "process.apparmorProfile")
            return
        except StockadeError:
            if os.path.exists(procfs.self_path(name)):
                raise
    raise StockadeError(f"cannot set AppArmor profile {profile!r}", where="process.apparmorProfile")


# ---------------------------------------------------------------------------------------------
# Child side: create
# ---------------------------------------------------------------------------------------------


class _Init:
    def __init__(self, launch: Launch, wfd: int, rfd: int) -> None:
        self.launch, self.spec, self.wfd, self.rfd = launch, launch.spec, wfd, rfd
        self.late_cgroupns = False

    def _ask(self, tag: bytes, payload: bytes = b"") -> bytes:
        _send(self.wfd, tag, payload)
        reply, answer = _recv(self.rfd)
        if reply != _OK:
            os._exit(1)  # the runtime gave up (it kills us anyway)
        return answer

    def run(self) -> None:
        launch, spec = self.launch, self.spec
        linux, process = spec.linux, spec.process
        sock = None
        if process.terminal:
            from . import console

            sock = console.connect(launch.console_socket)

        capabilities.check_grantable(process.capabilities)
        # Before any user namespace: the init is non-dumpable, so its /proc/self files stay the
        # host root's (runc also writes this first).
        _apply_oom_score_adj(process.oom_score_adj, "process.oomScoreAdj")
        try:
            fifo = os.open(launch.exec_fifo, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise StockadeError(
                f"cannot open the exec fifo: {exc.strerror}", where=str(launch.exec_fifo)
            ) from None
        if _cloned_namespaces:  # born in its namespaces: none to join, unshare or fork for
            self._born_in_namespaces(linux)
            self._build_rootfs(False, sock, fifo)
            return
        runtime_ns = {kind: namespaces.inode("self", kind) for kind in ("uts", "ipc", "network")}
        # Namespaces given by path first (user first), as runc does, so that e.g. a netns owned by
        # the host user namespace can still be joined before we create a new user namespace.
        namespaces.join(namespaces.open_paths(linux.namespaces))
        userns = linux.namespace("user")
        if userns is not None and not userns.path:
            namespaces.unshare(sc.CLONE_NEWUSER)
            self._ask(_MAP)
        if userns is not None:
            try:
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            except OSError:
                pass  # root is not mapped: setup continues with the capabilities the user ns gave us
        # A cgroup namespace is rooted at the cgroups current at unshare: with v1 hierarchies to
        # join (the runtime moves the init while it builds the rootfs) that waits for HOOKS.
        cgroupns = linux.namespace("cgroup")
        self.late_cgroupns = bool(launch.cgroup_procs) and cgroupns is not None and not cgroupns.path
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
        timens = linux.namespace("time")
        if linux.namespace("pid") is not None or (timens is not None and not timens.path):
            # New pid and time namespaces apply to children only: the workload is the child.
            child = os.fork()
            if child:
                _send(self.wfd, _PID, str(child).encode())
                os._exit(0)
            reply, payload = _recv(self.rfd)
            if reply != _OK:
                os._exit(1)
        else:
            payload = self._ask(_PID, str(os.getpid()).encode())
        global _host_pid
        _host_pid = int(payload)

        self._build_rootfs(userns is not None, sock, fifo)

    def _born_in_namespaces(self, linux: Linux) -> None:
        cgroupns = linux.namespace("cgroup")
        self.late_cgroupns = bool(self.launch.cgroup_procs) and cgroupns is not None
        netns = linux.namespace("network")
        if netns is not None:
            namespaces.loopback_up()
        global _host_pid
        _host_pid = int(self._ask(_PID, b"0"))

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

    def _build_rootfs(self, in_userns: bool, sock, fifo: int) -> None:

        launch, spec = self.launch, self.spec
        linux, process = spec.linux, spec.process
        rootfs = str(launch.rootfs)
        _join_new_keyring()
        mounts.prepare_root(rootfs, linux.rootfs_propagation)
        rootfd = mounts.open_root(rootfs)
        mounts.mount_all(spec.mounts, rootfd, str(launch.bundle), launch.cgroup_mounts or {})
        devices.setup(rootfd, linux.devices, in_userns)
        pty = None
        if process.terminal:
            pty = self._open_console(rootfd)
        os.close(rootfd)

        self._ask(_HOOKS)  # the runtime runs createRuntime/prestart hooks (on_created)
        if launch.run_create_container_hooks is not None:
            launch.run_create_container_hooks()
        if launch.no_pivot:
            mounts.move_root(rootfs)
        else:
            mounts.pivot(rootfs)
        mounts.set_root_propagation(linux.rootfs_propagation)

        if spec.hostname:
            sc.sethostname(spec.hostname)
        if spec.domainname:
            sc.setdomainname(spec.domainname)
        self._sysctl()
        mounts.make_readonly(linux.readonly_paths)
        mounts.mask(linux.masked_paths)
        if spec.root.readonly:
            mounts.readonly_root()
        if pty is not None:
            from . import console

            master, slave, number = pty
            console.send_master(sock, master, f"/dev/pts/{number}")
            console.make_controlling(slave)
        if process.rlimits:
            rlimits.apply(process.rlimits)
        if not os.path.isdir("/proc/self/fd"):
            raise SpecError(
                "the container has no /proc",
                where="mounts",
                hint="mount proc at /proc: the exec fifo is reopened through it",
            )
        env = _environment(process)
        if self.late_cgroupns:  # rooted at the v1 cgroups the runtime moves us into: wait for them
            self._ask(_MOVED)
            namespaces.unshare(sc.CLONE_NEWCGROUP)
        fd_dir = procfs.open_file(procfs.self_path("fd"), os.O_PATH | os.O_DIRECTORY, "exec fifo")
        path = _finalize(
            spec.linux.personality,
            process,
            env,
            launch.preserve_fds,
            launch.seccomp_program,
            launch.seccomp_flags,
            keep=(fifo, fd_dir, self.wfd, self.rfd),
        )
        _send(self.wfd, _READY)
        os.close(self.wfd)
        os.close(self.rfd)
        self._wait_for_start(fifo, fd_dir)
        if launch.run_start_container_hooks is not None:
            try:
                launch.run_start_container_hooks()
            except Exception as exc:  # noqa: BLE001 - a failing hook must stop the container, loudly
                _stderr(f"stockade: startContainer hook failed: {exc}")
                raise _Reported(1) from None
        _exec(path, process, env)

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

    def _sysctl(self) -> None:
        for key, value in self.spec.linux.sysctl.items():
            try:
                procfs.write(sysctl_path(key), value, f"linux.sysctl.{key}")
            except OSError as exc:
                raise StockadeError(
                    f"cannot set sysctl {key}={value!r}: {exc.strerror}", where=f"linux.sysctl.{key}"
                ) from None

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


# ---------------------------------------------------------------------------------------------
# Child side: exec
# ---------------------------------------------------------------------------------------------


class _Exec:
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
        wfd: int,
        rfd: int,
    ) -> None:
        (self.pid, self.pid_start), self.spec, self.process = init, spec, process
        self.cgroup_procs, self.seccomp_program, self.seccomp_flags = (
            cgroup_procs,
            seccomp_program,
            seccomp_flags,
        )
        self.console_socket, self.preserve_fds, self.wfd, self.rfd = console_socket, preserve_fds, wfd, rfd

    def run(self) -> None:

        process = self.process
        sock = None
        if process.terminal:
            from . import console

            sock = console.connect(self.console_socket)
        capabilities.check_grantable(process.capabilities)
        _apply_oom_score_adj(process.oom_score_adj, "process.oomScoreAdj")  # see _Init.run
        opened = namespaces.open_process(self.pid, self.pid_start)
        _join_cgroups(self.cgroup_procs)
        namespaces.join(opened)
        if any(kind == "user" for kind, _ in opened):
            try:
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
            except OSError:
                pass
        child = os.fork()  # a joined pid namespace applies to children only
        if child:
            _send(self.wfd, _PID, str(child).encode())
            os._exit(0)
        reply, _ = _recv(self.rfd)
        if reply != _OK:
            os._exit(1)
        if sock is not None:
            from . import console

            master, slave, number = console.open_pty("/dev/pts/ptmx", process.console_size)
            console.send_master(sock, master, f"/dev/pts/{number}")
            console.make_controlling(slave)
        if process.rlimits:
            rlimits.apply(process.rlimits)
        _join_new_keyring()
        env = _environment(process)
        path = _finalize(
            self.spec.linux.personality,
            process,
            env,
            self.preserve_fds,
            self.seccomp_program,
            self.seccomp_flags,
            keep=(self.wfd, self.rfd),
        )
        _send(self.wfd, _READY)
        os.close(self.wfd)
        os.close(self.rfd)
        _exec(path, process, env)
