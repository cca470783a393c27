"""`stockade doctor`: what this host's kernel lets Stockade enforce, and how to fix what it lacks.

Every check asks the kernel for real (loads a BPF-LSM program, enters a user namespace, lists
nftables tables) instead of trusting config files, then maps the answers onto Stockade's
enforcement layers. Output is a table, or JSON with `--json`; `--strict` exits 1 when a layer
is not fully available. Nothing is left behind: the probe program is detached and closed, the
user-namespace child exits, securityfs is unmounted again if doctor had to mount it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK, MISSING, DEGRADED, INFO = "ok", "missing", "degraded", "info"
SECURITYFS = "/sys/kernel/security"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
LAB_HINT = "or test in the kernel lab: vagrant/lab run -- .venv/bin/pytest -m lab"
V2_WANTED = ("cpu", "memory", "pids", "io", "cpuset")


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class Layer:
    name: str
    status: str
    needs: str
    fix: str = ""


@dataclass
class Report:
    kernel: str
    checks: list[Check] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


# --- BPF-LSM probe without bcc: a two-instruction program attached to bpf_lsm_file_open -------

_SYS_BPF = 321  # x86_64
_BPF_PROG_LOAD, _BPF_RAW_TRACEPOINT_OPEN = 5, 17
_BPF_PROG_TYPE_LSM, _BPF_LSM_MAC = 29, 27
_PROBE_INSNS = bytes.fromhex("b7000000000000009500000000000000")  # r0 = 0 (allow); exit
# Bytes of kind-specific data after each 12-byte btf_type, by kind (vlen = entries).
_BTF_EXTRA = {
    1: (4, 0),
    3: (12, 0),
    4: (0, 12),
    5: (0, 12),
    6: (0, 8),
    13: (0, 8),
    14: (4, 0),
    15: (0, 12),
    17: (4, 0),
    19: (0, 12),
}
_BTF_KIND_FUNC = 12


def btf_func_id(name: str, path: str = BTF_VMLINUX) -> int | None:
    """The BTF type id of kernel function NAME in vmlinux BTF (what an LSM program attaches to)."""
    data = Path(path).read_bytes()
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != 0xEB9F:
        return None
    type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", data, 8)
    pos, end, strs = hdr_len + type_off, hdr_len + type_off + type_len, hdr_len + str_off
    target, type_id = name.encode() + b"\0", 1
    while pos < end:
        name_off, info, _ = struct.unpack_from("<III", data, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        fixed, per_entry = _BTF_EXTRA.get(kind, (0, 0))
        if kind == _BTF_KIND_FUNC and data.startswith(target, strs + name_off):
            return type_id
        pos += 12 + fixed + per_entry * vlen
        type_id += 1
    return None


def _bpf(cmd: int, attr: bytes) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(_SYS_BPF, cmd, buf, len(attr))
    return fd, ctypes.get_errno()


def probe_bpf_lsm() -> tuple[bool, str]:
    """Load and attach a trivial BPF-LSM program (allows everything), then remove it."""
    try:
        btf_id = btf_func_id("bpf_lsm_file_open")
    except OSError as e:
        return False, f"no vmlinux BTF ({e.strerror}); BPF-LSM needs CONFIG_DEBUG_INFO_BTF"
    if btf_id is None:
        return False, "the kernel has no bpf_lsm_file_open hook (CONFIG_BPF_LSM off)"
    insns = ctypes.create_string_buffer(_PROBE_INSNS, len(_PROBE_INSNS))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(128)
    struct.pack_into(
        "<IIQQ",
        attr,
        0,
        _BPF_PROG_TYPE_LSM,
        len(_PROBE_INSNS) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
    )
    attr[48 : 48 + 14] = b"stockade_probe"
    struct.pack_into("<I", attr, 68, _BPF_LSM_MAC)
    struct.pack_into("<I", attr, 108, btf_id)
    prog, err = _bpf(_BPF_PROG_LOAD, bytes(attr))
    if prog < 0:
        return False, f"the kernel refused to load a BPF-LSM program: {os.strerror(err)}"
    try:
        link, err = _bpf(_BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QI4x", 0, prog))
        if link < 0:
            return False, f"the kernel refused to attach a BPF-LSM program: {os.strerror(err)}"
        os.close(link)
    finally:
        os.close(prog)
    return True, "a BPF-LSM program loaded and attached"


def bpf_lsm_status() -> tuple[bool, str]:
    """The BPF helper's probe when it is importable (same answer the agent will get), else ours."""
    try:
        from stockade.bpf.agent import lsm_available
    except ImportError:
        return probe_bpf_lsm()
    try:
        with _quiet_stderr():  # bcc prints the kernel's refusal itself; the report says it once
            return lsm_available()
    except Exception:  # noqa: BLE001 - a broken helper must not hide the kernel's answer
        return probe_bpf_lsm()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --- individual checks -----------------------------------------------------------------------


