"""Glue between a container and the BPF layer: which policy, whether the host can enforce it.

The policy is named by the annotation `io.stockade.bpf-policy` (stockade run sets it from the
profile). The maps are updated with plain bpf(2) calls on the agent's pinned maps: no bcc here.
"""

from __future__ import annotations

from typing import Any

from .errors import NotSupported
from .state import State

POLICY_ANNOTATION = "io.stockade.bpf-policy"


def install(state: State, spec: Any, cgroup: Any, *, allow_degraded: bool) -> bool:
    """Install the container's policy; returns True when map entries were written."""
    name = (spec.annotations or {}).get(POLICY_ANNOTATION)
    if not name:
        return False
    if not state.cgroup_id:
        raise NotSupported(
            "BPF policies key on the container's cgroup v2 id, and this host has no cgroup2 mount",
            where=f"annotation {POLICY_ANNOTATION}",
            hint="mount cgroup2 (see `stockade doctor`)",
        )
    from stockade.bpf import maps, policy

    pol = policy.load_policy(name)
    missing = sorted(maps.missing_layers(policy.requirements(pol)))
    if missing and not allow_degraded:
        raise NotSupported(
            f"BPF policy {name!r} needs {', '.join(missing)}, which this host cannot enforce now",
            where=f"annotation {POLICY_ANNOTATION}",
            hint="start `stockade agent`, see `stockade doctor`, or opt in with --allow-degraded",
        )
    state.degraded = [f"bpf:{layer}" for layer in missing]
    maps.install_policy(state.cgroup_id, state.id, policy.compile_policy(pol))
    state.bpf_policy = name
    return True


def remove(state: State) -> None:
    from stockade.bpf import maps

    maps.remove_policy(state.cgroup_id)
