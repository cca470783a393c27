"""`stockade doctor`: what this host's kernel lets Stockade enforce, and how to fix what it lacks.

Every check asks the kernel for real (loads a BPF-LSM program and reads its BTF through
stockade.bpf, enters a user namespace, lists nftables tables) instead of trusting config files,
then maps the answers onto Stockade's enforcement layers. Output is a table, or JSON with
`--json`; `--strict` exits 1 when a layer is not fully available. Nothing is left behind: the
probe program is detached and closed, the user-namespace child exits, securityfs is unmounted
again if doctor had to mount it.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stockade.bpf import btf, maps, probe
from stockade.bpf.loader import lsm_hooks

from .cgroups import describe_host

OK, MISSING, DEGRADED, INFO = "ok", "missing", "degraded", "info"
SECURITYFS = "/sys/kernel/security"
BTF_VMLINUX = btf.VMLINUX
LAB_HINT = "or test in the kernel lab: vagrant/lab run -- .venv/bin/pytest -m lab"
V2_WANTED = ("cpu", "memory", "pids", "io", "cpuset")
# What the policy programs need beyond the LSM hooks in bpf/lsm.bpf.c: (BTF enum, enumerator, name).
BPF_NEEDED = (
    ("bpf_func_id", "BPF_FUNC_get_current_ancestor_cgroup_id", "cgroup-id helpers"),
    ("bpf_map_type", "BPF_MAP_TYPE_RINGBUF", "ring buffer"),
)
# Newer hooks worth knowing about (none is needed today), with the release that brought them.
BPF_EXTRAS = (
    ("bpf_attach_type", "BPF_LSM_CGROUP", "per-cgroup LSM", "6.0"),
    ("bpf_attach_type", "BPF_TRACE_FENTRY", "fentry/fexit", "5.5"),
    ("bpf_map_type", "BPF_MAP_TYPE_CGRP_STORAGE", "cgroup storage maps", "6.2"),
    ("bpf_attach_type", "BPF_CGROUP_UNIX_CONNECT", "AF_UNIX cgroup sock_addr hooks", "6.7"),
    ("bpf_cmd", "BPF_TOKEN_CREATE", "BPF tokens", "6.9"),
)
# The kernels the lab boots, measured there (bpf_lsm_* attach probes, BTF enums, kfuncs); doctor
# itself only reports the running kernel. vagrant/README.md has the same table.
LAB_KERNELS = (
    ("6.1 (Debian 12, vagrant/lab's default)",
     "BPF-LSM with 228 hooks that take a program; per-cgroup LSM; fentry/fexit; cgroup v2"),
    ("6.12 (bookworm-backports: vagrant/lab run --kernel linux-image-amd64/bookworm-backports)",
     "BPF-LSM with 255 hooks (new: bpf_token_*, bpf_map_create, bpf_prog_load, file_truncate, "
     "file_release, file_post_open, inode_*_acl, path_post_mknod, ...); as 6.1, plus AF_UNIX cgroup "
     "sock_addr hooks, BPF tokens, cgroup storage maps, kfuncs such as bpf_path_d_path and "
     "bpf_get_file_xattr; ima and evm join the LSM list"),
)


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


def probe_bpf_lsm() -> tuple[bool, str]:
    """Whether the kernel runs BPF-LSM programs, and why not (stockade.bpf.probe.lsm)."""
    return probe.lsm()


def btf_names() -> tuple[set[str], dict[str, set[str]]]:
    """The kernel's bpf_lsm_* functions and its enums, from its BTF (stockade.bpf.btf.names)."""
    return btf.names()


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
    ok, why = probe.lsm(lsms)
    if ok and importlib.util.find_spec("bcc") is None:  # the agent compiles lsm.bpf.c with bcc
        ok, why, fix = False, "bcc (python3-bpfcc) is not installed", "apt-get install python3-bpfcc"
    elif ok:
        fix = ""
    elif lsms and "bpf" in lsms:  # listed but refused: lockdown, a restricted VM, missing CAP_BPF
        fix = f"the kernel lists bpf yet refuses LSM programs (lockdown, hypervisor policy?); {LAB_HINT}"
    else:
        fix = grub_lsm_fix(lsms)
    report.checks.append(Check("bpf-lsm", OK if ok else MISSING, why or "loads", fix))


