"""Recording the syscalls of a sandboxed command (bcc raw tracepoint on sys_enter, filtered by the
sandbox's cgroup id) and testing a command under a profile.

The sandboxed run is pluggable (see `Sandbox`). `RuntimeSandbox`, the default of the CLI, runs the
command in a real Stockade container configured as `stockade run` does (user namespace, built-in root
filesystem, limits) with the filter to record or test in place of the profile's; the runtime installs
it right before execve. `LocalSandbox` is a plain child process in a fresh cgroup2 directory that sets
no_new_privs and installs the filter just before execve in the same way (unit tests, the gallery's
servers, which need loopback in a private network namespace).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import platform
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from stockade.runtime import mountinfo
from stockade.runtime.errors import NotSupported, SpecError, StockadeError
from stockade.runtime.sandbox import SandboxOptions

BPF_SOURCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bpf", "syscall_record.bpf.c"
)
TRACEFS = "/sys/kernel/tracing"
_NR = {"x86_64": (59, 322, 317), "aarch64": (221, 281, 277)}  # execve, execveat, seccomp
# What `record` installs where the real filter would go: allows everything, marks the start.
RECORD_FILTER = {"defaultAction": "SCMP_ACT_ALLOW"}


class Sandbox(Protocol):
    """Runs one command confined and returns its exit code (124 on timeout).

    The filter comes both compiled (`program`, `flags`: a sandbox that loads it itself) and as the OCI
    LinuxSeccomp section (`seccomp`: a sandbox that hands it to the runtime). `on_cgroup(id)` is called
    with the cgroup2 id of the command's cgroup once that cgroup exists and before the command's
    set-up reaches its seccomp() call: the recorder is loaded there. `cgroup_id` holds that id from
    then on (0 before)."""

    cgroup_id: int

    def run(
        self,
        cmd: list[str],
        program: bytes | None = None,
        flags: list[str] | None = None,
        timeout: float | None = None,
        progress: Callable[[float], None] | None = None,
        *,
        seccomp: dict | None = None,
        on_cgroup: Callable[[int], None] | None = None,
    ) -> int: ...


@dataclass
class Recording:
    command: list[str]
    exit_code: int
    syscalls: dict[str, int] = field(default_factory=dict)
    denied: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_recorded(self) -> dict:
        return {"commands": [self.command], "syscalls": dict(sorted(self.syscalls.items()))}


# ---------------------------------------------------------------------------------------------
# the local sandbox


def unified_root() -> str:
    """The cgroup2 mount whose ids bpf_get_current_cgroup_id() reports."""
    for path in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if _fs_type(path) == "cgroup2":
            return path
    raise NotSupported(
        "no cgroup2 hierarchy mounted",
        where="/sys/fs/cgroup",
        hint="mount -t cgroup2 none /sys/fs/cgroup/unified",
    )


def _fs_type(path: str) -> str:
    try:
        return next((m.fstype for m in mountinfo.read() if m.point == path), "")
    except OSError:
        return ""


class LocalSandbox:
    """A child process in its own cgroup2 directory (stockade-rec-XXXX), nothing else."""

    def __init__(self, netns: bool = False) -> None:
        self.netns = netns  # a private network namespace with loopback up (servers in the gallery)
        self.path = os.path.join(unified_root(), f"stockade-rec-{secrets.token_hex(4)}")
        os.mkdir(self.path)
        self.cgroup_id = os.stat(self.path).st_ino

    def run(
        self,
        cmd: list[str],
        program: bytes | None = None,
        flags: list[str] | None = None,
        timeout: float | None = None,
        progress: Callable[[float], None] | None = None,
        *,
        seccomp: dict | None = None,
        on_cgroup: Callable[[int], None] | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> int:
        exe = shutil.which(cmd[0]) if cmd else None
        if not exe:
            raise SpecError(
                f"command not found: {cmd[0] if cmd else '(empty)'}",
                where="command",
                hint="give an existing program after --",
            )
        if program is None and seccomp is not None:
            from stockade.runtime.seccomp import compile_program

            program, flags = compile_program(seccomp, where="seccomp"), list(seccomp.get("flags") or [])
        if on_cgroup:
            on_cgroup(self.cgroup_id)
        procs = os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY)
        try:
            child = subprocess.Popen(
                [exe] + cmd[1:],
                preexec_fn=_enter(procs, program, flags or [], self.netns),
                close_fds=False,
                stdout=stdout,
                stderr=stderr,
            )
        finally:
            os.close(procs)
        return _wait(child, timeout, progress)

    def close(self) -> None:
        _kill_cgroup(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.path)

    def __enter__(self) -> LocalSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _enter(procs_fd: int, program: bytes | None, flags: list[str], netns: bool) -> Callable[[], None]:
    """Runs in the child between fork and exec: join the cgroup, then (last) install the filter."""

    def hook() -> None:
        os.write(procs_fd, b"0")
        if netns:
            _private_network()
        if program is not None:
            from stockade.runtime.seccomp import load_program, set_no_new_privs

            set_no_new_privs()
            load_program(program, flags)

    return hook


def _private_network() -> None:
    """unshare(CLONE_NEWNET) and bring loopback up (SIOCSIFFLAGS), without running `ip`."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        iff_up, iff_loopback, iff_running = 0x1, 0x8, 0x40
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", iff_up | iff_loopback | iff_running))