def active_lsms() -> list[str] | None:
    """/sys/kernel/security/lsm, mounting securityfs for the read when it is not mounted."""
    lsm = Path(SECURITYFS, "lsm")
    if lsm.exists():
        return lsm.read_text().strip().split(",")
    mounted = (
        subprocess.run(
            ["mount", "-t", "securityfs", "securityfs", SECURITYFS], capture_output=True
        ).returncode
        == 0
    )
    try:
        return lsm.read_text().strip().split(",") if lsm.exists() else None
    finally:
        if mounted:
            subprocess.run(["umount", SECURITYFS], capture_output=True)


def check_lsm(report: Report) -> list[str] | None:
    lsms = active_lsms()
    if lsms is None:
        report.checks.append(Check("lsm", MISSING, "cannot read the active LSM list (no securityfs)"))
        return None
    status = OK if "bpf" in lsms else MISSING
    report.checks.append(Check("lsm", status, ",".join(lsms), "" if status == OK else grub_lsm_fix(lsms)))
    return lsms


def grub_lsm_fix(lsms: list[str] | None) -> str:
    wanted = [x for x in (lsms or ["lockdown", "capability", "landlock", "yama", "apparmor"]) if x != "bpf"]
    return (
        f'in /etc/default/grub: GRUB_CMDLINE_LINUX="lsm={",".join(wanted + ["bpf"])}", then '
        f"update-grub and reboot ({LAB_HINT})"
    )


def check_bpf_lsm(report: Report, lsms: list[str] | None) -> None:
    ok, why = bpf_lsm_status()
    if ok:
        fix = ""
    elif lsms and "bpf" in lsms:  # listed but refused: lockdown, a restricted VM, missing CAP_BPF
        fix = f"the kernel lists bpf yet refuses LSM programs (lockdown, hypervisor policy?); {LAB_HINT}"
    else:
        fix = grub_lsm_fix(lsms)
    report.checks.append(Check("bpf-lsm", OK if ok else MISSING, why or "loads", fix))


def check_btf(report: Report) -> None:
    path = Path(BTF_VMLINUX)
    if path.exists():
        report.checks.append(Check("btf", OK, f"{BTF_VMLINUX} ({path.stat().st_size >> 10} KiB)"))
    else:
        report.checks.append(
            Check(
                "btf",
                MISSING,
                f"no {BTF_VMLINUX}",
                "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's are)",
            )
        )


def describe_cgroups() -> dict:
    try:
        from stockade.runtime.cgroups import describe_host
    except ImportError:
        describe_host = None
    if describe_host is not None:
        try:
            return describe_host()
        except OSError:
            pass
    for mode, path in (("v2", "/sys/fs/cgroup"), ("hybrid", "/sys/fs/cgroup/unified")):
        controllers = Path(path, "cgroup.controllers")
        if controllers.exists():
            listed = controllers.read_text().split()
            return {"mode": mode, "unified_mount": path, "controllers": {path: listed}}
    return {"mode": "v1", "unified_mount": None, "controllers": {}}


def check_cgroups(report: Report) -> list[str]:
    info = describe_cgroups()
    mode = info.get("mode", "unknown")
    # describe_host() keys controllers by hierarchy mount point; the unified one holds the v2 list.
    unified = info.get("unified_mount")
    v2 = info.get("controllers", {}).get(unified, []) if unified else []
    if mode == "v2" and not v2:
        v2 = next(iter(info.get("controllers", {}).values()), [])
    fix_v2 = (
        'boot with GRUB_CMDLINE_LINUX="systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all", '
        f"update-grub and reboot ({LAB_HINT})"
    )
    report.checks.append(
        Check("cgroup-mode", OK if mode == "v2" else DEGRADED, mode, "" if mode == "v2" else fix_v2)
    )
    missing = [c for c in V2_WANTED if c not in v2]
    report.checks.append(
        Check(
            "cgroup-v2-controllers",
            OK if not missing else MISSING,
            " ".join(v2) or "none",
            "" if not missing else fix_v2,
        )
    )
    return v2


