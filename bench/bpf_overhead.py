"""Per-operation overhead of Stockade's BPF programs, policy install time, map memory.

    .venv/bin/python bench/bpf_overhead.py [--iterations N] [--rounds R] [--json OUT]     # as root

Each operation runs in a C loop (bench/bpf_loop.c, built with gcc: raw syscalls, no interpreter
between them; see OPS for the clock), in one network namespace made for the run, inside the
container cgroup (below the Stockade parent) and in a process outside any container. Phases
alternate round by round, in a rotating order: (1) "base", the agent's programs detached (no
Stockade BPF); (2) "empty", programs of the same types that only return "allow" attached in
their place, the kernel's own cost of running a cgroup hook; (3) "with BPF", the agent's
programs with a policy installed for the container. The table shows medians of rounds and the
median of the per-round differences against base (a round's phases run back to back, so slow
drift cancels). BPF statistics (BPF_ENABLE_STATS) are off for that comparison because they add
their own cost to every run; a separate pass turns them on to read the in-kernel nanoseconds
per program run. The LSM programs are measured only where BPF-LSM loads (the QEMU lab); the
output says which layers were attached. Everything it creates (pins, cgroups, netns) is
removed at exit.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from stockade.bpf import bpfsys, loader, maps
from stockade.bpf.policy import compile_policy, load_policy, parse_policy

PYTHON = sys.executable


HERE = os.path.dirname(os.path.abspath(__file__))
LOOP_SRC = os.path.join(HERE, "bpf_loop.c")
# operation -> (bpf_loop op, share of --iterations (spawns are ~100x slower), clock). The
# syscall loops are timed by the thread's CPU time, which leaves out the time other tenants of
# a shared machine preempt them (wall-clock rounds here scatter by ±10 %); fork+execve by wall
# clock, since the child's work is not the parent thread's CPU time.
OPS = {"openat+close": ("openclose", 1, "cpu"), "socket+connect(udp)+close": ("udpconnect", 1, "cpu"),
       "sendto(udp)": ("sendto", 1, "cpu"), "fork+execve": ("spawn", 1 / 50, "wall")}


def build_loop(workdir: str) -> str:
    exe = os.path.join(workdir, "bpf_loop")
    subprocess.run(["gcc", "-O2", "-o", exe, LOOP_SRC], check=True)
    return exe


def measure(loop: str, netns: str, cgroup: str | None, n: int, ops: dict = OPS) -> dict[str, float]:
    """ns per operation, one timed pass per operation (after a warm-up pass)."""
    out = {}
    for name, (op, share, clock) in ops.items():
        count = max(1, int(n * share))
        proc = subprocess.run([loop, cgroup or "-", netns, op, str(count)], capture_output=True,
                              text=True, check=True)
        wall, cpu = (float(x) for x in proc.stdout.split())
        out[name] = cpu if clock == "cpu" else wall
    return out


def make_netns(name: str) -> str:
    """One network namespace with lo up for every run: no namespace teardown between rounds."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return f"/run/netns/{name}"


def map_memory(pin_dir: str) -> dict[str, int]:
    """memlock bytes per pinned map (from /proc/self/fdinfo)."""
    out = {}
    for name in maps.MAPS:
        fd = maps.open_map(name, pin_dir)
        try:
            for line in open(f"/proc/self/fdinfo/{fd}"):
                if line.startswith("memlock:"):
                    out[name] = int(line.split()[1])
        finally:
            os.close(fd)
    return out


def _attach(root: str, fds: dict[str, int], attached: bool, specs: tuple = loader.CGROUP_PROGS) -> None:
    cg = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for spec in specs:
            fd = fds[spec.name]
            present = bpfsys.prog_info(fd)["id"] in bpfsys.prog_query(cg, spec.attach_type)
            if attached and not present:
                bpfsys.prog_attach(cg, fd, spec.attach_type, bpfsys.F_ALLOW_MULTI)
            elif not attached and present:
                bpfsys.prog_detach(cg, fd, spec.attach_type)
    finally:
        os.close(cg)


def pinned_programs(pin_dir: str) -> dict[str, int]:
    return {spec.name: bpfsys.obj_get(maps.pin_path(f"prog_{spec.name}", pin_dir))
            for spec in loader.CGROUP_PROGS}