def check_bpf_hooks(report: Report) -> None:
    """Whether the kernel has every LSM hook, helper and map type the policy programs use (from
    its BTF), and which newer BPF hooks it offers besides."""
    try:
        hooks, enums = btf_names()
    except OSError as e:
        report.checks.append(Check("bpf-hooks", MISSING, f"no vmlinux BTF ({e.strerror})"))
        return
    try:
        used = lsm_hooks()
    except OSError:
        used = []
    no_hooks = [f"bpf_lsm_{h}" for h in used if f"bpf_lsm_{h}" not in hooks]
    needed = [(what, name in enums.get(enum, ())) for enum, name, what in BPF_NEEDED]
    lacking = no_hooks + [what for what, ok in needed if not ok]
    extras = [(f"{what} ({since})", name in enums.get(enum, ())) for enum, name, what, since in BPF_EXTRAS]
    have, lack = [x for x, ok in extras if ok], [x for x, ok in extras if not ok]
    detail = "; ".join(
        [f"{len(used) - len(no_hooks)}/{len(used)} LSM hooks Stockade attaches "
         f"({len(hooks)} bpf_lsm_* functions in BTF)"]
        + [what for what, ok in needed if ok]
        + ([f"also {', '.join(have)}"] if have else [])
        + ([f"not {', '.join(lack)}"] if lack else [])
    )
    fix = f"a kernel with {', '.join(lacking)}: Debian 12's 6.1 has them ({LAB_HINT})" if lacking else ""
    report.checks.append(Check("bpf-hooks", MISSING if lacking else OK, detail, fix))


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


def check_tenant_network(report: Report, cri_config: str | None) -> None:
    """The CRI server's network backend and, in this network namespace, its tenants' rules."""
    from stockade.cri import config as cri
    from stockade.cri import netrules
    from stockade.runtime.errors import StockadeError

    try:
        loaded = cri.load(cri_config, explicit=cri_config is not None)
        backend = loaded.network
    except StockadeError as exc:
        report.checks.append(Check("tenant network", MISSING, str(exc), "fix the CRI configuration"))
        return
    if backend == "none":
        report.checks.append(Check("tenant network", INFO, "network = \"none\": pods get loopback only",
                                   'network = "bridge" in /etc/stockade/stockade.toml'))
        return
    listing = ["nft", "-j", "list", "table", "inet", netrules.TABLE]
    proc = subprocess.run(listing, capture_output=True, text=True)
    if proc.returncode != 0:
        report.checks.append(Check("tenant network", DEGRADED, f"{backend}: no Stockade nft table here",
                                   "start stockade cri serve (run doctor in its network namespace)"))
        return
    tenants = netrules.summary(json.loads(proc.stdout))
    detail = "; ".join(f"{name}: {t['rules']} rules, {t['denied']} packets denied"
                       for name, t in sorted(tenants.items()))
    backend += ", dual-stack" if loaded.net.pod_cidr6 else ""
    report.checks.append(Check("tenant network", OK, f"{backend}: {len(tenants) - 1} tenants ({detail})"))


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
    loaded = sorted(maps.loaded_layers())
    if loaded:
        return Layer("BPF agent (pinned programs)", "available", ", ".join(loaded))
    return Layer("BPF agent (pinned programs)", "unavailable", "stockade agent", "start it: stockade agent")


def _v1_controllers() -> list[str]:
    try:
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
        layer("BPF-LSM policy", "bpf-lsm, btf, bpf-hooks, bpffs", "bpf-lsm", "btf", "bpf-hooks", "bpffs"),
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


def diagnose(cri_config: str | None = None) -> Report:
    report = Report(kernel=f"{platform.release()} {platform.version()}")
    report.checks.append(Check("kernel", INFO, platform.release()))
    lsms = check_lsm(report)
    check_bpf_lsm(report, lsms)
    check_btf(report)
    check_bpf_hooks(report)
    v2 = check_cgroups(report)
    check_seccomp(report)
    check_userns(report)
    check_overlay(report)
    check_nftables(report)
    check_bpffs(report)
    check_tenant_network(report, cri_config)
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
    if any("vagrant/lab" in layer.fix for layer in fixes):
        lines += ["", "the kernel lab's kernels (vagrant/README.md):"]
        lines += [f"  {kernel}: {offers}" for kernel, offers in LAB_KERNELS]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="stockade doctor", description="What this kernel lets Stockade enforce, and how to fix gaps."
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless every layer is available")
    parser.add_argument("--cri-config", help="the CRI server configuration (/etc/stockade/stockade.toml)")
    args = parser.parse_args(argv)
    report = diagnose(args.cri_config)
    if args.json:
        lab = [{"kernel": kernel, "offers": offers} for kernel, offers in LAB_KERNELS]
        print(json.dumps(dict(asdict(report), lab_kernels=lab), indent=2))
    else:
        print(render_table(report))
    if args.strict and any(layer.status != "available" for layer in report.layers):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