def check_seccomp(report: Report) -> None:
    status = Path("/proc/self/status").read_text()
    actions = Path("/proc/sys/kernel/seccomp/actions_avail")
    if "Seccomp:" not in status:
        report.checks.append(
            Check(
                "seccomp",
                MISSING,
                "no Seccomp in /proc/self/status",
                "use a kernel with CONFIG_SECCOMP_FILTER=y",
            )
        )
        return
    avail = actions.read_text().strip() if actions.exists() else "unknown actions"
    needed = {"kill_process", "errno", "trap", "log", "allow"}
    missing = needed - set(avail.split())
    report.checks.append(
        Check(
            "seccomp",
            OK if not missing else DEGRADED,
            avail,
            f"kernel lacks seccomp actions {sorted(missing)}" if missing else "",
        )
    )


def check_userns(report: Report) -> None:
    """Enter a user namespace in a forked child; the parent is never changed."""
    pid = os.fork()
    if pid == 0:  # child: exit code 0 when unshare(CLONE_NEWUSER) works, else its errno
        libc = ctypes.CDLL(None, use_errno=True)
        os._exit(0 if libc.unshare(0x10000000) == 0 else (ctypes.get_errno() or 1))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    limit = Path("/proc/sys/user/max_user_namespaces")
    if code == 0:
        report.checks.append(Check("userns", OK, "a user namespace can be created"))
    else:
        fix = (
            f"sysctl -w user.max_user_namespaces=15000 (now {limit.read_text().strip()})"
            if limit.exists()
            else "use a kernel with CONFIG_USER_NS=y"
        )
        report.checks.append(Check("userns", MISSING, f"unshare(CLONE_NEWUSER): {os.strerror(code)}", fix))


def _module_available(name: str) -> bool:
    release = platform.release()
    dep = Path("/lib/modules", release, "modules.dep")
    return dep.exists() and f"/{name}.ko" in dep.read_text()


def check_overlay(report: Report) -> None:
    filesystems = Path("/proc/filesystems").read_text().split()
    if "overlay" in filesystems:
        report.checks.append(Check("overlayfs", OK, "overlay in /proc/filesystems"))
    elif _module_available("overlay"):
        report.checks.append(Check("overlayfs", OK, "overlay module available (loads on first mount)"))
    else:
        report.checks.append(
            Check(
                "overlayfs",
                MISSING,
                "no overlay filesystem",
                "modprobe overlay, or use a kernel with CONFIG_OVERLAY_FS",
            )
        )


def check_nftables(report: Report) -> None:
    nft = shutil.which("nft")
    if not nft:
        report.checks.append(Check("nftables", MISSING, "nft not installed", "apt-get install nftables"))
        return
    # Listing tables is read-only and fails when the kernel has no nf_tables.
    proc = subprocess.run([nft, "list", "tables"], capture_output=True, text=True)
    if proc.returncode == 0:
        report.checks.append(Check("nftables", OK, "nf_tables answers"))
    else:
        report.checks.append(
            Check(
                "nftables",
                MISSING,
                proc.stderr.strip().splitlines()[-1:][0] if proc.stderr.strip() else "nft failed",
                "modprobe nf_tables, or use a kernel with CONFIG_NF_TABLES",
            )
        )


def check_bpffs(report: Report) -> None:
    mounted = any(
        line.split()[2] == "bpf"
        for line in Path("/proc/mounts").read_text().splitlines()
        if len(line.split()) > 2
    )
    report.checks.append(
        Check(
            "bpffs",
            OK if mounted else DEGRADED,
            "bpf filesystem mounted" if mounted else "no bpf filesystem mounted",
            "" if mounted else "mount -t bpf bpf /sys/fs/bpf (pins need it)",
        )
    )


# --- layers ----------------------------------------------------------------------------------