_ALLOW = bytes.fromhex("b700000001000000" "9500000000000000")  # r0 = 1; exit


def empty_programs() -> dict[str, int]:
    """Programs of the agent's types and attach points that only allow: the hook's fixed cost."""
    return {spec.name: bpfsys.prog_load(spec.prog_type, _ALLOW, name="stk_bench_empty",
                                        expected_attach_type=spec.attach_type)
            for spec in loader.CGROUP_PROGS}


class LsmToggle:
    """Unlink/relink the pinned BPF-LSM links, keeping their programs loaded in between."""

    def __init__(self, pin_dir: str) -> None:
        self.pin_dir = pin_dir
        self.progs: dict[str, int] = {}
        for name in sorted(os.listdir(pin_dir)):
            if name.startswith("link_lsm_"):
                fd = bpfsys.obj_get(os.path.join(pin_dir, name))
                info = ctypes.create_string_buffer(64)  # struct bpf_link_info: type, id, prog_id
                bpfsys.bpf(bpfsys.OBJ_GET_INFO_BY_FD, bpfsys._attr("=IIQ", fd, 64, ctypes.addressof(info)))
                os.close(fd)
                self.progs[name] = bpfsys.prog_fd_by_id(int.from_bytes(info.raw[8:12], "little"))

    def set(self, attached: bool) -> None:
        for name, prog_fd in self.progs.items():
            path = os.path.join(self.pin_dir, name)
            if attached and not os.path.exists(path):
                link = bpfsys.raw_tracepoint_open(prog_fd)
                bpfsys.obj_pin(link, path)
                os.close(link)
            elif not attached and os.path.exists(path):
                os.unlink(path)  # the last reference: the kernel unlinks the hook

    def close(self) -> None:
        self.set(True)
        for fd in self.progs.values():
            os.close(fd)


# with_bpf: the programs where the runtime puts them for a container that needs the egress ones
# (the rest at the parent); no_egress: no container needs them (every one behind a network that
# refuses what its policy refuses), so only the parent's programs are attached anywhere.
PHASES = ("baseline", "empty", "with_bpf", "no_egress")
EGRESS = tuple(spec for spec in loader.CGROUP_PROGS if spec.name in maps.EGRESS_PROGRAMS)


def compare(loop: str, netns: str, pin_dir: str, root: str, container: str, n: int, rounds: int) -> dict:
    """Alternate the phases round by round, in a rotating order (this host is shared and drifts);
    medians of rounds per phase."""
    samples: dict = {phase: {} for phase in PHASES}
    ours, empty = pinned_programs(pin_dir), empty_programs()
    lsm = LsmToggle(pin_dir)
    try:
        for r in range(rounds):
            for phase in PHASES[r % len(PHASES):] + PHASES[:r % len(PHASES)]:
                _attach(root, ours, phase in ("with_bpf", "no_egress"), loader.PARENT_PROGS)
                _attach(root, ours, False, EGRESS)  # an older agent's layout
                _attach(container, ours, phase == "with_bpf", EGRESS)
                _attach(root, empty, phase == "empty")
                lsm.set(phase in ("with_bpf", "no_egress"))
                for where, cgroup in (("inside", container), ("outside", None)):
                    for op, ns in measure(loop, netns, cgroup, n).items():
                        samples[phase].setdefault(where, {}).setdefault(op, []).append(ns)
    finally:
        _attach(root, empty, False)
        _attach(container, ours, False, EGRESS)
        _attach(root, ours, True, loader.PARENT_PROGS)
        lsm.close()
        for fd in list(ours.values()) + list(empty.values()):
            os.close(fd)
    out: dict = {}
    for phase, by in samples.items():
        for where, ops in by.items():
            for op, v in ops.items():
                base = samples["baseline"][where][op]
                out.setdefault(phase, {}).setdefault(where, {})[op] = {
                    "median": statistics.median(v), "min": min(v), "rounds": v,
                    # the round's own base run is the reference: drift between rounds cancels
                    "paired_pct": statistics.median((x - b) / b * 100 for x, b in zip(v, base, strict=True)),
                }
    return out


