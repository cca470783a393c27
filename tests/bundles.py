"""Build OCI bundles for tests from busybox-static (the rootfs) and a `runc spec`-like config.

    bundle = make_bundle(["sh", "-c", "echo hi"])    # a fresh stockade-bundle-* dir in /dev/shm or /tmp
    cfg = default_config(["true"]); cfg["hostname"] = "x"; write_config(bundle, cfg)
    remove_bundle(bundle)

The bundle directory is world-traversable (0755) so a container in a user namespace, whose
root is not host root, can still reach its rootfs.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from stockade.runtime.defaults import MASKED_PATHS, READONLY_PATHS, standard_mounts

BUSYBOX = "/bin/busybox"
DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]

_CONFIG: dict[str, Any] = {
    "ociVersion": "1.2.0",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {"bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "stockade",
    "mounts": standard_mounts(),
    "linux": {
        "namespaces": [
            {"type": "pid"},
            {"type": "network"},
            {"type": "ipc"},
            {"type": "uts"},
            {"type": "mount"},
            {"type": "cgroup"},
        ],
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    },
}


def default_config(args: list[str] | None = None) -> dict[str, Any]:
    """A fresh copy of the default config (runc spec defaults, no terminal, cgroup ns, /tmp tmpfs)."""
    cfg = copy.deepcopy(_CONFIG)
    if args is not None:
        cfg["process"]["args"] = list(args)
    return cfg


def userns_config(args: list[str] | None = None, host_id: int = 100000, size: int = 65536) -> dict[str, Any]:
    cfg = default_config(args)
    cfg["linux"]["namespaces"].append({"type": "user"})
    cfg["linux"]["uidMappings"] = [{"containerID": 0, "hostID": host_id, "size": size}]
    cfg["linux"]["gidMappings"] = [{"containerID": 0, "hostID": host_id, "size": size}]
    return cfg


@functools.cache
def _applets() -> tuple[str, ...]:
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout
    return tuple(name for name in out.split() if name and name != "busybox")


def make_rootfs(rootfs: Path) -> Path:
    """busybox-static with every applet symlinked in /bin, plus /etc/passwd and /etc/group."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "home/user"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    # A copy, not a hard link: a container with a writable rootfs must not change the host's binary.
    shutil.copy2(BUSYBOX, rootfs / "bin/busybox")
    for name in _applets():
        os.symlink("busybox", rootfs / "bin" / name)
    (rootfs / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (rootfs / "etc/group").write_text("root:x:0:\ntty:x:5:\nuser:x:1000:\nnogroup:x:65534:\n")
    os.chown(rootfs / "home/user", 1000, 1000)
    return rootfs


def write_config(bundle: Path, config: dict[str, Any]) -> None:
    (Path(bundle) / "config.json").write_text(json.dumps(config, indent=2))


def make_bundle(
    args: list[str] | None = None, config: dict[str, Any] | None = None, parent: str | None = None
) -> Path:
    """A new bundle directory (rootfs + config.json); remove it with remove_bundle()."""
    bundle = Path(tempfile.mkdtemp(prefix="stockade-bundle-", dir=parent or _fast_tmp()))
    bundle.chmod(0o755)
    make_rootfs(bundle / "rootfs")
    write_config(bundle, config if config is not None else default_config(args))
    return bundle


def _fast_tmp() -> str | None:
    """/dev/shm (tmpfs, not noexec) when there is one: hundreds of symlinks on a busy disk take seconds."""
    try:
        if not os.statvfs("/dev/shm").f_flag & os.ST_NOEXEC and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return None


def remove_bundle(bundle: Path) -> None:
    shutil.rmtree(bundle, ignore_errors=True)