def _wait(child: subprocess.Popen, timeout: float | None, progress: Callable[[float], None] | None) -> int:
    start = time.monotonic()
    while True:
        try:
            return child.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            elapsed = time.monotonic() - start
            if progress:
                progress(elapsed)
            if timeout is not None and elapsed > timeout:
                child.kill()
                child.wait()
                return 124


def _kill_cgroup(path: str) -> None:
    kill = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill):
        with contextlib.suppress(OSError), open(kill, "w") as f:
            f.write("1")
    for _ in range(100):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# the runtime sandbox


class RuntimeSandbox:
    """The command in a real Stockade container, set up as `stockade run` sets it up (user namespace,
    the built-in root filesystem with the host's /usr read-only, no network, the limits given), except
    that the filter is the one to record with or to test, and no BPF policy is installed (no agent
    needed). Each run uses a private state root under /run and deletes the container and the root
    afterwards, also on errors, timeouts and Ctrl-C.

    `options` are `stockade run`'s (runtime.sandbox.SandboxOptions: limits, binds, env, user, a
    root filesystem); its profile is replaced by the filter under test."""

    def __init__(self, options: SandboxOptions | None = None, allow_degraded: bool = False) -> None:
        self.options = options or SandboxOptions()
        if self.options.bundle:
            raise SpecError(
                "--bundle is not a recording sandbox", where="sandbox options", hint="use --rootfs"
            )
        self.allow_degraded = allow_degraded
        self.cgroup_id = 0
        self.container_id = ""

    def run(
        self,
        cmd: list[str],
        program: bytes | None = None,
        flags: list[str] | None = None,
        timeout: float | None = None,
        progress: Callable[[float], None] | None = None,
        *,
        seccomp: dict | None = None,
        on_cgroup: Callable[[int], None] | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> int:
        from stockade.runtime import container
        from stockade.runtime.sandbox import prepare
        from stockade.runtime.syscalls import set_child_subreaper

        if program is not None and seccomp is None:
            raise StockadeError(
                "the runtime sandbox needs the filter as an OCI seccomp section, not a compiled program",
                where="RuntimeSandbox.run",
                hint="pass seccomp=",
            )
        if not cmd:
            raise SpecError("nothing to run", where="command", hint="... -- CMD ARGS")
        # The filter under test in place of a profile's; no BPF policy (it would need the agent).
        given = {**vars(self.options), "seccomp": seccomp, "bpf_policy": None}
        given["profile"] = "stockade-profile-record"
        cid = f"stockade-rec-{secrets.token_hex(4)}"
        root = tempfile.mkdtemp(prefix="stockade-rec-state-", dir="/run")
        try:
            with prepare(SandboxOptions(**given), cmd, cid) as (spec, bundle, rootfs):
                opts = container.CreateOptions(
                    spec=spec,
                    rootfs=rootfs,
                    allow_degraded=self.allow_degraded,
                    on_cgroup=lambda cgroup_id: self._cgroup_ready(cgroup_id, on_cgroup),
                )
                set_child_subreaper()  # the init (a grandchild) is reparented to us: we reap it
                self.container_id = cid
                with _stdio(stdout, stderr):
                    state = container.create(root, cid, bundle, opts)
                reaped = False
                try:
                    container.start(root, state.id)
                    code = _wait_init(root, state, timeout, progress)
                    reaped = True
                    return code
                finally:
                    container.delete(root, cid, force=True)
                    if not reaped:
                        _reap(state.pid)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _cgroup_ready(self, cgroup_id: int, on_cgroup: Callable[[int], None] | None) -> None:
        """The container's cgroup exists and its init is not forked yet: the filter under test goes
        in during `create`, so whatever records it attaches now."""
        if not cgroup_id:
            raise NotSupported(
                "the container has no cgroup2 id to record by",
                where="/sys/fs/cgroup",
                hint="mount cgroup2 (e.g. at /sys/fs/cgroup/unified)",
            )
        self.cgroup_id = cgroup_id
        if on_cgroup:
            on_cgroup(cgroup_id)


@contextlib.contextmanager
def _stdio(stdout: int | None, stderr: int | None) -> Iterator[None]:
    """The container's init inherits our fds 1 and 2 when it is forked: point them at the caller's
    files for that moment only."""
    saved, opened = [], []
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for fd, target in ((1, stdout), (2, stderr)):
            if target is None:
                continue
            if target == subprocess.DEVNULL:  # as subprocess.Popen takes it
                target = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                opened.append(target)
            saved.append((fd, os.dup(fd)))
            os.dup2(target, fd)
        yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        for fd in opened:
            os.close(fd)


def _wait_init(root: str, state: Any, timeout: float | None, progress: Callable[[float], None] | None) -> int:
    """Wait for the container's init (our child: we are its subreaper); kill everything on timeout."""
    from stockade.runtime import container

    start = time.monotonic()
    pidfd = os.pidfd_open(state.pid)
    try:
        while True:
            select.select([pidfd], [], [], 0.25)
            pid, raw = os.waitpid(state.pid, os.WNOHANG)
            if pid:
                return container.exit_code(raw)
            elapsed = time.monotonic() - start
            if progress:
                progress(elapsed)
            if timeout is not None and elapsed > timeout:
                container.kill(root, state.id, signal.SIGKILL, all_processes=True)
                os.waitpid(state.pid, 0)
                return 124
    finally:
        os.close(pidfd)


def _reap(pid: int) -> None:
    """After delete on an error path: collect the init if it is a zombie of ours."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# ---------------------------------------------------------------------------------------------
# tracefs


@contextlib.contextmanager
def tracefs() -> Iterator[None]:
    """Make sure tracefs is mounted (bcc looks there); unmount it again if we mounted it."""
    if _fs_type(TRACEFS) == "tracefs" or not os.path.isdir(TRACEFS):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise NotSupported(
            f"tracefs is not mounted and mounting it failed: {os.strerror(err)}",
            where=TRACEFS,
            hint=f"mount -t tracefs tracefs {TRACEFS}",
        )
    try:
        yield
    finally:
        libc.umount2(TRACEFS.encode(), 2)  # MNT_DETACH


# ---------------------------------------------------------------------------------------------
# the recorder


class Recorder:
    """bcc program counting one cgroup's syscalls (and seccomp denials when `denials`)."""

    def __init__(self, cgroup_id: int, arm: str = "seccomp", denials: bool = False) -> None:
        """arm: "seccomp" (count from the filter installation on), "exec" (from the first execve) or
        "now" (everything, for a running container)."""
        try:
            from bcc import BPF
        except ImportError:
            raise NotSupported(
                "bcc (python3-bpfcc) is not installed", hint="apt-get install python3-bpfcc"
            ) from None
        machine = platform.machine()
        if machine not in _NR:
            raise NotSupported(f"the recorder does not know {machine}'s syscall numbers")
        if denials and machine != "x86_64":
            raise NotSupported("denial counting reads x86_64 registers; run test in log mode")
        execve, execveat, seccomp_nr = _NR[machine]
        cflags = [
            f"-DSTK_CGROUP_ID={cgroup_id}ULL",
            f"-DSTK_NR_EXECVE={execve}",
            f"-DSTK_NR_EXECVEAT={execveat}",
            f"-DSTK_NR_SECCOMP={seccomp_nr}",
        ]
        if arm not in ("seccomp", "exec", "now"):
            raise ValueError(f"arm={arm!r}")
        if arm == "exec":
            cflags.append("-DSTK_ARM_ON_EXEC")
        elif arm == "seccomp":
            cflags.append("-DSTK_ARM_ON_SECCOMP")
        if denials:
            cflags.append("-DSTK_DENIALS")
        try:
            self.bpf = BPF(src_file=BPF_SOURCE.encode(), cflags=cflags)
        except Exception as e:  # bcc raises plain Exception on compile/load errors
            raise NotSupported(
                f"cannot load the syscall recorder: {e}",
                where=BPF_SOURCE,
                hint="needs root, raw tracepoints and kernel headers for bcc",
            ) from None
        self.denials = denials
        if arm == "now":
            self.arm()

    def arm(self) -> None:
        import ctypes as ct

        self.bpf[b"armed"][ct.c_int(0)] = ct.c_uint32(1)

    def counts(self) -> dict[str, int]:
        return _named(self.bpf[b"counts"])

    def denied(self) -> dict[str, int]:
        return _named(self.bpf[b"denied"]) if self.denials else {}

    def close(self) -> None:
        self.bpf.cleanup()


def _named(table) -> dict[str, int]:  # noqa: ANN001 - a bcc table
    import seccomp as sc

    out: dict[str, int] = {}
    for k, v in table.items():
        try:
            name = sc.resolve_syscall(sc.Arch.NATIVE, k.value).decode()
        except (ValueError, OverflowError):
            name = f"syscall_{k.value}"
        out[name] = out.get(name, 0) + v.value
    return dict(sorted(out.items()))


def progress_printer(
    label: str, recorder: Callable[[], Recorder | None] | None = None
) -> Callable[[float], None]:
    """Progress on stderr for runs longer than a second; `recorder` gives the recorder once loaded."""

    def show(elapsed: float) -> None:
        if elapsed < 1.0:
            return
        current = recorder() if recorder else None
        extra = f", {len(current.counts())} distinct syscalls" if current else ""
        sys.stderr.write(f"\r{label}: {elapsed:5.1f} s{extra}   ")
        sys.stderr.flush()

    return show


class _Armed:
    """Loads the recorder when the sandbox reports its cgroup (before the command's seccomp())."""

    def __init__(self, **kwargs: object) -> None:
        self.kwargs = kwargs
        self.recorder: Recorder | None = None

    def __call__(self, cgroup_id: int) -> None:
        self.recorder = Recorder(cgroup_id, **self.kwargs)

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()

    def get(self) -> Recorder:
        if self.recorder is None:
            raise StockadeError("the sandbox never reported its cgroup: nothing was recorded")
        return self.recorder


def _sandboxed(
    cmd: list[str],
    seccomp: dict,
    sandbox_factory: Callable[[], Sandbox],
    armed: _Armed,
    timeout: float | None,
    show: Callable[[float], None] | None,
    run_kwargs: dict,
) -> int:
    from stockade.runtime.seccomp import compile_program

    program = compile_program(seccomp, where="profile")
    sandbox = sandbox_factory()
    try:
        return sandbox.run(
            cmd,
            program=program,
            flags=list(seccomp.get("flags") or []),
            timeout=timeout,
            progress=show,
            seccomp=seccomp,
            on_cgroup=armed,
            **run_kwargs,
        )
    finally:
        close = getattr(sandbox, "close", None)
        if close:
            close()


def record(
    cmd: list[str],
    *,
    sandbox_factory: Callable[[], Sandbox] = LocalSandbox,
    timeout: float | None = None,
    progress: bool = False,
    **run_kwargs: object,
) -> Recording:
    """Run `cmd` in a fresh sandbox and count every syscall from the filter's installation on: the
    sandbox installs RECORD_FILTER (allows everything) where the real filter would go, as its last
    set-up step, and the recorder arms at that seccomp() call."""
    if not cmd:
        raise SpecError("nothing to record", where="command", hint="stockade profile record -- CMD...")
    if not shutil.which(cmd[0]):
        raise SpecError(f"command not found: {cmd[0]}", where="command", hint="give an existing program")
    with tracefs():
        armed = _Armed()
        try:
            start = time.monotonic()
            show = progress_printer("recording", lambda: armed.recorder) if progress else None
            code = _sandboxed(cmd, RECORD_FILTER, sandbox_factory, armed, timeout, show, run_kwargs)
            if show and time.monotonic() - start >= 1.0:
                sys.stderr.write("\n")
            return Recording(cmd, code, armed.get().counts(), seconds=time.monotonic() - start)
        finally:
            armed.close()


def record_cgroup(cgroup_id: int, duration: float, progress: bool = False, label: str = "") -> Recording:
    """Record a running container (its cgroup) for `duration` seconds; counting starts right away."""
    with tracefs():
        recorder = Recorder(cgroup_id, arm="now")
        try:
            start = time.monotonic()
            show = progress_printer("recording", lambda: recorder) if progress else None
            while (elapsed := time.monotonic() - start) < duration:
                time.sleep(min(0.25, duration - elapsed))
                if show:
                    show(time.monotonic() - start)
            if show and duration >= 1.0:
                sys.stderr.write("\n")
            return Recording([label or f"cgroup:{cgroup_id}"], 0, recorder.counts(), seconds=duration)
        finally:
            recorder.close()


def run_under(
    cmd: list[str],
    oci_seccomp: dict,
    *,
    mode: str = "errno",
    sandbox_factory: Callable[[], Sandbox] = LocalSandbox,
    timeout: float | None = None,
    **run_kwargs: object,
) -> Recording:
    """Run `cmd` under the profile. errno mode: the filter as written, refused syscalls are counted by
    the kernel-side recorder. log mode: every non-allow action becomes SCMP_ACT_LOG, so the command
    runs unhindered; what *would* be refused is the recorded syscalls the profile does not allow."""
    from stockade.runtime.seccomp import compile_program

    if mode not in ("errno", "log"):
        raise SpecError(f"unknown mode {mode!r}", where="--mode", hint="errno or log")
    config = oci_seccomp if mode == "errno" else _as_log(oci_seccomp)
    compile_program(config, where="profile")  # a bad profile fails before anything is created
    if not cmd or not shutil.which(cmd[0]):
        raise SpecError(f"command not found: {cmd[0] if cmd else '(empty)'}", where="command")
    with tracefs():
        armed = _Armed(denials=(mode == "errno"))
        try:
            start = time.monotonic()
            code = _sandboxed(cmd, config, sandbox_factory, armed, timeout, None, run_kwargs)
            recorder = armed.get()
            return Recording(cmd, code, recorder.counts(), recorder.denied(), time.monotonic() - start)
        finally:
            armed.close()


def _as_log(config: dict) -> dict:
    out = dict(config)
    if out["defaultAction"] != "SCMP_ACT_ALLOW":
        out["defaultAction"] = "SCMP_ACT_LOG"
        out.pop("defaultErrnoRet", None)
    rules = []
    for rule in out.get("syscalls") or []:
        if rule["action"] == "SCMP_ACT_ALLOW":
            rules.append(rule)
        elif out["defaultAction"] != "SCMP_ACT_LOG":
            rules.append({**{k: v for k, v in rule.items() if k != "errnoRet"}, "action": "SCMP_ACT_LOG"})
    out["syscalls"] = rules
    return out


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise StockadeError("recording needs root (BPF and cgroups)", hint="run as root")