def stats_pass(loop: str, netns: str, pin_dir: str, container: str, n: int, rounds: int) -> tuple[dict, dict]:
    """With BPF_ENABLE_STATS on: in-kernel ns per program run, and what the operations cost then."""
    before = program_stats(pin_dir)
    samples: dict[str, list[float]] = {}
    stats_fd = bpfsys.bpf(32, bpfsys._attr("=I", 0))  # BPF_ENABLE_STATS(BPF_STATS_RUN_TIME)
    try:
        for _ in range(rounds):
            for op, ns in measure(loop, netns, container, n).items():
                samples.setdefault(op, []).append(ns)
    finally:
        os.close(stats_fd)
    after = program_stats(pin_dir)
    per_run = {}
    for prog, st in after.items():
        runs = st["runs"] - before.get(prog, {}).get("runs", 0)
        ns = st["run_ns"] - before.get(prog, {}).get("run_ns", 0)
        per_run[prog] = {"runs": runs, "avg_ns": round(ns / runs, 1) if runs else None}
    return per_run, {op: statistics.median(v) for op, v in samples.items()}


def program_stats(pin_dir: str) -> dict[str, dict]:
    """run_cnt and run_time_ns of every pinned program (counted while BPF stats are on)."""
    out = {}
    for name in sorted(os.listdir(pin_dir)):
        if not (name.startswith("prog_") or name.startswith("link_lsm_")):
            continue
        fd = bpfsys.obj_get(os.path.join(pin_dir, name))
        try:
            if name.startswith("link_lsm_"):
                info = ctypes.create_string_buffer(64)
                bpfsys.bpf(bpfsys.OBJ_GET_INFO_BY_FD, bpfsys._attr("=IIQ", fd, 64, ctypes.addressof(info)))
                os.close(fd)
                fd = bpfsys.prog_fd_by_id(int.from_bytes(info.raw[8:12], "little"))
            info = ctypes.create_string_buffer(256)
            bpfsys.bpf(bpfsys.OBJ_GET_INFO_BY_FD, bpfsys._attr("=IIQ", fd, 256, ctypes.addressof(info)))
            # struct bpf_prog_info: run_time_ns at 192, run_cnt at 200
            run_ns = int.from_bytes(info.raw[192:200], "little")
            runs = int.from_bytes(info.raw[200:208], "little")
        finally:
            os.close(fd)
        short = name.removeprefix("prog_stk_").removeprefix("link_lsm_")
        out[short] = {"runs": runs, "run_ns": run_ns}
    return out


def install_times(pin_dir: str, cgid: int, policy, count: int = 200) -> list[float]:
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        maps.install_policy(cgid, "bench", policy, pin_dir=pin_dir)
        times.append(time.perf_counter() - t0)
        maps.remove_policy(cgid, pin_dir)
    return times


