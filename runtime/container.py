"""Container lifecycle: the library API behind `stockade-oci`, `stockade run` and the CRI daemon.

Each public function takes the runtime root, does one OCI operation under the container's
lock, and either completes or leaves nothing behind (no cgroup, state directory or process).
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` imports enum (bench/README.md, start-path costs)
import os
import select
import time

from ._lite.contextlib import suppress
from ._lite.dataclasses import dataclass, field
from .errors import ContainerError, SpecError, StockadeError
from .files import write_atomic
from .state import State, StateStore, process_alive, process_start_time, validate_id

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

OCI_VERSION = "1.2.1"
KILL_WAIT_SECONDS = 10.0


@dataclass
class CreateOptions:
    """What `create` needs beyond the bundle; CLI flags and CRI requests fill it."""

    pid_file: Path | None = None
    console_socket: str | None = None
    no_pivot: bool = False
    preserve_fds: int = 0
    allow_degraded: bool = False  # explicit opt-in to run without a layer the host cannot enforce
    spec: Any = None  # an already-parsed Spec (stockade run builds one in memory)
    rootfs: Path | None = None  # overrides spec.root.path resolution (stockade run's built-in rootfs)
    # Called with the container's cgroup2 id once its cgroup exists, before the init is forked
    # (the profile recorder attaches there: the init installs the filter during create).
    on_cgroup: Callable[[int], None] | None = None
    # Told each setting accepted without effect, as runc accepts it (spec.ignored_fields): the
    # CLIs write it to their log, a daemon to its own.
    warn: Callable[[str], None] | None = None
    debug: Callable[[str], None] | None = None  # told each step of create (`--debug`)


@dataclass
class Status:
    """OCI state plus what Stockade adds (cgroup, degraded layers)."""

    state: State
    status: str
    extra: dict[str, Any] = field(default_factory=dict)

    def oci(self) -> dict[str, Any]:
        s = self.state
        out: dict[str, Any] = {
            "ociVersion": OCI_VERSION,
            "id": s.id,
            "status": self.status,
            "pid": s.pid if self.status not in ("stopped",) else 0,
            "bundle": s.bundle,
            "rootfs": s.rootfs,
            "created": s.created,
            "owner": s.owner,
        }
        if s.annotations:
            out["annotations"] = s.annotations
        if s.degraded:
            out["stockade.degraded"] = s.degraded
        if s.egress:
            out["stockade.egress"] = s.egress
        return out


# ---------------------------------------------------------------- create


def create(
    root: Path | str, container_id: str, bundle: Path | str, opts: CreateOptions | None = None
) -> State:
    """Set up the container and leave its init waiting before the user's process (OCI `create`)."""
    from . import spec as specmod

    opts = opts or CreateOptions()
    validate_id(container_id)
    bundle = os.path.realpath(bundle)  # plain strings from here on (see state.StateStore)
    store = StateStore(root)
    if os.path.exists(store.dir(container_id)):
        raise ContainerError(
            f"container {container_id!r} already exists", hint="delete it first or pick another ID"
        )
    spec = opts.spec or specmod.load_bundle(bundle)
    if opts.warn is not None:
        for note in specmod.ignored_fields(spec):
            opts.warn(note)
    rootfs = os.fspath(opts.rootfs) if opts.rootfs else _rootfs_of(spec, bundle)
    seccomp_program = _compile_seccomp(spec)
    state_dir = store.claim(container_id)
    undo: list[Callable[[], None]] = [lambda: store.remove(container_id)]
    try:
        with store.lock(container_id):
            state = _create_in(
                store, state_dir, container_id, bundle, rootfs, spec, seccomp_program, opts, undo
            )
    except BaseException:
        _rollback(undo)
        raise
    return state


