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
from kernel import require
from stockade.bpf import btf
from stockade.bpf.loader import lsm_hooks
from stockade.runtime import doctor

CHECKS = {
    "kernel",
    "lsm",
    "bpf-lsm",
    "btf",
    "bpf-hooks",
    "cgroup-mode",
    "cgroup-v2-controllers",
    "seccomp",
    "userns",
    "overlayfs",
    "nftables",
    "bpffs",
    "tenant network",
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
    require(Path("/sys/kernel/btf/vmlinux").exists(), "no vmlinux BTF (CONFIG_DEBUG_INFO_BTF)")
    a, b = btf.func_id("bpf_lsm_file_open"), btf.func_id("bpf_lsm_socket_create")
    assert a and b and a != b
    assert btf.func_id("stockade_no_such_function") is None
    hooks, enums = doctor.btf_names()
    assert {"bpf_lsm_file_open", "bpf_lsm_socket_create"} <= hooks
    assert all(h.startswith("bpf_lsm_") for h in hooks)
    assert {"BPF_PROG_LOAD", "BPF_MAP_CREATE"} <= enums["bpf_cmd"]
    assert "BPF_FUNC_get_current_cgroup_id" in enums["bpf_func_id"]


def test_bpf_hooks_check_matches_btf(report: dict) -> None:
    require(Path("/sys/kernel/btf/vmlinux").exists(), "no vmlinux BTF (CONFIG_DEBUG_INFO_BTF)")
    check = by_name(report)["bpf-hooks"]
    hooks, enums = doctor.btf_names()
    used = lsm_hooks()
    assert (check["status"] == "ok") == all(f"bpf_lsm_{h}" in hooks for h in used), check
    assert check["detail"].startswith(f"{len(used)}/{len(used)} LSM hooks" if check["status"] == "ok" else "")
    assert f"({len(hooks)} bpf_lsm_* functions in BTF)" in check["detail"]
    assert ("BPF tokens" in check["detail"].split("; not ")[0]) == ("BPF_TOKEN_CREATE" in enums["bpf_cmd"])


def test_a_kernel_without_a_hook_loses_the_bpf_lsm_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = {f"bpf_lsm_{h}" for h in lsm_hooks()} - {"bpf_lsm_userns_create"}  # as on 5.15
    enums = {"bpf_func_id": {"BPF_FUNC_get_current_ancestor_cgroup_id"},
             "bpf_map_type": {"BPF_MAP_TYPE_RINGBUF"}}
    monkeypatch.setattr(doctor, "btf_names", lambda: (hooks, enums))
    report = doctor.Report(kernel="test")
    doctor.check_bpf_hooks(report)
    check = report.check("bpf-hooks")
    assert check.status == doctor.MISSING
    assert "bpf_lsm_userns_create" in check.fix and "vagrant/lab" in check.fix
    assert "not per-cgroup LSM (6.0)" in check.detail and "BPF tokens (6.9)" in check.detail


def test_lab_kernels_are_noted_where_the_lab_is_suggested(report: dict) -> None:
    assert [k["kernel"].split()[0] for k in report["lab_kernels"]] == ["6.1", "6.12"]
    checks = [doctor.Check("kernel", doctor.INFO, "test")]

    def table(layer: doctor.Layer) -> str:
        return doctor.render_table(doctor.Report(kernel="test", checks=checks, layers=[layer]))

    suggested = table(doctor.Layer("x", "unavailable", "y", doctor.LAB_HINT))
    assert "the kernel lab's kernels" in suggested and "linux-image-amd64/bookworm-backports" in suggested
    assert "the kernel lab's kernels" not in table(doctor.Layer("x", "available", "y"))


@pytest.mark.lab
def test_doctor_in_a_bpf_lsm_cgroup_v2_kernel(report: dict) -> None:
    checks = by_name(report)
    assert checks["bpf-lsm"]["status"] == "ok", checks["bpf-lsm"]
    assert checks["lsm"]["status"] == "ok"
    assert checks["bpf-hooks"]["status"] == "ok", checks["bpf-hooks"]  # the lab kernels have every hook
    assert checks["cgroup-mode"]["detail"] == "v2"
    assert checks["cgroup-v2-controllers"]["status"] == "ok"
    layers = {x["name"]: x["status"] for x in report["layers"]}
    assert layers["BPF-LSM policy"] == "available"
    assert layers["cgroup limits"] == "available"


def test_stockade_doctor_cli() -> None:
    cli = Path(sys.executable).parent / "stockade"
    require(cli.exists(), "no stockade entry point in this venv (scripts/setup installs it)")
    table = subprocess.run([str(cli), "doctor"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "enforcement layers:" in table.stdout
    data = json.loads(subprocess.run([str(cli), "doctor", "--json"], capture_output=True, text=True,
                                     timeout=120).stdout)
    assert set(by_name(data)) == CHECKS
