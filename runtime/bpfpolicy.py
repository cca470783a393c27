"""Glue between a container and the BPF layer: which policy, and whether the host enforces it.

The policy is named by the annotation `io.stockade.bpf-policy` (stockade run sets it from the
profile). Installing it is a few map updates with plain bpf(2) calls on the agent's pinned maps:
no bcc and, on a warm cache, no YAML on the start path. A layer the policy needs but the host
cannot enforce (BPF-LSM here, or no agent at all) refuses the container unless the operator
opted in with --allow-degraded; the missing layers are then written into the container's state
and printed, never dropped in silence.
"""

from __future__ import annotations

import sys

from .errors import NotSupported
from .state import State

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

POLICY_ANNOTATION = "io.stockade.bpf-policy"
# What the container's network namespace (joined by path) refuses on its way out, as CIDRs
# separated by commas: the CRI server says so for its pods' networks. Written by whoever writes
# the spec, like the policy's own name; egress programs are left off only where it covers them.
NETWORK_REFUSES_ANNOTATION = "io.stockade.network-refuses"


def install(
    state: State, spec: Any, *, allow_degraded: bool, warn: Callable[[str], None] | None = None,
    cgroup_dir: str | None = None,
) -> bool:
    """Install the container's policy; True when map entries were written (remove() undoes them).

    Called once the init has finished its own setup (mounts, sysctls) and waits on the exec
    fifo: the policy then binds everything from the workload's first instruction on, and a
    policy that denies mounts cannot break the runtime's own set-up.
    """
    name = (spec.annotations or {}).get(POLICY_ANNOTATION)
    if not name:
        return False
    from stockade.bpf import maps, policy

    compiled, required = policy.load_compiled(name)
    missing = sorted(maps.missing_layers(required))
    if not state.cgroup_id:
        missing = sorted(required)
    elif cgroup_dir and not maps.covers(cgroup_dir):
        # Below no parent the programs know, neither they nor the LSM ever look at this container:
        # every layer is missing for it, whatever the agent provides to others.
        missing = sorted(required)
    if missing and not allow_degraded:
        fix = "start `stockade agent`" if not maps.agent_running() else "see `stockade doctor` (BPF-LSM)"
        raise NotSupported(
            f"BPF policy {name!r} needs {', '.join(missing)}, which this host does not enforce now",
            where=f"annotation {POLICY_ANNOTATION}",
            hint=f"{fix}, or opt in with --allow-degraded (reported in the container's state)",
        )
    state.bpf_policy = name
    if missing:
        state.degraded = [f"bpf:{layer}" for layer in missing]
        message = f"{state.id}: running without {', '.join(state.degraded)} (--allow-degraded)"
        if warn is not None:  # the caller's warning channel: the --log file under a shim or conmon
            warn(message)
        else:
            print(f"stockade: warning: {message}", file=sys.stderr)
    if not state.cgroup_id or not maps.agent_running():
        return False
    maps.install_policy(
        state.cgroup_id, state.id, compiled, tenant=state.annotations.get("io.stockade.tenant", "")
    )
    if "cgroup_sock_addr" in required and cgroup_dir and "cgroup_sock_addr" not in missing:
        refused = _refused_by_network(spec)
        if refused is not None and policy.egress_covered(compiled, refused):
            state.egress = "network"
        else:
            maps.attach_egress(cgroup_dir)
            state.egress = "cgroup"
    return True


def _refused_by_network(spec: Any) -> list[str] | None:
    """What the container's network namespace refuses beyond its own loopback, or None when
    unknown: the node's namespace (shared), a namespace joined by path that nobody vouches for,
    or a new one that hooks (run on the host) may wire up."""
    ns = spec.linux.namespace("network") if spec.linux else None
    if ns is None:
        return None
    if ns.path:
        said = (spec.annotations or {}).get(NETWORK_REFUSES_ANNOTATION)
        return [c.strip() for c in said.split(",") if c.strip()] if said else None
    hooks = spec.hooks
    if any((hooks.prestart, hooks.create_runtime, hooks.create_container, hooks.poststart)):
        return None
    return ["0.0.0.0/0", "::/0"]  # a new namespace with nothing but loopback


def remove(state: State) -> None:
    from stockade.bpf import maps

    if state.cgroup_id and maps.agent_running():
        maps.remove_policy(state.cgroup_id)
