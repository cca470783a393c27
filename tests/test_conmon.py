"""A real peer drives stockade-oci: conmon (as podman and CRI-O run it) creates the container
through our runc-compatible CLI, captures its output in a k8s-file log and records its exit code."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bundles import make_bundle, remove_bundle
from kernel import require
from leftovers import new_since, snapshot

OCI = str(Path(sys.executable).parent / "stockade-oci")
PR_SET_CHILD_SUBREAPER = 36



@pytest.fixture(autouse=True)
def conmon_installed() -> None:
    require(shutil.which("conmon") is not None, "conmon is not installed (scripts/setup installs it)")


def _wait_for(check, what: str, seconds: float = 20) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _status(root: Path, cid: str) -> str:
    done = subprocess.run([OCI, "--root", str(root), "state", cid], capture_output=True, text=True)
    return json.loads(done.stdout)["status"] if done.returncode == 0 else "missing"


def test_conmon_creates_starts_logs_and_reports_exit_code(tmp_path: Path) -> None:
    before = snapshot()
    # conmon daemonizes; as subreaper we inherit it and can reap it (no zombie left behind).
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    bundle = make_bundle(["sh", "-c", "echo out-line; echo err-line >&2; exit 5"])
    root, sock = tmp_path / "root", tmp_path / "sock"
    sock.mkdir()
    log, exits = tmp_path / "ctr.log", tmp_path / "exits"
    exits.mkdir()
    cid = "conmon-test"
    try:
        subprocess.run(
            [
                "conmon",
                "--syslog=false",
                "-c",
                cid,
                "-u",
                cid,
                "-n",
                cid,
                "-r",
                OCI,
                "-b",
                str(bundle),
                "-p",
                str(tmp_path / "pid"),
                "--exit-dir",
                str(exits),
                "--socket-dir-path",
                str(sock),
                "--runtime-arg",
                "--root",
                "--runtime-arg",
                str(root),
                "--conmon-pidfile",
                str(tmp_path / "conmon.pid"),
                "-l",
                f"k8s-file:{log}",
            ],
            check=True,
            timeout=30,
        )
        _wait_for(lambda: _status(root, cid) == "created", "create through conmon")
        subprocess.run([OCI, "--root", str(root), "start", cid], check=True, timeout=30)
        _wait_for(lambda: (exits / cid).exists() and (exits / cid).read_text(), "conmon's exit file")
        assert (exits / cid).read_text() == "5"
        streams = [line.split(" ", 3)[1:] for line in log.read_text().splitlines()]
        assert ["stdout", "F", "out-line"] in streams and ["stderr", "F", "err-line"] in streams
        assert _status(root, cid) == "stopped"
        subprocess.run([OCI, "--root", str(root), "delete", cid], check=True, timeout=30)
    finally:
        subprocess.run([OCI, "--root", str(root), "delete", "--force", cid], capture_output=True)
        with contextlib.suppress(OSError, ValueError, ChildProcessError):
            conmon_pid = int((tmp_path / "conmon.pid").read_text())
            _wait_for(lambda: _reaped(conmon_pid), "conmon to exit", 10)
        remove_bundle(bundle)
    assert new_since(before) == {}


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return not os.path.exists(f"/proc/{pid}")
