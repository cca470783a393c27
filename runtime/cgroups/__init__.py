"""Stockade cgroups: one slice per container.

`open_driver()` picks the v2 driver (cgroup2 files, v2.py) when /sys/fs/cgroup is cgroup2, else the v1
driver (cgroupspy, v1.py) which also mirrors the cgroup into the hybrid unified tree for BPF cgroup ids.
Both drivers return Cgroup objects with the same methods (see `Cgroup` below).
Importing this package is cheap: cgroupspy is imported only inside v1 calls that touch files.
"""

from __future__ import annotations

import os

from ..errors import SpecError
from ..resources import DeviceRule, Resources

DEFAULT_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "stockade"


TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:  # the two shapes every driver provides
    from typing import Protocol

    class Cgroup(Protocol):
        path: str
        device_rules: list[DeviceRule]  # effective device rules (deny-all, spec rules, defaults)
        devices_enforced: bool  # False on v2: the caller must attach the cgroup-device BPF program

        def procs_files(self) -> list[str]: ...
        def hierarchy_dirs(self) -> dict[str, str]: ...
        def add(self, pid: int) -> None: ...
        def update(self, resources: Resources) -> None: ...
        def freeze(self) -> None: ...
        def thaw(self) -> None: ...
        def frozen(self) -> bool: ...
        def pids(self) -> list[int]: ...
        def kill(self, sig: int = 9) -> None: ...
        def stats(self) -> dict: ...
        def oom_kills(self) -> int: ...
        def unified_id(self) -> int: ...
        def unified_path(self) -> str: ...
        def destroy(self) -> None: ...

    class Driver(Protocol):
        name: str

        def controllers(self) -> list[str]: ...
        def create(self, path: str, resources: Resources | None) -> Cgroup: ...
        def open(self, path: str) -> Cgroup: ...


def is_cgroup2(root: str) -> bool:
    """cgroup.controllers exists only at the root of a cgroup2 mount (cheaper than statfs)."""
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


_drivers: dict[str, Driver] = {}


def open_driver(root: str = DEFAULT_ROOT) -> Driver:
    """The driver for the hierarchies mounted at `root`, looked up once per process (a command
    opens it for create, wait and delete; the v1 driver parses /proc/self/mountinfo)."""
    if root not in _drivers:
        _drivers[root] = _new_driver(root)
    return _drivers[root]


def _new_driver(root: str) -> Driver:
    if is_cgroup2(root):
        from . import v2

        return v2.Driver(root)
    from . import v1

    return v1.Driver(root)


def resolve_path(cgroups_path: str | None, container_id: str) -> str:
    """OCI linux.cgroupsPath -> path relative to each hierarchy root.

    Unset -> "stockade/<id>". Absolute and relative paths are both taken relative to the hierarchy
    root (Stockade does not nest containers under its own cgroup). The systemd "slice:prefix:name"
    form, which containerd sends for a pod cgroup parent ending in ".slice" even with the cgroupfs
    driver, is one directory name, as runc's cgroupfs driver takes it (Stockade has no systemd
    driver).
    """
    where = "linux.cgroupsPath"
    if not container_id or "/" in container_id or container_id in (".", ".."):
        raise SpecError(f"invalid container id {container_id!r} for a cgroup name", where="container id")
    if cgroups_path is None or cgroups_path == "":
        return f"{DEFAULT_PARENT}/{container_id}"
    if not isinstance(cgroups_path, str):
        raise SpecError(f"must be a string, got {type(cgroups_path).__name__}", where=where)
    parts = [p for p in cgroups_path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise SpecError(
            f"{cgroups_path!r} escapes the cgroup hierarchy with '..'",
            where=where,
            hint="use a path below the hierarchy root without '..'",
        )
    if not parts:
        raise SpecError(
            f"{cgroups_path!r} names the hierarchy root",
            where=where,
            hint="a container needs its own cgroup, e.g. /stockade/<id>",
        )
    if any("\0" in p or "\n" in p for p in parts):
        raise SpecError(f"invalid character in {cgroups_path!r}", where=where)
    return "/".join(parts)


def describe_host(root: str = DEFAULT_ROOT) -> dict:
    """For `stockade doctor`: cgroup mode, the driver Stockade will use, controllers per hierarchy.

    {"mode": "v2"|"hybrid"|"v1", "driver": "v2"|"v1", "unified_mount": path or None,
     "controllers": {mount point: [controller, ...]}} (the unified mount lists its cgroup2 controllers).
    """
    from . import v1

    if is_cgroup2(root):
        controllers = open(os.path.join(root, "cgroup.controllers")).read().split()
        return {"mode": "v2", "driver": "v2", "unified_mount": root, "controllers": {root: controllers}}
    mounts, unified = v1.mounts(root)
    per_hierarchy: dict[str, list[str]] = {}
    for controller, point in sorted(mounts.items()):
        per_hierarchy.setdefault(point, []).append(controller)
    if unified is not None:
        per_hierarchy[unified] = open(os.path.join(unified, "cgroup.controllers")).read().split()
    return {
        "mode": "hybrid" if unified else "v1",
        "driver": "v1" if mounts else "none",
        "unified_mount": unified,
        "controllers": per_hierarchy,
    }
