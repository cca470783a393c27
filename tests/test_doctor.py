"""`stockade doctor`: its answers match what the kernel actually does."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from stockade.bpf import btf
from stockade.runtime import doctor

CHECKS = {
    "kernel",
    "lsm",
    "bpf-lsm",
    "btf",
    "cgroup-mode",
    "cgroup-v2-controllers",
    "seccomp",
    "userns",
    "overlayfs",
    "nftables",
    "bpffs",
}


@pytest.fixture(scope="module")
def report() -> dict:
    mounts_before = Path("/proc/self/mountinfo").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "stockade.runtime.doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # securityfs is unmounted again if doctor mounted it; no other mount appears.
    assert Path("/proc/self/mountinfo").read_text() == mounts_before
    return json.loads(proc.stdout)


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def test_json_report_has_every_check_and_layer(report: dict) -> None:
    checks = by_name(report)
    assert set(checks) == CHECKS
    assert report["kernel"].split()[0] == platform.release() == checks["kernel"]["detail"]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert {
        "BPF-LSM policy",
        "cgroup limits",
        "seccomp filters",
        "namespaces + uid mapping",
        "overlay rootfs",
        "network policy (nftables)",
    } <= set(layers)
    for layer in layers.values():
        assert layer["status"] in ("available", "degraded", "unavailable")
        assert (layer["status"] == "available") == (not layer["fix"]), layer


def test_bpf_lsm_answer_matches_a_real_load(report: dict) -> None:
    ok, why = doctor.probe_bpf_lsm()
    check = by_name(report)["bpf-lsm"]
    assert (check["status"] == "ok") == ok, (check, why)
    layer = next(x for x in report["layers"] if x["name"] == "BPF-LSM policy")
    if not ok:
        assert layer["status"] == "unavailable"
        assert "lsm=" in layer["fix"] or "vagrant/lab run" in layer["fix"]
        assert "vagrant/lab run" in layer["fix"]


def test_kernel_facts(report: dict) -> None:
    checks = by_name(report)
    assert (checks["btf"]["status"] == "ok") == Path("/sys/kernel/btf/vmlinux").exists()
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    assert (checks["cgroup-mode"]["detail"] == "v2") == v2.exists()
    if v2.exists():
        assert checks["cgroup-v2-controllers"]["detail"].split() == v2.read_text().split()
    assert checks["seccomp"]["status"] == "ok"
    assert "errno" in checks["seccomp"]["detail"].split()
    assert checks["overlayfs"]["status"] == "ok" or "overlay" not in Path("/proc/filesystems").read_text()


def test_userns_answer_matches_unshare(report: dict) -> None:
    pid = os.fork()
    if pid == 0:  # the child tries; the test process is never changed
        os._exit(0 if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0 else 1)  # CLONE_NEWUSER
    _, status = os.waitpid(pid, 0)
    assert (by_name(report)["userns"]["status"] == "ok") == (os.waitstatus_to_exitcode(status) == 0)


def test_table_output_and_strict(capsys: pytest.CaptureFixture[str], report: dict) -> None:
    code = doctor.main([])
    out = capsys.readouterr().out
    assert code == 0
    for name in CHECKS:
        assert name in out
    assert "enforcement layers:" in out
    all_available = all(x["status"] == "available" for x in report["layers"])
    if not all_available:
        assert "to fix:" in out
    assert doctor.main(["--strict"]) == (0 if all_available else 1)
    capsys.readouterr()


def test_btf_lookup_finds_lsm_hooks() -> None:
    if not Path("/sys/kernel/btf/vmlinux").exists():
        pytest.skip("no vmlinux BTF")
    a, b = btf.func_id("bpf_lsm_file_open"), btf.func_id("bpf_lsm_socket_create")
    assert a and b and a != b
    assert btf.func_id("stockade_no_such_function") is None


@pytest.mark.lab
def test_doctor_in_a_bpf_lsm_cgroup_v2_kernel(report: dict) -> None:
    checks = by_name(report)
    assert checks["bpf-lsm"]["status"] == "ok", checks["bpf-lsm"]
    assert checks["lsm"]["status"] == "ok"
    assert checks["cgroup-mode"]["detail"] == "v2"
    assert checks["cgroup-v2-controllers"]["status"] == "ok"
    layers = {x["name"]: x["status"] for x in report["layers"]}
    assert layers["BPF-LSM policy"] == "available"
    assert layers["cgroup limits"] == "available"


def test_stockade_doctor_cli() -> None:
    cli = Path(sys.executable).parent / "stockade"
    if not cli.exists():
        pytest.skip("the stockade entry point is not installed in this venv")
    table = subprocess.run([str(cli), "doctor"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "enforcement layers:" in table.stdout
    data = json.loads(subprocess.run([str(cli), "doctor", "--json"], capture_output=True, text=True,
                                     timeout=120).stdout)
    assert set(by_name(data)) == CHECKS
