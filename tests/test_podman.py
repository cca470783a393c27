"""podman drives stockade-oci with its own defaults: its seccomp profile without no_new_privs,
its capabilities, conmon, `run` (also `-it`), `exec`, `stop`, `rm`.

Flags added, each for this machine rather than for Stockade:
- --ulimit: podman asks for nofile and nproc of 1048576 as root, which this project's machines
  cannot grant (no CAP_SYS_RESOURCE, hard limits below that); runc fails there the same way.
- --network none: podman's default bridge network would add a bridge, firewall rules and
  ip_forward on the host, which tests must never touch (the container still gets its own netns).
- --rootfs: images need a registry, so the root filesystem is a busybox directory.
Podman's storage and run state live in the test's own directories.
"""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundles import make_rootfs
from kernel import require
from leftovers import new_since, snapshot
from terminals import Pty

OCI = str(Path(sys.executable).parent / "stockade-oci")


class Podman:
    def __init__(self, base: Path) -> None:
        self.argv = [
            "podman",
            "--runtime",
            OCI,
            "--root",
            str(base / "storage"),
            "--runroot",
            str(base / "run"),
        ]
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        self.limits = [
            "--network",
            "none",
            "--ulimit",
            f"nofile={min(hard, 1024)}",
            "--ulimit",
            f"nproc={min(nproc, 4096)}",
        ]

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )

    def run_sh(self, rootfs: Path, script: str, *options: str) -> subprocess.CompletedProcess:
        """`podman run OPTIONS --rootfs ROOTFS /bin/sh -c SCRIPT`, with this machine's flags."""
        return self("run", *options, *self.limits, "--rootfs", str(rootfs), "/bin/sh", "-c", script)


@pytest.fixture
def podman() -> Iterator[tuple[Podman, Path]]:
    require(shutil.which("podman"), "podman is not installed (scripts/setup installs it)")
    base = Path(tempfile.mkdtemp(prefix="stockade-podman-"))
    base.chmod(0o755)
    rootfs = make_rootfs(base / "rootfs")
    before, host_net = snapshot(), _host_network()
    p = Podman(base)
    try:
        yield p, rootfs
    finally:
        p("rm", "--all", "--force", "--time", "0")
        subprocess.run(["umount", "-R", str(base / "storage")], capture_output=True)
        subprocess.run(["umount", "-R", str(base / "run")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    assert new_since(before) == {}
    assert _host_network() == host_net  # no bridge, forwarding or firewall change on the host


def _host_network() -> tuple[str, str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    return " ".join(sorted(line.split(":")[1].strip() for line in links.splitlines())), forward


def test_podman_run_with_its_default_seccomp_profile(podman: tuple[Podman, Path]) -> None:
    p, rootfs = podman
    done = p.run_sh(rootfs, "echo hello; grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status; exit 5", "--rm")
    assert done.returncode == 5, done.stderr
    assert done.stdout.split() == ["hello", "NoNewPrivs:", "0", "Seccomp:", "2"]


def test_podman_exec_stop_rm(podman: tuple[Podman, Path]) -> None:
    p, rootfs = podman
    loop = "trap 'exit 0' TERM; while :; do sleep 0.1; done"
    started = p.run_sh(rootfs, loop, "--detach", "--name", "stockade-podman")
    assert started.returncode == 0, started.stderr
    done = p("exec", "stockade-podman", "/bin/sh", "-c", "echo exec-ok; exit 4")
    assert done.returncode == 4 and done.stdout.strip() == "exec-ok", done.stderr
    assert p("stop", "--time", "10", "stockade-podman").returncode == 0
    state = p("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "stockade-podman")
    assert state.stdout.split() == ["exited", "0"], state.stderr
    assert p("rm", "stockade-podman").returncode == 0


def test_podman_run_interactive_tty(podman: tuple[Podman, Path]) -> None:
    """`podman run -it`: conmon hands Stockade a console socket; the shell gets a pty of the
    caller's size, follows a resize, and its exit code comes back."""
    p, rootfs = podman
    term = Pty([*p.argv, "run", "-it", "--rm", *p.limits, "--rootfs", str(rootfs), "/bin/sh"])
    try:
        term.expect("# ")
        term.type("stty size; tty\r")
        assert "30 100\r\n/dev/pts/0\r\n" in term.expect("/dev/pts/0\r\n")
        term.resize(40, 120)
        term.proc.send_signal(signal.SIGWINCH)
        time.sleep(1)  # podman passes the size to conmon, conmon to the pty
        term.type("stty size; exit 3\r")
        term.expect("40 120")
        assert term.proc.wait(timeout=60) == 3
    finally:
        term.close()
