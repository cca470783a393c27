"""Run a container in the foreground: create, start, forward signals, wait, clean up.

Shared by `stockade-oci run` and `stockade run`. The caller becomes a child subreaper so the
container's init (whose intermediate parent exits during create) is reparented to it and its
exit status can be reaped. Everything is deleted afterwards, also on Ctrl-C and on timeout.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` imports enum (bench/README.md, start-path costs)
import os
import sys

from . import container
from .container import CreateOptions
from .syscalls import set_child_subreaper

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .terminal import Terminal

FORWARDED = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
GRACE_SECONDS = 3.0  # after a forwarded SIGINT/SIGTERM, how long before every process is killed
TIMEOUT_EXIT_CODE = 124  # as coreutils timeout(1)


class _Supervisor:
    """Signal handlers: forward to the init; escalate to SIGKILL of the whole cgroup when needed."""

    def __init__(self, root: str | os.PathLike, state: container.State) -> None:
        self.root, self.state = root, state
        self.timed_out = False
        self.terminating = False

    def forward(self, signum: int, _frame: object) -> None:
        try:
            os.kill(self.state.pid, signum)
        except ProcessLookupError:
            return
        if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if self.terminating:  # a second Ctrl-C: no more waiting
                self.kill_all()
            self.terminating = True
            # PID 1 ignores signals it has no handler for: make sure it still ends.
            signal.setitimer(signal.ITIMER_REAL, GRACE_SECONDS)

    def alarm(self, _signum: int, _frame: object) -> None:
        if not self.terminating:
            self.timed_out = True
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL to every process in the container's cgroup, without the container's lock: the
        main thread may hold it (start, delete), and a handler waiting for it would deadlock."""
        try:
            container.cgroup_of(self.state).kill(signal.SIGKILL)
        except Exception as err:  # noqa: BLE001 - best effort inside a signal handler
            print(f"stockade: could not kill container: {err}", file=sys.stderr)


def _report_oom(state: container.State) -> None:
    try:
        kills = container.cgroup_of(state).oom_kills()
    except OSError:
        return
    if kills:
        print(
            f"stockade: {state.id}: {kills} process(es) killed: out of memory (the container's memory limit)",
            file=sys.stderr,
        )


def run(
    root: str | os.PathLike,
    container_id: str,
    bundle: str | os.PathLike,
    opts: CreateOptions,
    timeout: float | None = None,
    keep: bool = False,
    terminal: Terminal | None = None,
) -> int:
    """Create and start the container, wait for it, delete it; return its exit code (128+N for signal N).
    With a TERMINAL (opts.console_socket is its socket) the container's pty is on the caller's."""
    set_child_subreaper()
    state = container.create(root, container_id, bundle, opts)
    sup = _Supervisor(root, state)
    saved = {sig: signal.signal(sig, sup.forward) for sig in FORWARDED}
    saved[signal.SIGALRM] = signal.signal(signal.SIGALRM, sup.alarm)
    try:
        if terminal is not None:
            terminal.attach()
            signal.signal(signal.SIGWINCH, terminal.resize)  # the pty signals its foreground group
        container.start(root, container_id)
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        code = container.wait(state)
        _report_oom(state)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if not keep:
            container.delete(root, container_id, force=True)
    if sup.timed_out:
        print(
            f"stockade: {container_id}: timed out after {timeout:g}s; every process was killed",
            file=sys.stderr,
        )
        return TIMEOUT_EXIT_CODE
    return code
