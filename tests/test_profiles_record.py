"""record -> generate -> run under the generated profile -> test, on the real kernel (bcc raw tracepoints,
seccomp filters installed where the container init installs them). The local sandbox (a fresh cgroup2
directory per run) for the library tests; real Stockade containers for the CLI, its default."""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest
from bundles import make_bundle, remove_bundle
from kernel import require
from leftovers import new_since, snapshot
from stockade.profiles import cli, load_profile, profile_seccomp
from stockade.profiles.generate import generate
from stockade.profiles.record import RECORD_FILTER, LocalSandbox, RuntimeSandbox, record, run_under
from stockade.runtime.errors import SpecError, StockadeError
from stockade.runtime.sandbox import SandboxOptions
from stockade.runtime.seccomp import compile_program

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"

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
    state_before = _private_roots()
    yield
    assert _mine(new_since(before)) == {}
    assert _mounted("/sys/kernel/tracing") == tracefs_before
    assert _private_roots() - state_before == set()


def _private_roots() -> set[str]:
    """The runtime sandbox's private state roots (it removes them after each run)."""
    return set(glob.glob("/run/stockade-rec-state-*"))


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
    """Kernel objects these tests create: stockade-rec-* cgroups (local sandboxes and the runtime
    sandbox's containers alike), mounts, and runtime processes descending from this test (other
    helpers' containers on this shared machine are not ours to judge)."""
    out = {}
    for kind in ("cgroups", "mounts", "processes"):
        mine = {v for v in new.get(kind, ()) if kind == "processes" or "stockade-rec" in v}
        if mine:
            out[kind] = mine
    return out


# ---------------------------------------------------------------------------------------------
# the runtime sandbox: real Stockade containers, through the CLI


def _stockade(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "stockade"), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_records_in_a_stockade_container_and_replays_under_stockade_run(tmp_path):
    rec_file, gen_file = tmp_path / "rec.json", tmp_path / "sh-cat.json"
    cmd = ["sh", "-c", "ls; cat /etc/hostname"]
    done = _stockade("profile", "record", "-o", str(rec_file), "--", *cmd)
    assert done.returncode == 0, done.stderr
    # the built-in root filesystem's /etc/hostname, not the host's: it ran in a Stockade container
    assert "stockade\n" in done.stdout and "profile written to" in done.stdout
    recorded = load_profile(str(rec_file)).recorded
    assert recorded["commands"] == [cmd]
    # from the runtime's seccomp() right before execve on: the final execve is in, the init's own
    # set-up (mounts, pivot_root, the filter load) is not
    syscalls = recorded["syscalls"]
    assert syscalls["execve"] >= 1 and {"openat", "write", "getdents64"} <= set(syscalls)
    assert not {"seccomp", "pivot_root", "mount", "sethostname", "unshare"} & set(syscalls)
    # a second run merges in; with --json stdout is the report alone (the command's output: stderr)
    done = _stockade("profile", "record", "--json", "-o", str(rec_file), "--", *cmd)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["exitCode"] == 0 and "stockade\n" in done.stderr
    assert load_profile(str(rec_file)).recorded["syscalls"]["execve"] == 2 * syscalls["execve"]

    done = _stockade("profile", "generate", str(rec_file), "--name", "sh-cat", "-o", str(gen_file))
    assert done.returncode == 0, done.stderr
    root = tmp_path / "run-root"
    run = ["run", "--allow-degraded", "--root", str(root), "--profile", str(gen_file), "--"]
    done = _stockade(*run, *cmd)
    assert done.returncode == 0, done.stderr
    assert "stockade\n" in done.stdout and "usr" in done.stdout.split()
    # outside the recording: a user namespace now fails with the profile's errno (EPERM)
    done = _stockade(*run, "sh", "-c", "ls; cat /etc/hostname; unshare -U true")
    assert done.returncode != 0
    assert "stockade\n" in done.stdout
    assert "unshare failed: Operation not permitted" in done.stderr
    assert not root.exists() or not list(root.iterdir())


def test_cli_records_a_running_container_for_a_duration(tmp_path):
    """`record --container ID --duration S` against a container `stockade-oci run --detach` started."""
    root = tmp_path / "oci-root"
    cid = "stockade-rec-loop"
    bundle = make_bundle(["sh", "-c", "while :; do cat /proc/self/stat >/dev/null; sleep 0.1; done"])
    before = snapshot(root)
    out = tmp_path / "loop.json"
    oci = [str(BIN / "stockade-oci"), "--root", str(root)]
    try:
        # the detached init keeps whatever it inherits: files, not pipes we would wait on for EOF
        with open(tmp_path / "oci.err", "w+") as err:
            started = subprocess.run(
                [*oci, "run", "--detach", "--bundle", str(bundle), cid],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=60,
            )
            err.seek(0)
            assert started.returncode == 0, err.read()
        done = _stockade(
            "profile", "record", "--container", cid, "--root", str(root), "--duration", "2", "--json",
            "-o", str(out),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        subprocess.run(
            [*oci, "delete", "--force", cid],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        remove_bundle(bundle)
    summary = json.loads(done.stdout)
    syscalls = summary["syscalls"]
    assert summary["command"] == [f"container:{cid}"] and summary["seconds"] == 2.0
    # what the loop makes: cat opens and reads /proc/self/stat, sleep sleeps, sh forks and waits
    assert {"openat", "read", "execve", "wait4"} <= set(syscalls)
    assert {"nanosleep", "clock_nanosleep"} & set(syscalls)
    # ~0.1 s a round for 2 s: many rounds, not one
    assert syscalls["execve"] >= 5
    profile = load_profile(str(out))
    assert profile.recorded["commands"] == [[f"container:{cid}"]]
    assert {"openat", "read"} <= profile.seccomp.names()
    left = new_since(before, root)
    assert {k: v for k, v in left.items() if k in ("state", "processes")} == {}
    assert _mine(left) == {}


def test_cli_record_container_that_is_not_there(tmp_path):
    done = _stockade(
        "profile", "record", "--container", "stockade-rec-none", "--root", str(tmp_path), "--duration", "1"
    )
    assert done.returncode == 1 and "stockade-rec-none" in done.stderr
    assert "Traceback" not in done.stderr


def test_runtime_sandbox_times_out_and_leaves_nothing():
    """A timeout kills the whole container (exit 124) and deletes it; the recording is still returned."""
    rec = record(
        ["sh", "-c", "cat /etc/hostname; sleep 30"],
        sandbox_factory=RuntimeSandbox,
        timeout=1.0,
        stdout=subprocess.DEVNULL,
    )
    assert rec.exit_code == 124
    assert {"execve", "openat"} <= set(rec.syscalls)


def test_runtime_sandbox_deletes_the_container_when_arming_fails():
    box = RuntimeSandbox()

    def fail(cgroup_id: int) -> None:
        assert cgroup_id > 0
        raise RuntimeError("recorder failed to load")

    with pytest.raises(RuntimeError, match="recorder failed"):
        box.run(["true"], seccomp=RECORD_FILTER, on_cgroup=fail)
    assert box.cgroup_id > 0 and box.container_id.startswith("stockade-rec-")


def test_runtime_sandbox_refuses_bad_options():
    with pytest.raises(StockadeError, match="--pids"):
        RuntimeSandbox(SandboxOptions(pids="many")).run(["true"], seccomp=RECORD_FILTER)
    with pytest.raises(StockadeError, match="--bundle"):
        RuntimeSandbox(SandboxOptions(bundle="/tmp"))
