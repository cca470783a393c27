"""The QEMU kernel lab: vagrant/lab itself, and what a `lab` test finds in the guest."""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel import in_lab, require

CHECKOUT = Path(__file__).resolve().parent.parent
LAB = CHECKOUT / "vagrant" / "lab"


@functools.cache
def cache() -> Path:
    """The lab's cache folder, as the lab itself resolves it (STOCKADE_LAB_CACHE, XDG, ~/.cache)."""
    proc = subprocess.run([sys.executable, str(LAB), "cache-dir"], capture_output=True, text=True, check=True)
    return Path(proc.stdout.strip())


# --- inside the lab (or on a host that has the features) -------------------------------------


@pytest.mark.lab
def test_bpf_lsm_program_loads() -> None:
    from stockade.runtime.doctor import probe_bpf_lsm

    assert "bpf" in Path("/sys/kernel/security/lsm").read_text().split(",")
    ok, why = probe_bpf_lsm()
    assert ok, why


@pytest.mark.lab
def test_cgroup_v2_controllers_delegated() -> None:
    root = Path("/sys/fs/cgroup")
    assert (root / "cgroup.controllers").exists(), "/sys/fs/cgroup is not cgroup2"
    wanted = {"cpu", "memory", "pids", "io", "cpuset"}
    assert wanted <= set((root / "cgroup.controllers").read_text().split())
    if in_lab():  # the lab delegates every controller from the root
        assert wanted <= set((root / "cgroup.subtree_control").read_text().split())
        assert not any(line.split()[2] == "cgroup" for line in Path("/proc/mounts").read_text().splitlines())


@pytest.mark.lab
def test_guest_reports_kernel_and_has_its_modules_and_headers(request: pytest.FixtureRequest) -> None:
    release = platform.release()
    if in_lab():
        assert ("lab_kernel", release) in request.node.user_properties
    modules = Path("/lib/modules", release)
    assert (modules / "modules.dep").exists()
    assert (modules / "build" / "include" / "generated" / "autoconf.h").exists(), "no kernel headers for bcc"
    if in_lab():
        subprocess.run(["modprobe", "veth"], check=True)
        assert Path("/sys/module/veth").exists()


BCC_TGID = """
#include <linux/sched.h>
BPF_ARRAY(seen, u32, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) {
    struct task_struct *task = (struct task_struct *)bpf_get_current_task();
    u32 tgid = 0, key = 0;
    bpf_probe_read_kernel(&tgid, sizeof(tgid), &task->tgid);
    if (tgid == TARGET)
        seen.update(&key, &tgid);
    return 0;
}
"""


@pytest.mark.lab
def test_bcc_compiles_against_the_guest_kernel() -> None:
    """bcc builds with the running kernel's headers, and they are that kernel's: a program that
    reads this process's tgid out of its task_struct by the headers' layout finds it."""
    try:
        import bcc
    except ImportError as e:
        require(False, f"bcc is not importable ({e}); scripts/setup installs python3-bpfcc")
    prog = bcc.BPF(text=BCC_TGID, cflags=[f"-DTARGET={os.getpid()}"])
    try:
        os.getppid()  # the tracepoint fires in this process
        assert prog["seen"][0].value == os.getpid()
    finally:
        prog.cleanup()


# --- the lab command, from the host ----------------------------------------------------------