def _create_in(
    store: StateStore,
    state_dir: str,
    container_id: str,
    bundle: str,
    rootfs: str,
    spec: Any,
    seccomp_program: bytes | None,
    opts: CreateOptions,
    undo: list[Callable[[], None]],
) -> State:
    from . import cgroups, init

    state = State(
        id=container_id,
        bundle=str(bundle),
        rootfs=str(rootfs),
        created=_now(),
        owner="",
        annotations=dict(spec.annotations or {}),
        later_hooks=[kind for kind in ("poststart", "poststop") if getattr(spec.hooks, kind)],
    )
    cg_path = cgroups.resolve_path(spec.linux.cgroups_path, container_id)
    driver = cgroups.open_driver()
    cgroup = driver.create(cg_path, _resources(spec))
    undo.append(cgroup.destroy)
    _debug(opts, lambda: f"{container_id}: cgroup {cg_path} ({driver.name} driver)")
    state.cgroup_path, state.cgroup_driver, state.cgroup_id = cg_path, driver.name, _unified_id(cgroup)
    _enforce_devices(cgroup)
    if opts.on_cgroup is not None:
        opts.on_cgroup(state.cgroup_id)
    write_atomic(os.path.join(state_dir, "config.json"), _spec_json(spec, bundle))
    fifo = os.path.join(state_dir, "exec.fifo")
    os.mkfifo(fifo)
    os.chmod(fifo, 0o622)  # as runc: the init opens it as the container's user (the directory is 0700)

    def on_created(pid: int) -> None:
        # The state hooks see has the init's pid while namespaces exist, before pivot_root.
        if not (spec.hooks.prestart or spec.hooks.create_runtime):
            return  # no subprocess import on the common path
        from .hooks import run_hooks

        snapshot = _oci_state(state, "creating", pid)
        run_hooks("prestart", spec.hooks.prestart, snapshot)
        run_hooks("createRuntime", spec.hooks.create_runtime, snapshot)

    launch = init.Launch(
        spec=spec,
        bundle=bundle,
        rootfs=rootfs,
        exec_fifo=fifo,
        cgroup_procs=_procs_outside(cgroup),
        cgroup_dir=_birth_cgroup(cgroup),
        cgroup_mounts=cgroup.hierarchy_dirs(),
        seccomp_program=seccomp_program,
        seccomp_flags=list((spec.linux.seccomp or {}).get("flags") or []),
        console_socket=opts.console_socket,
        no_pivot=opts.no_pivot,
        on_created=on_created,
        run_create_container_hooks=_in_container_hooks(
            "createContainer", spec.hooks.create_container, state, opts.preserve_fds
        ),
        run_start_container_hooks=_in_container_hooks(
            "startContainer", spec.hooks.start_container, state, opts.preserve_fds
        ),
        preserve_fds=opts.preserve_fds,
    )
    def on_pid(pid: int) -> None:  # while the init sets up
        undo.append(lambda: _kill_and_wait(pid, process_start_time(pid)))
        undo.append(lambda: launch.cgroup_move.wait(check=False))  # undone first: no move in flight
        state.pid, state.pid_start = pid, process_start_time(pid)
        _debug(opts, lambda: f"{container_id}: init pid {pid}")
        _install_bpf(state, spec, opts, undo, _birth_cgroup(cgroup))
        _debug(opts, lambda: f"{container_id}: BPF policy {state.bpf_policy or 'none'}, "
               f"degraded {state.degraded}")
        store.save(state)

    launch.on_pid = on_pid
    pid = init.spawn(launch)
    if opts.pid_file:
        write_atomic(opts.pid_file, str(pid), 0o644)
    launch.cgroup_move.wait()  # the init is in all of its cgroups before anyone can start it
    _debug(opts, lambda: f"{container_id}: created, the init waits for start")
    return state


def _debug(opts: CreateOptions, message: Callable[[], str]) -> None:
    if opts.debug is not None:
        opts.debug(message())


def _birth_cgroup(cgroup: Any) -> str | None:
    """The cgroup2 directory a container process is born in (clone3 CLONE_INTO_CGROUP)."""
    try:
        return cgroup.unified_path()
    except StockadeError:  # a pure v1 host has no cgroup2 tree
        return None


def _procs_outside(cgroup: Any) -> list[str]:
    """cgroup.procs files a new container process must write itself into: those of the v1
    hierarchies, not the cgroup2 one it is born in."""
    birth = _birth_cgroup(cgroup)
    return [f for f in cgroup.procs_files() if os.path.dirname(f) != birth]


def _unified_id(cgroup: Any) -> int:
    """The cgroup id BPF keys on; 0 on a pure v1 host (then no BPF policy can be installed)."""
    from .errors import NotSupported

    try:
        return cgroup.unified_id()
    except NotSupported:
        return 0