def run(iterations: int, rounds: int) -> dict:
    tag = f"stockade-bench-{uuid.uuid4().hex[:6]}"
    unified = "/sys/fs/cgroup"
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        unified = "/sys/fs/cgroup/unified"
    root = os.path.join(unified, tag)
    container = os.path.join(root, "ctr")
    state = tempfile.mkdtemp(prefix="stockade-bench-")
    env = dict(os.environ, STOCKADE_BPF_PIN_DIR=f"/sys/fs/bpf/{tag}", STOCKADE_BPF_CGROUP_ROOT=root,
               STOCKADE_AGENT_STATE=f"{state}/agent.json", STOCKADE_EVENTS_FILE=f"{state}/events.jsonl",
               STOCKADE_BPF_CACHE=f"{state}/cache")
    pin_dir = env["STOCKADE_BPF_PIN_DIR"]
    os.makedirs(container)
    result: dict = {"kernel": platform.release(), "iterations": iterations, "rounds": rounds}
    try:
        loaded = subprocess.run([PYTHON, "-m", "stockade.bpf.agent", "--load-only"], env=env,
                                capture_output=True, text=True, check=True)
        report = json.loads(loaded.stdout)
        result["lsm"] = report["lsm"]
        result["lsm_reason"] = report["lsm_reason"]
        result["layers"] = sorted(maps.loaded_layers(pin_dir))
        name = "default" if report["lsm"] else "network-only"
        policy = compile_policy(load_policy(name))
        # an egress allow-list: the benchmark's own traffic passes after a rule matched
        if not report["lsm"]:
            policy = compile_policy(parse_policy(
                "name: bench\nkernel: {sysctl_write: deny}\nnetwork:\n  raw_sockets: deny\n"
                "  egress: {default: deny, rules: [{to: 127.0.0.0/8, action: allow},"
                " {to: 169.254.169.254/32, action: deny}]}\n"))
        result["policy"] = name if report["lsm"] else "bench (network-only + loopback allow-list)"
        cgid = os.stat(container).st_ino
        times = sorted(install_times(pin_dir, cgid, policy))
        result["install_us"] = {"median": times[len(times) // 2] * 1e6,
                                "p99": times[int(len(times) * .99)] * 1e6}
        maps.install_policy(cgid, "bench", policy, pin_dir=pin_dir)
        loop = build_loop(state)
        netns = make_netns(tag)
        result["phases"] = compare(loop, netns, pin_dir, root, container, iterations, rounds)
        maps.attach_egress(container, pin_dir)  # the statistics cover the egress programs too
        result["program_stats"], result["with_stats"] = stats_pass(loop, netns, pin_dir, container,
                                                                   iterations, max(1, rounds // 3))
        maps.detach_egress(container, pin_dir)
        maps.remove_policy(cgid, pin_dir)
        result["map_memlock_bytes"] = map_memory(pin_dir)
    finally:
        subprocess.run([PYTHON, "-m", "stockade.bpf.agent", "--stop"], env=env, capture_output=True)
        if os.path.exists(f"/run/netns/{tag}"):
            subprocess.run(["ip", "netns", "del", tag], check=False)
        for path in (container, root):
            if os.path.isdir(path):
                os.rmdir(path)
        shutil.rmtree(state, ignore_errors=True)
    return result


def table(result: dict) -> str:
    where = "BPF-LSM + cgroup-BPF" if result.get("lsm") else "cgroup-BPF only (BPF-LSM not loadable here)"
    ph = result["phases"]
    lines = [f"kernel {result['kernel']}, {where}; layers: {', '.join(result.get('layers', []))}",
             f"policy: {result.get('policy')}",
             f"ns per operation, C loop, median of {result['rounds']} rounds; base = no Stockade BPF, "
             "empty = allow-only programs at the same hooks; Δ% = median of per-round differences",
             "no-egress = only the parent's programs (no container needs the egress ones)",
             f"{'operation':<28}{'where':<9}{'base':>9}{'empty':>9}{'with BPF':>10}{'Δ ns':>8}"
             f"{'empty Δ%':>10}{'BPF Δ%':>9}{'no-egress Δ%':>14}"]
    for op in ph["baseline"]["inside"]:
        for where_ in ("inside", "outside"):
            base = ph["baseline"][where_][op]["median"]
            empty = ph["empty"][where_][op]
            bpf = ph["with_bpf"][where_][op]
            lines.append(f"{op:<28}{where_:<9}{base:>9.0f}{empty['median']:>9.0f}{bpf['median']:>10.0f}"
                         f"{bpf['median'] - base:>8.0f}{empty['paired_pct']:>9.1f}%"
                         f"{bpf['paired_pct']:>8.1f}%{ph['no_egress'][where_][op]['paired_pct']:>13.1f}%")
    lines.append(f"policy install: median {result['install_us']['median']:.0f} µs, "
                 f"p99 {result['install_us']['p99']:.0f} µs")
    lines.append("with BPF_ENABLE_STATS on (inside; the statistics add their own cost to every run):")
    for op, ns in result.get("with_stats", {}).items():
        base = ph["baseline"]["inside"][op]["median"]
        lines.append(f"  {op:<28}{ns:>9.0f} ns  ({(ns - base) / base * 100:+.1f}% against base)")
    lines.append("in-kernel cost per program run (BPF_ENABLE_STATS):")
    for prog, st in result.get("program_stats", {}).items():
        if st["runs"]:
            lines.append(f"  {prog:<24}{st['runs']:>10} runs {st['avg_ns']:>8} ns/run")
    mem = result["map_memlock_bytes"]
    lines.append("map memlock: " + ", ".join(f"{k} {v // 1024} KiB" for k, v in mem.items())
                 + f" (total {sum(mem.values()) // 1024} KiB)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", help="also write the raw result here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bpf_overhead: needs root", file=sys.stderr)
        return 2
    result = run(args.iterations, args.rounds)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
