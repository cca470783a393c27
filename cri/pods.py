"""Pod sandboxes as a library: plain data in (PodSpec), records on disk, kernel objects made and
removed in order. No gRPC here: runtime_service converts messages to and from these records.

    <state_dir>/pods/<id>/pod.json      the record (written atomically; state "creating" first)
    <state_dir>/pods/<id>/ns/<type>     pinned namespaces (nspin)
    <state_dir>/pods/<id>/hostname, hosts, resolv.conf    bind-mounted into the pod's containers

A pod that does not share a PID namespace has no process: its network, IPC and UTS namespaces
(and user namespace, when its handler uses one) are pinned files. A record still "creating"
when the server starts belongs to a RunPodSandbox the server did not finish (it was killed):
`reconcile` removes what it made.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from stockade.runtime._lite.dataclasses import asdict, dataclass, field
from stockade.runtime.errors import ContainerError, SpecError, StockadeError
from stockade.runtime.files import write_atomic
from stockade.runtime.sandbox import tenant_range
from stockade.runtime.spec import IDMapping, sysctl_namespace
from stockade.runtime.state import process_alive, process_start_time, remove_tree

from . import nspin
from .errors import AlreadyExists
from .records import Records

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .config import Config
    from .forker import Forker
    from .network import Network, PodNet

log = logging.getLogger("stockade.cri")
READY, NOT_READY, CREATING = "ready", "notready", "creating"
KEEPER = "stockade-pod"  # a child of a pod's own cgroup that holds it while containers come and go
NODE, POD, CONTAINER = "node", "pod", "container"  # namespace modes, as the CRI names them


@dataclass
class PodSpec:
    """What RunPodSandbox asks for."""

    name: str
    namespace: str
    uid: str
    attempt: int = 0
    handler: str = ""
    hostname: str = ""
    log_directory: str = ""
    cgroup_parent: str = ""
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    dns_servers: list[str] = field(default_factory=list)
    dns_searches: list[str] = field(default_factory=list)
    dns_options: list[str] = field(default_factory=list)
    network_mode: str = POD  # NODE: the host's network
    ipc_mode: str = POD
    pid_mode: str = CONTAINER
    sysctls: dict = field(default_factory=dict)
    privileged: bool = False
    # userns_options: "" (none sent), "node" (the handler decides) or "pod" with kubelet's mappings,
    # each [container id, host id, length]
    port_mappings: list = field(default_factory=list)  # [host_port, container_port, protocol, host_ip]
    userns_mode: str = ""
    userns_uids: list = field(default_factory=list)
    userns_gids: list = field(default_factory=list)
    # pod-level limits: resources plus the RuntimeClass overhead (0: none)
    memory_limit: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpu_shares: int = 0


@dataclass
class Pod:
    id: str
    spec: dict  # the PodSpec, as asked
    handler: str
    tenant: str
    state: str = CREATING
    created_at: int = 0  # ns since the epoch
    cgroup_parent: str = ""
    uid_map: list[int] = field(default_factory=list)  # [host id of root, size]; [] : no user namespace
    namespaces: dict = field(default_factory=dict)  # OCI type -> pinned path
    init_pid: int = 0  # PID 1 of the pod's PID namespace, when its containers share one
    init_start: int = 0  # its start time (a reused pid is not it)
    own_cgroup: bool = False  # its cgroup was made here (with the pod's limits), not by kubelet
    ip: str = ""  # its address (network = "bridge")
    ip6: str = ""  # and its IPv6 one (dual-stack)

    def pod_spec(self) -> PodSpec:
        return PodSpec(**self.spec)


class Pods:
    """The pods of one server: records under STATE_DIR/pods, one lock for changes."""

    def __init__(self, config: Config, forker: Forker | None = None, network: Network | None = None) -> None:
        self.config, self.forker, self.network = config, forker, network
        self.records = Records(os.path.join(config.state_dir, "pods"), "pod.json", Pod, "pod sandbox",
                               "pod_sandbox_id")
        self.lock = threading.RLock()

    # -- lifecycle

    def run(self, spec: PodSpec) -> Pod:
        handler = self.config.handler(spec.handler)
        _check(spec, handler)
        with self.lock:
            for other in self.list():
                s = other.pod_spec()
                if (s.name, s.namespace, s.uid, s.attempt) == _identity(spec):
                    raise AlreadyExists(f"pod {spec.namespace}/{spec.name} (uid {spec.uid}, attempt "
                                        f"{spec.attempt}) exists as {other.id}", where="metadata",
                                        hint="remove it first, or raise metadata.attempt")
            pod = Pod(id=os.urandom(32).hex(), spec=asdict(spec), handler=handler.name,
                      tenant=self._tenant(spec), created_at=time.time_ns())
            os.mkdir(self.dir(pod.id), 0o711)
            self.records.save(pod)  # "creating": what follows is undone by reconcile if we die
        try:
            self._make(pod, spec, handler.user_namespace)
        except BaseException:
            self.remove(pod.id)
            raise
        pod.state = READY
        self.records.save(pod)
        return pod

    def stop(self, pod_id: str) -> None:
        """The pod's network goes (its address is reclaimed, as the CRI asks of StopPodSandbox)
        and it is NOTREADY; stopping again is fine (kubelet retries)."""
        with self.lock:
            pod = self.find(pod_id)
            if pod is None:
                return
            if pod.ip and self.network is not None:
                self.network.detach(self.pod_net(pod))
                pod.ip = pod.ip6 = ""
                self.records.save(pod)
            if pod.state == NOT_READY:
                return
            self._end_init(pod)
            pod.state = NOT_READY
            self.records.save(pod)

    def remove(self, pod_id: str) -> None:
        """Everything the pod made, then its record; an unknown pod is removed already."""
        with self.lock:
            pod = self.find(pod_id)
            if pod is None:
                return
            try:
                self._end_init(pod)
                if self.network is not None and pod.pod_spec().network_mode != NODE:
                    self.network.detach(self.pod_net(pod))  # before its namespace can go
                if pod.own_cgroup:
                    _remove_cgroup(pod.cgroup_parent)
            finally:  # the namespaces go whatever failed; the record stays for kubelet's retry
                nspin.unpin(_pins(self.dir(pod.id)))  # also those of a killed RunPodSandbox
            remove_tree(self.dir(pod.id))

    def reconcile(self) -> list[str]:
        """At start: finish what a killed server left. Returns the ids of pods removed."""
        removed = []
        for pod in self.list():
            if pod.state == CREATING:
                self.remove(pod.id)
                removed.append(pod.id)
            elif pod.state == READY and (not all(_is_pinned(p) for p in pod.namespaces.values()) or (
                    pod.init_pid and not process_alive(pod.init_pid, pod.init_start))):
                pod.state = NOT_READY  # its namespaces (or the init holding its PIDs) did not survive
                self.records.save(pod)
        return removed

    # -- networks

    def pod_net(self, pod: Pod) -> PodNet:
        from .network import PodNet

        spec = pod.pod_spec()
        return PodNet(id=pod.id, tenant=pod.tenant, netns=pod.namespaces.get("network", ""),
                      dns=list(spec.dns_servers), hostports=list(spec.port_mappings), ip=pod.ip, ip6=pod.ip6,
                      annotations=dict(spec.annotations),
                      k8s={"K8S_POD_NAMESPACE": spec.namespace, "K8S_POD_NAME": spec.name,
                           "K8S_POD_UID": spec.uid})

    def by_address(self, ip: str) -> tuple[str, str]:
        """(pod id, tenant) of the pod with address IP, ("", "") for none."""
        found = next((p for p in self.list() if ip and ip in (p.ip, p.ip6)), None)
        return (found.id, found.tenant) if found else ("", "")

    def nets(self) -> list[PodNet]:
        """Every pod with a network of its own (what Network rebuilds its rules from)."""
        return [self.pod_net(p) for p in self.list() if "network" in p.namespaces and p.state != CREATING]

    # -- lookups

    def netns_of(self, ref: str) -> str:
        """The network namespace a ready pod's ports are in (the server's own for hostNetwork)."""
        pod = self.get(ref)
        if pod.state != READY:
            raise ContainerError(f"pod {pod.id[:12]} is not ready", where="pod_sandbox_id")
        return pod.namespaces.get("network") or f"/proc/{os.getpid()}/ns/net"

    def dir(self, pod_id: str) -> str:
        return self.records.dir(pod_id)

    def find(self, ref: str) -> Pod | None:
        return self.records.find(ref)

    def get(self, ref: str) -> Pod:
        return self.records.get(ref)

    def list(self) -> list[Pod]:
        return self.records.all()

    # -- steps

    def _make(self, pod: Pod, spec: PodSpec, userns: bool) -> None:
        base = self.dir(pod.id)
        kinds = ["uts"]
        if spec.network_mode != NODE:
            kinds.append("network")
        if spec.ipc_mode != NODE:
            kinds.append("ipc")
        maps = None
        if spec.userns_mode == POD:  # kubelet chose this pod's ids (hostUsers: false)
            userns = True
        if userns:
            host, size = tenant_range(pod.tenant) if spec.userns_mode != POD else spec.userns_uids[0][1:]
            pod.uid_map = [host, size]
            maps = [IDMapping(container_id=0, host_id=host, size=size)]
            kinds.insert(0, "user")
        pod.namespaces = nspin.pin(os.path.join(base, "ns"), kinds, hostname=spec.hostname or spec.name[:63],
                                   sysctls=spec.sysctls, maps=maps, forker=self.forker)
        if self.network is not None and spec.network_mode != NODE:
            net = self.pod_net(pod)
            self.records.save(pod)  # the namespaces are pinned: a killed server's reconcile finds them
            pod.ip, pod.ip6 = self.network.attach(net)
        if spec.pid_mode == POD:
            self._share_pids(pod, base)
        own = f"{self.config.cgroup_parent}/{pod.tenant}/pod-{pod.id[:12]}"
        pod.cgroup_parent = spec.cgroup_parent or own
        if spec.cgroup_parent:
            _govern(spec.cgroup_parent, self.config.cgroup_parent)
        if not spec.cgroup_parent and _limited(spec):
            self._pod_cgroup(pod, spec)  # kubelet makes and limits the ones it names itself
        self._files(base, spec)

    def _pod_cgroup(self, pod: Pod, spec: PodSpec) -> None:
        """The pod's own cgroup with its limits (resources + overhead); its containers' cgroups
        go below it, so the limit holds for all of them together."""
        from stockade.runtime.cgroups import open_driver
        from stockade.runtime.resources import Resources

        res: dict = {}
        if spec.memory_limit:
            res["memory"] = {"limit": spec.memory_limit}
        cpu = {k: v for k, v in (("quota", spec.cpu_quota), ("period", spec.cpu_period),
                                 ("shares", spec.cpu_shares)) if v}
        if cpu:
            res["cpu"] = cpu
        cgroup = open_driver().create(pod.cgroup_parent, Resources.from_oci(res, where="linux.resources"))
        pod.own_cgroup = True
        self.records.save(pod)
        for directory in set(cgroup.hierarchy_dirs().values()):
            # The runtime removes empty cgroups below "stockade" when a container goes; a child that
            # never holds a process keeps the pod's (and its limits) until the pod goes.
            os.mkdir(os.path.join(directory, KEEPER))

    def _share_pids(self, pod: Pod, base: str) -> None:
        """A PID namespace for the pod's containers, held by catatonit as its PID 1 (as the pause
        container holds it for containerd and CRI-O); pinned with the others."""
        import shutil

        init = shutil.which("catatonit") or "/usr/bin/catatonit"
        joins = {k: v for k, v in pod.namespaces.items() if k in ("user", "network", "ipc", "uts")}
        pod.init_pid = nspin.start_init(joins, [init, "-P"], self.forker)
        pod.init_start = process_start_time(pod.init_pid)
        self.records.save(pod)  # a removal from here on knows the init to end
        pod.namespaces["pid"] = nspin.pin_of(pod.init_pid, "pid", os.path.join(base, "ns"))

    def _end_init(self, pod: Pod) -> None:
        """Kill the pod's PID 1: every process of its PID namespace goes with it."""
        if pod.init_pid and process_alive(pod.init_pid, pod.init_start):
            os.kill(pod.init_pid, signal.SIGKILL)

    def _files(self, base: str, spec: PodSpec) -> None:
        hostname = spec.hostname or spec.name[:63]
        write_atomic(os.path.join(base, "hostname"), hostname + "\n", mode=0o644)
        write_atomic(os.path.join(base, "hosts"), f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
                     f"127.0.1.1\t{hostname}\n", mode=0o644)
        lines = [f"nameserver {s}" for s in spec.dns_servers]
        if spec.dns_searches:
            lines.append("search " + " ".join(spec.dns_searches))
        if spec.dns_options:
            lines.append("options " + " ".join(spec.dns_options))
        write_atomic(os.path.join(base, "resolv.conf"), "".join(f"{line}\n" for line in lines), mode=0o644)

    def _tenant(self, spec: PodSpec) -> str:
        key = self.config.tenant_annotation
        return (spec.annotations.get(key) if key else None) or spec.namespace