def _enforce_devices(cgroup: Any) -> None:
    """cgroup v2 has no devices.allow: the allow-list is a BPF program on the container's cgroup."""
    if getattr(cgroup, "devices_enforced", True):
        return
    from stockade.bpf.device_filter import attach_device_filter

    attach_device_filter(cgroup.unified_path(), cgroup.device_rules, replace=False)


def _rootfs_of(spec: Any, bundle: str) -> str:
    return os.path.realpath(os.path.join(bundle, spec.root.path))  # join keeps an absolute path


def _resources(spec: Any) -> Any:
    from .resources import Resources, allowing_mknod

    res = spec.linux.resources
    if res is not None and not isinstance(res, Resources):
        res = Resources.from_oci(res)
    return allowing_mknod(res, spec.linux.devices)


def _compile_seccomp(spec: Any) -> bytes | None:
    if not spec.linux.seccomp:
        return None
    from .seccomp import compile_program

    return compile_program(spec.linux.seccomp, where="config.json: linux.seccomp")


def _install_bpf(state: State, spec: Any, opts: CreateOptions, undo: list[Callable[[], None]],
                 cgroup_dir: str | None = None) -> None:
    """Put the container's BPF policy into the pinned maps while its init waits on the fifo."""
    if not spec.annotations or "io.stockade.bpf-policy" not in spec.annotations:
        return  # no policy named: not even the glue module to import
    from .bpfpolicy import install

    if install(state, spec, allow_degraded=opts.allow_degraded, warn=opts.warn, cgroup_dir=cgroup_dir):
        undo.append(lambda: _remove_bpf(state))


def _remove_bpf(state: State) -> None:
    from .bpfpolicy import remove

    remove(state)


def _in_container_hooks(
    kind: str, hooks: list, state: State, preserve_fds: int
) -> Callable[[int], None] | None:
    """Hooks the init runs in the container, called with its host pid. Their binaries are the
    image's (startContainer), so they are executed through the trampoline, like the workload; the
    descriptors preserved for the workload are close-on-exec meanwhile, as every other descriptor
    of the init is."""
    if not hooks:
        return None

    def run(host_pid: int) -> None:
        from .hooks import run_hooks

        preserved = [fd for fd in range(3, 3 + preserve_fds) if _set_inheritable(fd, False)]
        try:
            run_hooks(kind, hooks, _oci_state(state, "created", host_pid), in_container=True)
        finally:
            for fd in preserved:
                _set_inheritable(fd, True)

    return run


def _set_inheritable(fd: int, on: bool) -> bool:
    try:
        os.set_inheritable(fd, on)
    except OSError:
        return False
    return True


def _spec_json(spec: Any, bundle: str) -> str:
    """The spec as created; `exec` reads it back, so the bundle may change or vanish later."""
    raw = getattr(spec, "raw", None)
    if raw is not None:
        from ._lite import json as jsonlite

        return jsonlite.dumps(raw)
    with open(os.path.join(bundle, "config.json")) as f:
        return f.read()


def _rollback(undo: list[Callable[[], None]]) -> None:
    for step in reversed(undo):
        with suppress(Exception):
            step()


# ---------------------------------------------------------------- start / state / kill / delete


def start(root: Path | str, container_id: str) -> State:
    """Release the waiting init so it execs the user's process (OCI `start`)."""
    store = StateStore(root)
    with store.lock(container_id) as state_dir:
        state = store.load(container_id)
        status = _status_of(state, state_dir)
        if status != "created":
            raise ContainerError(
                f"cannot start container {container_id!r} in status {status!r}",
                hint="only a created container can be started",
            )
        _release(state, os.path.join(state_dir, "exec.fifo"))
        state.started = True
        store.save(state)
    if _may_have_hook(state, "poststart"):
        spec = _load_spec(state_dir)
        if spec.hooks.poststart:
            from .hooks import run_hooks

            run_hooks("poststart", spec.hooks.poststart, _oci_state(state, "running", state.pid))
    return state


def _may_have_hook(state: State, kind: str) -> bool:
    """Whether the spec may hold `kind` hooks: the saved config is read only when it may."""
    return state.later_hooks is None or kind in state.later_hooks


