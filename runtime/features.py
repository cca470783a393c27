"""`stockade-oci features`: what this runtime supports, in the OCI features JSON format."""

from __future__ import annotations

from typing import Any


def features() -> dict[str, Any]:
    from . import spec

    supported = spec.SUPPORTED
    return {
        "ociVersionMin": supported["ociVersionMin"],
        "ociVersionMax": supported["ociVersionMax"],
        "hooks": supported["hooks"],
        "mountOptions": supported["mountOptions"],
        "linux": {
            "namespaces": sorted(supported["namespaces"]),
            "capabilities": sorted(supported["capabilities"]),
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False, "rdma": False},
            "seccomp": _seccomp(),
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": False}},
        },
        "annotations": {
            "io.stockade.bpf-policy": "name of the BPF policy installed for the container",
            "org.opencontainers.runtime-spec.features.name": "stockade",
        },
    }


def _seccomp() -> dict[str, Any]:
    from .seccomp import supported

    try:
        info = supported()
    except ModuleNotFoundError as exc:  # Debian's python3-seccomp bindings, not ours
        if exc.name != "seccomp":
            raise
        return {"enabled": False}
    return {"enabled": True, **{k: v for k, v in info.items() if k != "known_syscalls"}}