def _check(spec: PodSpec, handler: object) -> None:
    for key in ("name", "namespace", "uid"):
        if not getattr(spec, key):
            raise SpecError(f"metadata.{key} is empty", where=f"config.metadata.{key}",
                            hint="kubelet always sends name, namespace and uid")
    tenant_ok = spec.namespace.replace("-", "").isalnum() and spec.namespace == spec.namespace.lower()
    if not tenant_ok:
        raise SpecError(f"namespace {spec.namespace!r} is not a Kubernetes namespace name",
                        where="config.metadata.namespace", hint="lowercase letters, digits and '-'")
    host = [k for k, mode in (("network", spec.network_mode), ("ipc", spec.ipc_mode), ("pid", spec.pid_mode))
            if mode == NODE]
    if host and not getattr(handler, "host_namespaces", False):
        raise SpecError(f"the host's {', '.join(host)} namespace is not allowed by handler "
                        f"{getattr(handler, 'name', '')!r}", where="linux.security_context.namespace_options",
                        hint="use a handler with host_namespaces = true")
    _check_userns(spec)
    if spec.privileged and not getattr(handler, "privileged", False):
        raise SpecError(f"privileged pods are refused by handler {getattr(handler, 'name', '')!r}",
                        where="linux.security_context.privileged")
    for key in spec.sysctls:
        kind = sysctl_namespace(key)
        if kind is None or (kind == "network" and spec.network_mode == NODE) or (
                kind == "ipc" and spec.ipc_mode == NODE):
            raise SpecError(f"sysctl {key} would change the node, not the pod", where=f"linux.sysctls.{key}",
                            hint="only namespaced sysctls (net.*, kernel.shm*, kernel.msg*, fs.mqueue.*)")


