"""What a test may leave behind: nothing. Snapshot kernel objects before, compare after."""

from __future__ import annotations

import os
from pathlib import Path


def snapshot(state_root: Path | None = None) -> dict[str, set[str]]:
    """Stockade-named mounts, cgroups (every hierarchy), state entries and runtime processes."""
    mounts = {
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if "stockade" in line
    }
    cgroups = set()
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        for dirpath, dirnames, _ in os.walk(hierarchy):
            cgroups.update(
                os.path.join(dirpath, d) for d in dirnames if "stockade" in d or "stockade" in dirpath
            )
            if dirpath.count("/") > 8:
                dirnames.clear()
    state = {str(p) for p in state_root.iterdir()} if state_root and state_root.exists() else set()
    return {"mounts": mounts, "cgroups": cgroups, "state": state, "processes": _processes()}


RUNTIME_MARKERS = ("bin/stockade-oci", "bin/stockade run", "stockade.runtime")


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _ours(pid: int) -> bool:
    """Descends from this test process (leaked inits are reparented to it: it is a subreaper)."""
    me = os.getpid()
    while pid > 1:
        pid = _parent(pid)
        if pid == me:
            return True
    return False


def _processes() -> set[str]:
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Runtime processes only: a leaked workload keeps its cgroup, which the cgroup check sees.
        if any(m in cmd for m in RUNTIME_MARKERS) and int(pid) != os.getpid() and _ours(int(pid)):
            out.add(f"{pid} {cmd.strip()}")
    return out


def new_since(before: dict[str, set[str]], state_root: Path | None = None) -> dict[str, set[str]]:
    after = snapshot(state_root)
    return {k: after[k] - before[k] for k in after if after[k] - before[k]}