def _release(state: State, fifo: str) -> None:
    # Non-blocking open: a dead init must not hang `start`; then wait for its byte.
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while True:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready and os.read(fd, 1):
                break
            if not process_alive(state.pid, state.pid_start):
                raise ContainerError(f"container {state.id!r} init exited before start")
            if time.monotonic() > deadline:
                raise ContainerError(f"container {state.id!r} init did not answer start")
    finally:
        os.close(fd)
    os.unlink(fifo)


def status(root: Path | str, container_id: str) -> Status:
    store = StateStore(root)
    state_dir = store.dir(container_id)
    state = store.load(container_id)
    return Status(state, _status_of(state, state_dir))


def _status_of(state: State, state_dir: str) -> str:
    if not state.pid or not process_alive(state.pid, state.pid_start):
        return "stopped"
    if os.path.exists(os.path.join(state_dir, "exec.fifo")):
        return "created"
    if cgroup_of(state).frozen():
        return "paused"
    return "running"


def cgroup_of(state: State) -> Any:
    from . import cgroups

    return cgroups.open_driver().open(state.cgroup_path)


def kill(root: Path | str, container_id: str, sig: int = signal.SIGTERM, all_processes: bool = False) -> None:
    store = StateStore(root)
    with store.lock(container_id) as state_dir:
        state = store.load(container_id)
        status = _status_of(state, state_dir)
        if status == "stopped" and not all_processes:
            # runc's words: containerd's shim reads them as "already exited"
            raise ContainerError(
                "container not running", hint=f"{container_id!r} has exited: nothing to signal"
            )
        if all_processes:
            cgroup_of(state).kill(sig)
        else:
            os.kill(state.pid, sig)


def delete(root: Path | str, container_id: str, force: bool = False) -> None:
    """Remove every trace of the container (OCI `delete`); `force` kills it first. Like runc,
    `force` on a container that does not exist succeeds: engines use it to make sure one is gone."""
    store = StateStore(root)
    if force and not os.path.exists(store.dir(container_id)):
        return
    with store.lock(container_id) as state_dir:
        state = store.load(container_id)
        status = _status_of(state, state_dir)
        if status in ("running", "paused") and not force:
            raise ContainerError(
                f"cannot delete container {container_id!r} in status {status!r}",
                hint="stop it first or use --force",
            )
        spec = _load_spec(state_dir) if _may_have_hook(state, "poststop") else None
        _teardown(state)
    store.remove(container_id)
    if spec is not None and spec.hooks.poststop:
        from .hooks import run_hooks

        run_hooks("poststop", spec.hooks.poststop, _oci_state(state, "stopped", 0))


def _teardown(state: State) -> None:
    cgroup = cgroup_of(state)
    if cgroup.frozen():
        cgroup.thaw()  # a frozen process cannot die
    _kill_and_wait(state.pid, state.pid_start)
    cgroup.destroy()
    if state.bpf_policy:
        _remove_bpf(state)


def _kill_and_wait(pid: int, start_time: int) -> None:
    if not process_alive(pid, start_time):
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while process_alive(pid, start_time) and time.monotonic() < deadline:
        with suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        time.sleep(0.002)


def _load_spec(state_dir: str) -> Any:
    from . import spec as specmod

    try:
        from ._lite import json as jsonlite

        with open(os.path.join(state_dir, "config.json")) as f:
            return specmod.parse_spec(jsonlite.loads(f.read()), where="state config.json")
    except (OSError, ValueError, StockadeError):
        return None


# ---------------------------------------------------------------- exec / pause / resume / update / ps / list


@dataclass
class ExecChanges:
    """`exec ID CMD...` without --process: the container's own process with these changes (runc's
    rules: a new terminal setting, cwd, extra env, user, no_new_privs)."""

    args: list[str]
    tty: bool = False
    cwd: str | None = None
    env: list[str] = field(default_factory=list)
    user: str | None = None  # UID[:GID]
    no_new_privs: bool = False