def _check_userns(spec: PodSpec) -> None:
    where = "linux.security_context.namespace_options.userns_options"
    if spec.userns_mode in ("", NODE):
        return
    if spec.userns_mode != POD:
        raise SpecError(f"user namespace mode {spec.userns_mode!r} is not supported", where=f"{where}.mode",
                        hint="POD (kubelet's hostUsers: false) or NODE")
    uids, gids = spec.userns_uids, spec.userns_gids
    if len(uids) != 1 or len(gids) != 1:
        raise SpecError("a pod's user namespace takes exactly one uid and one gid mapping", where=where,
                        hint="kubelet sends one of each")
    if uids != gids or uids[0][0] != 0 or uids[0][2] < 1:
        raise SpecError("the uid and gid mappings must be the same range, starting at container id 0",
                        where=where, hint="map container ids 0..length-1")


def _govern(cgroup_parent: str, own_parent: str) -> None:
    """Have the BPF programs govern below the cgroup kubelet puts its pods in: they are attached
    at the server's own parent, and a container below /kubepods would run unconfined. Failing
    here is not the pod's end: a container whose policy then lacks layers is refused at create,
    with the reason, unless its handler allows degraded layers."""
    from stockade.bpf import attach, maps

    parts = [p for p in cgroup_parent.split("/") if p]
    if not maps.agent_running() or parts[:1] == [p for p in own_parent.split("/") if p][:1]:
        return
    top = next((i + 1 for i, part in enumerate(parts) if part.startswith("kubepods")), max(len(parts) - 1, 1))
    try:
        if attach.add_parent(maps.PIN_DIR, os.path.join(attach.unified_mount(), *parts[:top])):
            log.info("BPF programs now govern below %s too", "/".join(parts[:top]))
    except (StockadeError, OSError) as e:
        log.warning("BPF programs cannot govern below %s: %s", "/".join(parts[:top]), e)


def _remove_cgroup(path: str) -> None:
    from stockade.runtime.cgroups import open_driver
    from stockade.runtime.errors import StockadeError

    try:
        cgroup = open_driver().open(path)
    except StockadeError:
        return  # gone already
    for directory in set(cgroup.hierarchy_dirs().values()):
        try:
            os.rmdir(os.path.join(directory, KEEPER))
        except FileNotFoundError:
            pass
    cgroup.destroy()


def _limited(spec: PodSpec) -> bool:
    return bool(spec.memory_limit or spec.cpu_quota or spec.cpu_shares)


def _identity(spec: PodSpec) -> tuple[str, str, str, int]:
    return spec.name, spec.namespace, spec.uid, spec.attempt


def _pins(base: str) -> list[str]:
    ns = os.path.join(base, "ns")
    try:
        return [os.path.join(ns, n) for n in os.listdir(ns)]
    except FileNotFoundError:
        return []


def _is_pinned(path: str) -> bool:
    from stockade.runtime.mountinfo import read

    return any(m.point == path for m in read())

