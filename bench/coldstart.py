#!/usr/bin/env python3
"""Cold start and idle memory: stockade-oci vs runc vs crun, same bundle, same run, alternating.

Usage (root): .venv/bin/python bench/coldstart.py [--runs 30] [--seccomp [--no-nnp]] [--json out.json]

Every runtime runs the identical busybox-static bundle (config from `runc spec`, /bin/true).
crun refuses this host's hybrid cgroups, so it runs inside a private mount namespace with a
cgroup2 mount over /sys/fs/cgroup; that wrapper's own cost is measured and reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import as_root, parser, report  # bench/report.py (this directory is the script's path)

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
CRUN_WRAP = ["unshare", "-m", "sh", "-c", 'mount -t cgroup2 none /sys/fs/cgroup && exec "$0" "$@"']


def make_bundle(root: Path, seccomp: bool = False, nnp: bool = True) -> Path:
    bundle = root / "bundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    for applet in ("true", "sh", "sleep"):
        os.symlink("busybox", bundle / "rootfs" / "bin" / applet)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = ["/bin/true"]
    # runc spec's default-deny device rule makes crun load a cgroup-v2 device program, which needs
    # more RLIMIT_MEMLOCK than this host lets it raise to (no CAP_SYS_RESOURCE): same config for all.
    config["linux"].pop("resources", None)
    if seccomp:  # what engines pass: the RuntimeDefault (Docker default) filter, for every runtime
        from stockade.profiles import load_profile, profile_seccomp

        config["linux"]["seccomp"] = profile_seccomp(load_profile("runtime-default"))
        # engines (podman, containerd's CRI plugin, Docker) leave no_new_privs off
        config["process"]["noNewPrivileges"] = nnp
    (bundle / "config.json").write_text(json.dumps(config, indent=1))
    return bundle


def commands(bundle: Path, state: Path, baseline: str | None = None) -> dict[str, callable]:
    def oci(prefix: list[str], binary: str):  # noqa: ANN202
        def cmd(cid: str) -> list[str]:
            return [
                *prefix,
                binary,
                "--root",
                str(state / Path(binary).name),
                "run",
                "--bundle",
                str(bundle),
                cid,
            ]

        return cmd

    baseline_cmds = {"stockade-oci baseline": oci([], baseline)} if baseline else {}
    return {
        "stockade-oci": oci([], str(VENV_BIN / "stockade-oci")),
        **baseline_cmds,
        "runc": oci([], "runc"),
        "crun": oci(CRUN_WRAP, "crun"),
        "crun-wrapper-only": lambda cid: [*CRUN_WRAP, "true"],
        "stockade run": lambda cid: [
            str(VENV_BIN / "stockade"),
            "run",
            "--allow-degraded",
            "--name",
            cid,
            "--",
            "/bin/true",
        ],
    }


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}): {done.stderr.decode()[-400:]}")
    return elapsed * 1000


def cold_start(bundle: Path, state: Path, runs: int, baseline: str | None = None) -> dict[str, list[float]]:
    cmds = commands(bundle, state, baseline)
    samples: dict[str, list[float]] = {name: [] for name in cmds}
    names = list(cmds)
    for i in range(runs + 2):  # two warm-up rounds (page cache, pyc) are dropped
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            ms = timed(cmds[name](f"bench-{i}-{len(samples[name])}"))
            if i >= 2:
                samples[name].append(ms)
    return samples


def pss_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def idle_memory(bundle: Path, state: Path) -> dict[str, dict[str, int]]:
    """RSS/PSS of what each runtime leaves behind for a created (not yet started) container."""
    out = {}
    for name, prefix, binary in (
        ("stockade-oci", [], str(VENV_BIN / "stockade-oci")),
        ("runc", [], "runc"),
        ("crun", CRUN_WRAP, "crun"),
    ):
        root = state / f"mem-{Path(binary).name}"
        pidfile = state / f"{name}.pid"
        base = [*prefix, binary, "--root", str(root)]
        subprocess.run(
            [*base, "create", "--bundle", str(bundle), "--pid-file", str(pidfile), "memtest"],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        try:
            rss, pss = pss_kib(int(pidfile.read_text()))
            out[name] = {"created_rss_kib": rss, "created_pss_kib": pss, "running_overhead_kib": 0}
        finally:
            subprocess.run([*base, "delete", "--force", "memtest"], check=False)
    return out


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    runc = statistics.median(samples["runc"])
    out = {}
    for name, values in samples.items():
        med = statistics.median(values)
        out[name] = {
            "median_ms": round(med, 2),
            "p90_ms": round(sorted(values)[int(len(values) * 0.9) - 1], 2),
            "vs_runc": round(med / runc, 2),
            "runs": len(values),
        }
    return out


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--seccomp", action="store_true", help="every runtime gets the runtime-default filter")
    p.add_argument("--no-nnp", action="store_true", help="with --seccomp: no_new_privs off, as engines send")
    p.add_argument(
        "--baseline",
        metavar="LAUNCHER",
        help="also measure this stockade-oci (e.g. a launcher over an older checkout) in the same run",
    )
    args = as_root(p)
    # `stockade run` installs the default BPF policy through the agent, as in real use (BPF-LSM is
    # refused by this kernel, hence --allow-degraded; the cgroup-BPF layers are enforced).
    started = subprocess.run([str(VENV_BIN / "stockade"), "agent"], capture_output=True).returncode == 0
    try:
        return _measure(args)
    finally:
        if started:
            subprocess.run([str(VENV_BIN / "stockade"), "agent", "--stop"], capture_output=True)


def _measure(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as tmp:
        bundle = make_bundle(Path(tmp), args.seccomp, nnp=not args.no_nnp)
        state = Path(tmp) / "state"
        result = {
            "versions": {
                name: subprocess.run([name, "--version"], capture_output=True, text=True).stdout.split("\n")[
                    0
                ]
                for name in ("runc", "crun")
            },
            "cold_start": summarize(cold_start(bundle, state, args.runs, args.baseline)),
            "idle_memory": idle_memory(bundle, state),
        }
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