def exec_process_of(root: Path | str, container_id: str, changes: ExecChanges) -> Any:
    """The OCI process (spec.Process) `exec` runs for CHANGES in container CONTAINER_ID."""
    from . import spec as specmod
    from ._lite import json as jsonlite

    base = status(root, container_id)
    with open(os.path.join(os.fspath(root), base.state.id, "config.json")) as f:
        config = jsonlite.loads(f.read())
    proc = dict(config.get("process") or {})
    proc["args"] = list(changes.args)
    proc["terminal"] = changes.tty
    if changes.cwd:
        proc["cwd"] = changes.cwd
    if changes.env:
        proc["env"] = list(proc.get("env") or []) + list(changes.env)
    if changes.user:
        uid, _, gid = changes.user.partition(":")
        try:
            proc["user"] = {"uid": int(uid), "gid": int(gid or 0)}
        except ValueError:
            raise SpecError(f"--user {changes.user!r}: expected numeric UID[:GID]", where="--user") from None
    if changes.no_new_privs:
        proc["noNewPrivileges"] = True
    return specmod.parse_process(proc, where="exec arguments")


def exec_process(
    root: Path | str,
    container_id: str,
    process: Any,
    *,
    console_socket: str | None = None,
    detach: bool = False,
    pid_file: Path | None = None,
    preserve_fds: int = 0,
) -> int:
    """OCI `exec`: run another process in a running container; its exit code, or its pid if detached."""
    from .exec_process import exec_process

    store = StateStore(root)
    with store.lock(container_id) as state_dir:
        state = store.load(container_id)
        status = _status_of(state, state_dir)
        if status not in ("running", "created"):
            raise ContainerError(f"cannot exec in container {container_id!r} in status {status!r}")
        spec = _load_spec(state_dir)
        program = _compile_seccomp(spec)
        cgroup = cgroup_of(state)
    return exec_process(
        state.pid,
        spec,
        process,
        cgroup_procs=_procs_outside(cgroup),
        cgroup_dir=_birth_cgroup(cgroup),
        seccomp_program=program,
        seccomp_flags=list((spec.linux.seccomp or {}).get("flags") or []),
        console_socket=console_socket,
        detach=detach,
        pid_file=pid_file,
        preserve_fds=preserve_fds,
        pid_start=state.pid_start,
    )


def pause(root: Path | str, container_id: str) -> None:
    _freeze(root, container_id, True)


def resume(root: Path | str, container_id: str) -> None:
    _freeze(root, container_id, False)


def _freeze(root: Path | str, container_id: str, freeze: bool) -> None:
    store = StateStore(root)
    with store.lock(container_id) as state_dir:
        state = store.load(container_id)
        status = _status_of(state, state_dir)
        wanted = "running" if freeze else "paused"
        if status != wanted:
            verb = "pause" if freeze else "resume"
            raise ContainerError(f"cannot {verb} container {container_id!r} in status {status!r}")
        cgroup = cgroup_of(state)
        cgroup.freeze() if freeze else cgroup.thaw()


def update(root: Path | str, container_id: str, resources: dict) -> None:
    from .resources import Resources

    res = Resources.from_oci(resources, where="resources")
    store = StateStore(root)
    with store.lock(container_id) as state_dir:
        state = store.load(container_id)
        if _status_of(state, state_dir) == "stopped":
            raise ContainerError(f"container {container_id!r} is stopped", hint="nothing to update")
        cgroup_of(state).update(res)


def processes(root: Path | str, container_id: str) -> list[int]:
    store = StateStore(root)
    state = store.load(container_id)
    return sorted(cgroup_of(state).pids())


def list_containers(root: Path | str) -> list[Status]:
    store = StateStore(root)
    out = []
    for cid in store.ids():
        with suppress(ContainerError, OSError, ValueError):
            out.append(status(root, cid))
    return out


def wait(state: State) -> int:
    """Wait for the init (a child of this process or of its subreaper) and return an exit code."""
    while True:
        try:
            _, raw = os.waitpid(state.pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            # Not our child: poll until it is gone (no exit code to be had).
            while process_alive(state.pid, state.pid_start):
                time.sleep(0.01)
            return 0
        return exit_code(raw)


def exit_code(raw_status: int) -> int:
    if os.WIFSIGNALED(raw_status):
        return 128 + os.WTERMSIG(raw_status)
    return os.waitstatus_to_exitcode(raw_status)


def _oci_state(state: State, status_name: str, pid: int) -> dict[str, Any]:
    out = Status(state, status_name).oci()
    out["pid"] = pid
    return out


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"