def lab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run vagrant/lab; the result's `pid` names its run folder (runs/<pid>-*) and so its QEMU."""
    proc = subprocess.Popen(
        [sys.executable, str(LAB), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=CHECKOUT,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    result.pid = proc.pid
    return result


def qemu_processes(marker: str) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        qemu = shutil.which("qemu-system-x86_64") or "qemu-system"
        if cmd.startswith(("qemu-system", qemu)) and marker in cmd:
            out.append(cmd)
    return out


@pytest.fixture(scope="module")
def lab_ready() -> str:
    """The host can boot the lab (skip, or fail under STOCKADE_REQUIRE_KERNEL_TESTS=1); returns the
    release of the kernel the lab was asked for: --lab-kernel / STOCKADE_LAB_KERNEL (which the
    lab plugin exports for vagrant/lab), else the default, `vagrant/lab default-kernel`."""
    require(not in_lab(), "the lab is not nested inside itself")
    require(shutil.which("qemu-system-x86_64"), "QEMU is not installed (qemu-system-x86)")
    proc = lab("prepare", timeout=900)
    require(proc.returncode == 0, f"the lab kernel could not be prepared: {proc.stderr.strip()}")
    return (Path(proc.stdout.strip()) / "release").read_text().strip()


@pytest.mark.slow
def test_command_output_exit_code_and_round_trip_report(lab_ready: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    t0 = time.monotonic()
    script = "uname -r; cat /sys/kernel/security/lsm; echo; echo cwd=$PWD marker=$STOCKADE_TEST_MARK; exit 7"
    proc = lab("run", "--report", str(report), "--", "sh", "-c", script, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 7, proc.stderr
    info = json.loads(report.read_text())
    assert info["exit_code"] == 7 and info["kernel"] == lab_ready
    assert proc.stdout.splitlines()[0] == info["kernel"]
    assert "bpf" in proc.stdout.splitlines()[1].split(",")
    assert f"cwd={CHECKOUT} marker=" in proc.stdout
    # The boot-to-command round trip is reported (QEMU start to exit), not asserted: speed is
    # measured in bench/, and a loaded machine must not fail a behaviour test.
    assert info["seconds"] > 0, f"no round trip reported (wall clock {elapsed:.1f}s)"


@pytest.mark.slow
def test_environment_passes_through(lab_ready: str) -> None:
    env = dict(os.environ, STOCKADE_TEST_MARK="through-9p", UNRELATED_VAR="x")
    proc = subprocess.run(
        [
            sys.executable,
            str(LAB),
            "run",
            "-q",
            "--env",
            "EXTRA=1",
            "--",
            "sh",
            "-c",
            'echo "$STOCKADE_TEST_MARK ${UNRELATED_VAR:-unset} $EXTRA $STOCKADE_IN_LAB"',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=CHECKOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "through-9p unset 1 1"


@pytest.mark.slow
def test_false_returns_one(lab_ready: str) -> None:
    proc = lab("run", "-q", "--", "false", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert not list((cache() / "runs").glob(f"{proc.pid}-*"))  # the run folder is gone
    assert not qemu_processes(f"{cache() / 'runs'}/{proc.pid}-")


def test_unknown_kernel_package_fails_fast(lab_ready: str) -> None:
    t0 = time.monotonic()
    proc = lab("run", "--kernel", "linux-image-6.1.0-999-stockade-amd64", "--", "true", timeout=60)
    assert proc.returncode == 125
    assert "linux-image-6.1.0-999-stockade-amd64" in proc.stderr and "vagrant/lab kernels" in proc.stderr
    assert time.monotonic() - t0 < 30
    assert not list(cache().glob("6.1.0-999-stockade-amd64*")) and not list(cache().glob(".6.1.0-999-*.*-*"))


def test_malformed_kernel_name_is_refused() -> None:
    proc = lab("run", "--kernel", "linux-image-amd64; rm -rf /", "--", "true", timeout=30)
    assert proc.returncode == 125
    assert "not a Debian kernel image package" in proc.stderr


@pytest.mark.slow
def test_timeout_kills_qemu_and_leaves_nothing(lab_ready: str) -> None:
    runs = cache() / "runs"
    t0 = time.monotonic()
    proc = lab("run", "--timeout", "3", "--", "sleep", "600", timeout=60)
    assert proc.returncode == 124
    assert "did not finish within 3s" in proc.stderr
    assert time.monotonic() - t0 < 20
    assert not qemu_processes(f"{runs}/{proc.pid}-")
    assert not list(runs.glob(f"{proc.pid}-*"))


@pytest.mark.slow
def test_stalled_boot_is_retried_once_with_the_kernel_log(lab_ready: str) -> None:
    runs = cache() / "runs"
    proc = lab("run", "--boot-timeout", "1", "--", "true", timeout=60)
    assert proc.returncode == 124, proc.stderr
    assert proc.stderr.count("retrying with a fresh QEMU") == 1
    assert "guest boot did not finish within 1s" in proc.stderr
    assert "lab| [" in proc.stderr  # the kernel's boot messages are in the tail
    assert not qemu_processes(f"{runs}/{proc.pid}-")
    assert not list(runs.glob(f"{proc.pid}-*"))


def test_guest_that_dies_during_boot_is_retried_once(lab_ready: str, tmp_path: Path) -> None:
    # A stand-in QEMU whose guest panics before the command starts, as a TCG guest once did.
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho '[    0.51] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI'\n"
                    "echo '[    0.52] Kernel panic - not syncing: Attempted to kill init!'\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, str(LAB), "run", "--", "true"], capture_output=True, text=True,
                          timeout=60, cwd=CHECKOUT, env=env)
    assert proc.returncode == 125, proc.stderr
    assert proc.stderr.count("guest boot crashed") == 1 and "retrying with a fresh QEMU" in proc.stderr
    assert "guest stopped during boot, before the command started" in proc.stderr
    assert "lab| [    0.52] Kernel panic" in proc.stderr  # the console tail of the last attempt


@pytest.mark.slow
def test_killed_lab_takes_qemu_with_it(lab_ready: str) -> None:
    runs = cache() / "runs"
    proc = subprocess.Popen(
        [sys.executable, str(LAB), "run", "-q", "--", "sleep", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=CHECKOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while not qemu_processes(f"{runs}/{proc.pid}-") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert qemu_processes(f"{runs}/{proc.pid}-"), "QEMU did not start"
        proc.kill()  # no chance to clean up: PDEATHSIG must stop QEMU
        proc.wait()
        deadline = time.monotonic() + 10
        while qemu_processes(f"{runs}/{proc.pid}-") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not qemu_processes(f"{runs}/{proc.pid}-")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The next run removes the dead run's folder.
    assert lab("run", "-q", "--", "true", timeout=60).returncode == 0
    assert not list(runs.glob(f"{proc.pid}-*"))


@pytest.mark.slow
def test_guest_crash_is_reported_with_console_tail(lab_ready: str) -> None:
    # the pause lets the serial console drain the line before the panic stops the guest (a crash
    # right behind it lost the line once in CI)
    proc = lab("run", "--", "sh", "-c", "echo about-to-crash; sleep 1; echo c > /proc/sysrq-trigger",
               timeout=90)
    assert proc.returncode == 125
    assert "guest stopped before the command finished" in proc.stderr
    assert "about-to-crash" in proc.stdout  # streamed while the command ran
    assert "Kernel panic" in proc.stderr  # the console tail
    assert not qemu_processes(f"{cache() / 'runs'}/{proc.pid}-")


# --- the pytest integration (tests/lab_plugin.py), end to end on copies of it ----------------

GUEST_TESTS = """
import os, platform, pytest

@pytest.mark.lab
def test_in_guest():
    assert os.environ["STOCKADE_IN_LAB"] == "1"
    assert open("/proc/self/cgroup").read().startswith("0::")  # pure cgroup v2

@pytest.mark.lab
def test_fails_in_guest():
    assert platform.release() == "the host", "guest-side failure text"

@pytest.mark.lab
def test_skips_in_guest():
    pytest.skip("guest-side skip reason")

def test_on_host():
    assert os.environ.get("STOCKADE_IN_LAB") != "1"
"""


def run_session(
    tmp_path: Path, tests: str, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """A pytest session in TMP_PATH using this checkout's lab plugin, lab and kernel cache."""
    for name in ("conftest.py", "lab_plugin.py", "kernel.py"):
        shutil.copy(CHECKOUT / "tests" / name, tmp_path / name)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    lab: kernel lab\n")
    (tmp_path / "test_guest.py").write_text(tests)
    full_env = dict(
        os.environ,
        STOCKADE_LAB_BIN=str(LAB),
        STOCKADE_LAB_CACHE=str(cache()),
        STOCKADE_LAB="always",
        **env,
    )
    full_env.pop("STOCKADE_REQUIRE_KERNEL_TESTS", None)
    full_env.update(env)
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", f"--junitxml={junit}", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    outcomes = {}
    if junit.exists():
        import xml.etree.ElementTree as ET

        for case in ET.parse(junit).iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            outcomes[case.get("name")] = (kind, props)
    return proc, outcomes


@pytest.mark.slow
def test_lab_tests_run_in_one_boot_and_map_back(lab_ready: str, tmp_path: Path) -> None:
    proc, outcomes = run_session(tmp_path, GUEST_TESTS)
    out = proc.stdout
    assert outcomes["test_in_guest"][0] == "passed", out
    assert outcomes["test_on_host"] == ("passed", {})
    assert outcomes["test_fails_in_guest"][0] == "failure"
    assert "guest-side failure text" in out
    assert outcomes["test_skips_in_guest"][0] == "skipped" and "guest-side skip reason" in out
    kernel = outcomes["test_in_guest"][1]["lab_kernel"]
    assert kernel == lab_ready and kernel != platform.release()
    assert f"lab: 3 tests ran on {kernel}" in out
    assert out.count("tests go to the QEMU kernel lab") == 1  # one boot for the session


def test_lab_that_cannot_start_skips_or_fails_under_ci(lab_ready: str, tmp_path: Path) -> None:
    bad = "linux-image-6.1.0-999-stockade-amd64"
    proc, outcomes = run_session(tmp_path, GUEST_TESTS, f"--lab-kernel={bad}")
    assert outcomes["test_in_guest"][0] == "skipped", proc.stdout
    assert outcomes["test_on_host"][0] == "passed"
    assert bad in proc.stdout
    proc, outcomes = run_session(
        tmp_path, GUEST_TESTS, f"--lab-kernel={bad}", STOCKADE_REQUIRE_KERNEL_TESTS="1"
    )
    assert outcomes["test_in_guest"][0] == "failure", proc.stdout
    assert proc.returncode == 1


@pytest.mark.slow
def test_guest_crash_fails_the_rest_with_console_tail(lab_ready: str, tmp_path: Path) -> None:
    tests = GUEST_TESTS.split("@pytest.mark.lab\ndef test_fails")[0] + (
        "@pytest.mark.lab\ndef test_crashes():\n"
        "    print('guest-crash-marker', flush=True)\n"
        "    open('/proc/sysrq-trigger', 'w').write('c')\n"
    )
    proc, outcomes = run_session(tmp_path, tests, "-s")
    assert outcomes["test_in_guest"][0] == "passed", proc.stdout
    assert outcomes["test_crashes"][0] == "failure"
    assert "the kernel lab failed" in proc.stdout and "console tail" in proc.stdout


def test_missing_qemu_is_reported() -> None:
    proc = subprocess.run([sys.executable, str(LAB), "run", "--", "true"], capture_output=True, text=True,
                          timeout=30, cwd=CHECKOUT, env=dict(os.environ, PATH="/nonexistent"))
    assert proc.returncode == 125
    assert "qemu-system-x86_64 not found" in proc.stderr and "qemu-system-x86" in proc.stderr


def test_full_cache_is_refused_before_download(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "mounting a small tmpfs needs root")
    small = tmp_path / "stockade-small-cache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "stockade-test-cache", str(small)], check=True)
    try:
        # The metapackage resolves to the current image without writing anything to the cache.
        proc = subprocess.run([sys.executable, str(LAB), "prepare", "--kernel", "linux-image-amd64"],
                              capture_output=True, text=True, timeout=60, cwd=CHECKOUT,
                              env=dict(os.environ, STOCKADE_LAB_CACHE=str(small)))
        assert proc.returncode == 125
        assert "not enough space for the lab cache" in proc.stderr and "STOCKADE_LAB_CACHE" in proc.stderr
        assert not list(small.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=True)
