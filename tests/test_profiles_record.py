"""record -> generate -> run under the generated profile -> test, on the real kernel (bcc raw tracepoints,
a fresh cgroup2 directory per run, seccomp filters installed in the sandboxed child)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from kernel import require
from leftovers import new_since, snapshot
from stockade.profiles import cli, load_profile, profile_seccomp
from stockade.profiles.generate import generate
from stockade.profiles.record import LocalSandbox, record, run_under
from stockade.runtime.errors import SpecError
from stockade.runtime.seccomp import compile_program

PYTHON = "/usr/bin/python3"
PROGRAM = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)

def call(nr, *args):
    return 0 if libc.syscall(nr, *args) >= 0 else ctypes.get_errno()

with open("/etc/hostname") as f:
    host = f.read().strip()
print(sum(i * i for i in range(1000)), host, len(os.listdir("/")) > 0)
if sys.argv[1:] == ["probe"]:
    # unshare(CLONE_NEWUSER), keyctl(KEYCTL_GET_KEYRING_ID), ptrace(PTRACE_ATTACH, 1)
    print("probe", call(272, 0x10000000), call(250, 0, 0), call(101, 16, 1))
"""


def _can_record() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return os.geteuid() == 0


@pytest.fixture(autouse=True)
def kernel_env(tmp_path, monkeypatch):
    require(_can_record(), "recording needs root and bcc (python3-bpfcc)")
    monkeypatch.setenv("STOCKADE_CACHE_DIR", str(tmp_path / "cache"))
    before = snapshot()
    tracefs_before = _mounted("/sys/kernel/tracing")
    yield
    assert _mine(new_since(before)) == {}
    assert _mounted("/sys/kernel/tracing") == tracefs_before


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _run(cmd: list[str], seccomp: dict) -> tuple[int, str, str]:
    program = compile_program(seccomp)
    with LocalSandbox() as box:
        r, w = os.pipe()
        er, ew = os.pipe()
        code = box.run(cmd, program=program, flags=[], timeout=30, stdout=w, stderr=ew)
        os.close(w)
        os.close(ew)
        with os.fdopen(r) as f, os.fdopen(er) as g:
            return code, f.read(), g.read()


def _hostname() -> str:
    with open("/etc/hostname") as f:
        return f.read().strip()


def test_record_shell_generate_and_replay(tmp_path):
    cmd = ["sh", "-c", "ls /; cat /etc/hostname"]
    rec = record(cmd, stdout=subprocess.DEVNULL)
    assert rec.exit_code == 0
    # from the final execve on, nothing of the sandbox's own set-up (its cgroup write, the filter load)
    assert rec.syscalls["execve"] >= 1 and "openat" in rec.syscalls
    assert "write" in rec.syscalls and "seccomp" not in rec.syscalls
    profile = generate(rec.to_recorded(), "sh-cat")
    seccomp = profile_seccomp(profile)
    code, out, _ = _run(cmd, seccomp)
    assert code == 0 and _hostname() in out
    # outside the recording: user namespaces fail with the profile's errno
    code, _, err = _run(["sh", "-c", "ls /; cat /etc/hostname; unshare -U true"], seccomp)
    assert code != 0 and "Operation not permitted" in err


def test_record_python_generate_replay_and_probe(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(PROGRAM)
    rec = record([PYTHON, str(script)], stdout=subprocess.DEVNULL)
    assert rec.exit_code == 0 and "mmap" in rec.syscalls
    profile = generate(rec.to_recorded(), "py")
    seccomp = profile_seccomp(profile)
    code, out, err = _run([PYTHON, str(script), "probe"], seccomp)
    assert code == 0, err
    eperm = 1
    assert f"probe {eperm} {eperm} {eperm}" in out
    # `test` names what was denied, with counts, as the kernel saw it
    result = run_under([PYTHON, str(script), "probe"], seccomp, stdout=subprocess.DEVNULL)
    assert result.exit_code == 0
    assert {"unshare", "keyctl", "ptrace"} <= set(result.denied)
    assert all(result.denied[n] == 1 for n in ("unshare", "keyctl", "ptrace"))
    # log mode: nothing is refused, the would-be denials come from the recording
    logged = run_under([PYTHON, str(script), "probe"], seccomp, mode="log", stdout=subprocess.DEVNULL)
    assert logged.exit_code == 0 and {"unshare", "keyctl", "ptrace"} <= set(logged.syscalls)


def test_cli_record_merges_and_test_reports(tmp_path, capsys):
    out = tmp_path / "shell.json"
    assert cli.main(["record", "-o", str(out), "--json", "--", "sh", "-c", "cat /etc/hostname"]) == 0
    first = load_profile(str(out))
    assert cli.main(["record", "-o", str(out), "--json", "--", "sh", "-c", "ls / >/dev/null"]) == 0
    merged = load_profile(str(out))
    assert len(merged.recorded["commands"]) == 2
    assert first.seccomp.names() <= merged.seccomp.names()
    assert merged.recorded["syscalls"]["execve"] >= 2
    capsys.readouterr()
    # a fresh generate from the recording gives the same allow-list
    gen = tmp_path / "gen.json"
    assert cli.main(["generate", str(out), "--name", "shell", "-o", str(gen)]) == 0
    assert load_profile(str(gen)).seccomp.names() == merged.seccomp.names()
    assert (
        cli.main(["test", "--json", "-p", str(out), "--", "sh", "-c", "unshare -U true; cat /etc/hostname"])
        == 1
    )
    report = json.loads(capsys.readouterr().out)
    assert report["denied"].get("unshare") == 1
    assert cli.main(["test", "-p", str(out), "--", "sh", "-c", "cat /etc/hostname"]) == 0


def test_record_of_missing_command_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "never.json"
    assert cli.main(["record", "-o", str(out), "--", "/nonexistent/stockade-cmd"]) == 1
    assert not out.exists()
    assert "command not found" in capsys.readouterr().err
    with pytest.raises(SpecError):
        record(["no-such-command-stockade"])


def test_record_a_running_cgroup_for_a_duration():
    """`record --container ID --duration S`: everything the cgroup does, from the first moment."""
    from stockade.profiles.record import record_cgroup

    with LocalSandbox() as box:
        procs = os.open(os.path.join(box.path, "cgroup.procs"), os.O_WRONLY)
        try:
            child = subprocess.Popen(
                ["sh", "-c", "while :; do cat /etc/hostname >/dev/null; sleep 0.05; done"],
                preexec_fn=lambda: os.write(procs, b"0"),
                close_fds=False,
            )
        finally:
            os.close(procs)
        try:
            rec = record_cgroup(box.cgroup_id, 1.0)
        finally:
            child.kill()
            child.wait()
    assert {"openat", "read", "execve", "wait4"} <= set(rec.syscalls)


def _mine(new: dict) -> dict:
    """Kernel objects these tests create: stockade-rec-* cgroups and mounts (other helpers' processes
    on this shared machine are not ours to judge)."""
    return {k: v for k, v in new.items() if k in ("cgroups", "mounts")}