def _agent_layer() -> Layer:
    """Per-container BPF policies are map entries on the agent's pinned programs."""
    from stockade.bpf import maps

    loaded = sorted(maps.loaded_layers())
    if loaded:
        return Layer("BPF agent (pinned programs)", "available", ", ".join(loaded))
    return Layer("BPF agent (pinned programs)", "unavailable", "stockade agent", "start it: stockade agent")


def _v1_controllers() -> list[str]:
    try:
        from .cgroups import describe_host

        hierarchies = describe_host().get("controllers", {})
    except Exception:  # noqa: BLE001 - doctor reports what it can
        return []
    return sorted({c for path, names in hierarchies.items() if "unified" not in path for c in names})


def layers(report: Report, v2: list[str]) -> list[Layer]:
    st = {c.name: c for c in report.checks}

    def layer(name: str, needs: str, *checks: str) -> Layer:
        bad = [st[c] for c in checks if st[c].status != OK]
        if not bad:
            return Layer(name, "available", needs)
        status = "unavailable" if any(c.status == MISSING for c in bad) else "degraded"
        return Layer(name, status, needs, "; ".join(dict.fromkeys(c.fix for c in bad if c.fix)))

    out = [
        layer("namespaces + uid mapping", "userns", "userns"),
        layer("seccomp filters", "seccomp", "seccomp"),
        layer("BPF-LSM policy", "bpf-lsm, btf, bpffs", "bpf-lsm", "btf", "bpffs"),
        layer("overlay rootfs", "overlayfs", "overlayfs"),
        layer("network policy (nftables)", "nftables", "nftables"),
    ]
    mode = st["cgroup-mode"].detail
    if st["cgroup-v2-controllers"].status == OK:
        out.append(Layer("cgroup limits", "available", "cgroup v2 controllers"))
    elif mode in ("v1", "hybrid"):
        # The v1 driver (cgroupspy) enforces memory, cpu, cpuset, pids and devices; limits that
        # only cgroup v2 has are refused per container, never skipped.
        out.append(
            Layer(
                "cgroup limits",
                "available",
                f"v1 driver (cgroupspy): {', '.join(_v1_controllers())}; v2-only limits refused"
                + (
                    "; hybrid: a container joins only the v1 hierarchies its limits need, devices "
                    "and pause go through its cgroup2 cgroup"
                    if mode == "hybrid"
                    else ""
                ),
            )
        )
    else:
        out.append(
            Layer("cgroup limits", "unavailable", "cgroup v2 controllers", st["cgroup-v2-controllers"].fix)
        )
    out.append(_agent_layer())
    unified = mode == "v2" or bool(v2) or os.path.exists("/sys/fs/cgroup/unified/cgroup.procs")
    out.append(
        Layer(
            "BPF cgroup programs (devices, sockets)",
            "available" if unified else "unavailable",
            "a cgroup2 mount",
            "" if unified else "mount cgroup2 (systemd does by default)",
        )
    )
    return out


def diagnose() -> Report:
    report = Report(kernel=f"{platform.release()} {platform.version()}")
    report.checks.append(Check("kernel", INFO, platform.release()))
    lsms = check_lsm(report)
    check_bpf_lsm(report, lsms)
    check_btf(report)
    v2 = check_cgroups(report)
    check_seccomp(report)
    check_userns(report)
    check_overlay(report)
    check_nftables(report)
    check_bpffs(report)
    report.layers = layers(report, v2)
    return report


def render_table(report: Report) -> str:
    lines = [f"kernel {report.kernel}", ""]
    width = max(len(c.name) for c in report.checks)
    lines += [f"{c.name:<{width}}  {c.status:<8}  {c.detail}" for c in report.checks]
    lines += ["", "enforcement layers:"]
    lwidth = max(len(layer.name) for layer in report.layers)
    lines += [f"  {layer.name:<{lwidth}}  {layer.status:<11}  {layer.needs}" for layer in report.layers]
    fixes = [layer for layer in report.layers if layer.fix]
    if fixes:
        lines += ["", "to fix:"]
        lines += [f"  {layer.name}: {layer.fix}" for layer in fixes]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="stockade doctor", description="What this kernel lets Stockade enforce, and how to fix gaps."
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every layer is available")
    args = parser.parse_args(argv)
    report = diagnose()
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(render_table(report))
    if args.strict and any(layer.status != "available" for layer in report.layers):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
