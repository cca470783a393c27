"""Pod networking in the kernel (`network = "bridge"`): a bridge per tenant with the tenant's
gateway address, a veth per pod (eth0 inside, its node end on the tenant's bridge), addresses
from ipam, and the nftables ruleset netrules builds, rebuilt in one transaction whenever a pod
comes or goes and at every start. All in the server's own network namespace, with pyroute2 and
libnftables in this process: no command is run per pod.

A bridge per tenant rather than one bridge with per-tenant rules: traffic between tenants is
routed by the node, where the inet forward hook sees it, so segmentation needs no bridge-family
rules and no br_netfilter; a tenant's own traffic stays on its bridge (bench/README.md).

Dual-stack (pod_cidr6): each pod also gets the IPv6 twin of its IPv4 address (ipam.py), the
bridge the twin of its gateway; addresses are `nodad` (the node hands them out: nobody else may
hold them, and a pod must not wait a second to be reachable), and the port guard stops a pod
from claiming another's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from stockade.runtime._lite.dataclasses import dataclass, field
from stockade.runtime.errors import NotSupported, SpecError, StockadeError

from . import netrules, nspin
from .ipam import Ipam

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Config

log = logging.getLogger("stockade.cri")
IFA_F_NODAD = 0x02  # linux/if_addr.h


class NetworkError(StockadeError):
    """The kernel refused a step of a pod's network (the step and its errno say which)."""


@dataclass
class PodNet:
    """What the network needs to know about a pod (pods.Pod carries it)."""

    id: str
    tenant: str
    netns: str  # the pinned network namespace
    dns: list[str] = field(default_factory=list)
    hostports: list[list] = field(default_factory=list)  # [host_port, container_port, protocol, host_ip]
    ip: str = ""
    ip6: str = ""  # dual-stack
    annotations: dict = field(default_factory=dict)
    k8s: dict = field(default_factory=dict)  # K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_UID (CNI_ARGS)


class Network:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.ipam = Ipam(os.path.join(config.state_dir, "network"), config.net.pod_cidr,
                         config.net.tenant_prefix, config.net.pod_cidr6)
        self.lock = threading.RLock()
        self.ready, self.reason = False, "not started"
        self.policies: dict[str, netrules.Policy] = {}  # the last good one of each tenant
        self.bridges: set[str] = set()  # made and addressed by this process (no netlink round trips)
        self._ipr = None
        self._nft = None
        self.cni = None
        if config.network == "cni":
            from .cni import CNI

            self.cni = CNI(config.net.cni_conf_dir, config.net.cni_bin_dir,
                           os.path.join(config.state_dir, "network", "cni"))

    def ipr(self):  # noqa: ANN201 - a pyroute2 IPRoute
        """One netlink socket of the server's namespace, used under self.lock."""
        if self._ipr is None:
            from pyroute2 import IPRoute

            self._ipr = IPRoute()
        return self._ipr

    # -- lifecycle

    def start(self, pods: Callable[[], list[PodNet]]) -> None:
        """At server start: forwarding on, leftovers of pods that are gone removed, the rules
        rebuilt from the pods that are."""
        self.pods = pods
        if self.cni is None:
            _refuse_overlap(self.ipr(), self.ipam)
        _forwarding(self.ipam.net6 is not None)
        with self.lock:
            broken = []
            for tenant in {p.tenant for p in pods()}:
                try:
                    self.policies[tenant] = netrules.load_policy(self.config.net.policy_dir, tenant)
                except StockadeError as exc:  # its pods keep the defaults: the strictest there is
                    broken.append(str(exc))
            alive = {p.id for p in pods()}
            if self.cni is not None:
                broken += self._check(pods())
            for pod_id in {owner for owner in self.ipam.leases().values()} - alive:
                self.ipam.release(pod_id)
            for tenant in set(self.ipam.tenants()) - {p.tenant for p in pods()}:
                self.ipam.release_tenant(tenant)
            ipr, ours = self.ipr(), {netrules.veth_name(i) for i in alive}
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                if name.startswith(netrules.VETH_PREFIX) and name not in ours:
                    ipr.link("del", index=link["index"])
            self._rebuild()
        self.ready, self.reason = not broken, "; ".join(broken)

    def set_pod_cidr(self, cidr: str, cidr6: str = "") -> None:
        """kubelet's podCIDRs (UpdateRuntimeConfig: IPv4, and IPv6 for a dual-stack node), taken
        while no tenant has a subnet yet: the addresses already handed out decide otherwise
        (logged). Without an IPv6 one the configured pod_cidr6 stays."""
        with self.lock:
            cidr6 = cidr6 or self.config.net.pod_cidr6
            if (cidr, cidr6) == (str(self.ipam.net), str(self.ipam.net6 or "")):
                return
            if self.ipam.tenants():
                log.warning("pod CIDR %s from kubelet not taken: pods use %s", cidr, self.ipam.net)
                return
            ipam = Ipam(os.path.join(self.config.state_dir, "network"), cidr, self.config.net.tenant_prefix,
                        cidr6)
            _refuse_overlap(self.ipr(), ipam)
            _forwarding(ipam.net6 is not None)
            self.ipam, self.config.net.pod_cidr, self.config.net.pod_cidr6 = ipam, cidr, cidr6
            self._rebuild()
            log.info("pod addresses now come from %s", " and ".join(filter(None, (cidr, cidr6))))

    def attach(self, pod: PodNet) -> tuple[str, str]:
        """The pod's eth0, addresses and default routes; its tenant's bridge and rules. Undone
        entirely when a step fails. Returns (IPv4 address, IPv6 address or "")."""
        with self.lock:
            # read whenever a pod of the tenant comes: a file that does not parse fails this pod
            # (naming file and line), not the tenants' pods already running
            policy = netrules.load_policy(self.config.net.policy_dir, pod.tenant)
            netrules.pod_egress(pod.annotations, policy)  # refused before anything is made
            self.policies[pod.tenant] = policy
            if self.cni is not None:
                return self._attach_cni(pod)
            try:
                address, gateway = self.ipam.lease(pod.tenant, pod.id)
                pod.ip = str(address.ip)
                addresses = [(address.with_prefixlen, str(gateway))]
                if self.ipam.net6 is not None:
                    pod.ip6 = str(self.ipam.six(address.ip))
                    length = self.ipam.prefix6()
                    addresses.append((f"{pod.ip6}/{length}", str(self.ipam.six(gateway))))
                bridge = self._bridge(pod.tenant, [f"{gw}/{a.split('/')[1]}" for a, gw in addresses])
                self._veth(pod, bridge, addresses)
                self._rebuild(extra=pod)
            except BaseException:
                self.detach(pod)
                raise
        return pod.ip, pod.ip6

    def detach(self, pod: PodNet) -> None:
        """Everything attach made for the pod; what is already gone is fine (kubelet retries)."""
        with self.lock:
            if self.cni is not None:
                self.cni.delete(pod.id, pod.netns, _cni_args(pod), _port_mappings(pod))
                self._rebuild(without=pod.id)
                return
            ipr = self.ipr()
            found = ipr.link_lookup(ifname=netrules.veth_name(pod.id))
            if found:
                ipr.link("del", index=found[0])
            self.ipam.release(pod.id)
            others = [p for p in self._live() if p.id != pod.id]
            if not any(p.tenant == pod.tenant for p in others):
                self._drop_bridge(pod.tenant)
                self.ipam.release_tenant(pod.tenant)  # a namespace that comes and goes takes none for good
            self._rebuild(live=others)

    # -- steps

    def _attach_cni(self, pod: PodNet) -> str:
        from .cni import address_of

        try:
            result = self.cni.add(pod.id, pod.netns, _cni_args(pod), _port_mappings(pod))
            pod.ip, pod.ip6 = address_of(result), address_of(result, 6)
            if not pod.ip:
                raise NetworkError("the CNI result has no IPv4 address", where=self.cni.conf["_path"])
            if pod.ip6 and self.ipam.net6 is None:  # the tenant rules could not hold for its IPv6 traffic
                raise NotSupported(f"the CNI result has the IPv6 address {pod.ip6}, pod_cidr6 is not set",
                                   where=self.cni.conf["_path"], hint="pod_network.pod_cidr6: their range")
            self._rebuild(extra=pod)
        except BaseException:
            self.detach(pod)
            raise
        return pod.ip, pod.ip6

    def _check(self, pods: list[PodNet]) -> list[str]:
        """CHECK for every pod with a cached result: what fails is reported, not undone."""
        failed = []
        for pod in pods:
            if self.cni.cached(pod.id) is not None:
                try:
                    self.cni.check(pod.id, pod.netns, _cni_args(pod), _port_mappings(pod))
                except StockadeError as exc:
                    failed.append(f"pod {pod.id[:12]}: {exc}")
        return failed

    def _bridge(self, tenant: str, gateways: list[str]) -> str:
        name = netrules.bridge_name(tenant)
        if name in self.bridges:
            return name
        ipr = self.ipr()
        if not ipr.link_lookup(ifname=name):
            ipr.link("add", ifname=name, kind="bridge")
        index = ipr.link_lookup(ifname=name)[0]
        if len(gateways) > 1:  # its link-local address at once: it speaks for the routed addresses
            _sysctl(f"net/ipv6/conf/{name}/accept_dad", "0")
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
        for gateway in gateways:
            address, prefix = gateway.split("/")
            if address not in have:
                ipr.addr("add", index=index, address=address, prefixlen=int(prefix), flags=IFA_F_NODAD)
        ipr.link("set", index=index, state="up")
        _sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")  # hostPorts reached from 127.0.0.1
        self.bridges.add(name)
        return name

    def _drop_bridge(self, tenant: str) -> None:
        name = netrules.bridge_name(tenant)
        self.bridges.discard(name)
        ipr = self.ipr()
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])

    def _veth(self, pod: PodNet, bridge: str, addresses: list[tuple[str, str]]) -> None:
        """The pair is made with its pod end already in the pod's namespace, named eth0: no
        move and no rename (each a round trip the kernel makes slow). ADDRESSES: (the pod's
        address/length, its gateway), IPv4 first."""
        host = netrules.veth_name(pod.id)
        netns = os.open(pod.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ipr = self.ipr()
            ipr.link("add", ifname=host, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns},
                     master=_index(ipr, bridge), state="up")
            with _iproute(netns) as inside:
                index = _index(inside, "eth0")
                for address, _ in addresses:
                    ip, prefix = address.split("/")
                    inside.addr("add", index=index, address=ip, prefixlen=int(prefix), flags=IFA_F_NODAD)
                inside.link("set", index=index, state="up")
                for address, gateway in addresses:
                    inside.route("add", dst="::/0" if ":" in address else "0.0.0.0/0", gateway=gateway)
        finally:
            os.close(netns)

    def _live(self) -> list[PodNet]:
        return [p for p in self.pods() if p.ip]

    def _rebuild(self, extra: PodNet | None = None, without: str = "",
                 live: list[PodNet] | None = None) -> None:
        """LIVE: the pods with addresses, when the caller has just read them (one read of records)."""
        live = self._live() if live is None else live
        pods = [p for p in live if p.id != without and (extra is None or p.id != extra.id)]
        pods += [extra] if extra is not None else []
        subnets = self.ipam.tenants() if self.cni is None else {}
        tenants = [self._tenant(name, [p for p in pods if p.tenant == name], subnets)
                   for name in sorted({p.tenant for p in pods})]
        hostports = [netrules.HostPort(hp[0], p.ip, hp[1], hp[2], hp[3], p.ip6)
                     for p in pods for hp in p.hostports]
        if self._nft is None:
            import nftables

            self._nft = nftables.Nftables()  # freeing one costs more than a rebuild: keep it
        cidrs = [str(net) for net in (self.ipam.net, self.ipam.net6) if net is not None]
        commands = netrules.ruleset(tenants, cidrs, self.config.net.node_allow, hostports,
                                    "cni" if self.cni is not None else "bridge")
        apply(commands + netrules.port_guard(self._ports(pods)), self._nft)

    def _tenant(self, name: str, ours: list[PodNet], subnets: dict) -> netrules.Tenant:
        """The tenant NAME as the rules see it, from its pods OURS (SUBNETS: ipam's, bridge)."""
        policy = self.policies.get(name) or netrules.Policy()
        narrowed = []
        for p in ours:
            try:
                egress = netrules.pod_egress(p.annotations, policy)
            except StockadeError:  # the tenant's policy shrank below it: the pod gets nothing
                egress = []
            if egress is not None:
                narrowed.append(([ip for ip in (p.ip, p.ip6) if ip], p.id, egress))
        if self.cni is None:
            members = str(subnets[name])
            members6 = str(self.ipam.subnet6(subnets[name])) if self.ipam.net6 is not None else ""
        else:
            members, members6 = ",".join(p.ip for p in ours), ",".join(p.ip6 for p in ours if p.ip6)
        dns = sorted({s for p in ours for s in p.dns if ":" not in s or p.ip6})
        return netrules.Tenant(name, members, policy, dns, narrowed, members6)

    def _ports(self, pods: list[PodNet]) -> list[netrules.Port]:
        """The node's end of each pod's link, with the pod's addresses."""
        if self.cni is None:
            return [netrules.Port(netrules.veth_name(p.id), p.ip, p.ip6) for p in pods]
        from .cni import host_interface

        found = [netrules.Port(host_interface(self.cni.cached(p.id) or {}, self.cni.conf), p.ip, p.ip6)
                 for p in pods]
        return [port for port in found if port.name]


def apply(commands: list, nft=None) -> None:  # noqa: ANN001 - a libnftables context
    """One libnftables transaction: all of it or nothing."""
    if nft is None:
        import nftables

        nft = nftables.Nftables()
    rc, _, err = nft.json_cmd({"nftables": [{"metainfo": {"json_schema_version": 1}}, *commands]})
    if rc != 0:
        raise NetworkError(f"nftables refused the ruleset: {err.strip()}",
                           where=f"table inet {netrules.TABLE}")


def remove_rules() -> None:
    tables = [{"family": family, "name": netrules.TABLE} for family in ("inet", "bridge")]
    apply([{verb: {"table": t}} for t in tables for verb in ("add", "delete")])


def _iproute(netns_fd: int):  # noqa: ANN202 - a pyroute2 IPRoute
    """IPRoute on a netlink socket of NETNS_FD's network namespace (the server's own is
    Network.ipr())."""
    from pyroute2 import IPRoute

    try:
        sock = nspin.socket_in(netns_fd, socket.AF_NETLINK, socket.SOCK_DGRAM)
    except OSError as exc:
        raise NetworkError(f"cannot enter the pod's network namespace: {exc}", where="netns") from None
    return IPRoute(use_socket=sock)


def _cni_args(pod: PodNet) -> dict:
    return {"IgnoreUnknown": "1", **pod.k8s, "K8S_POD_INFRA_CONTAINER_ID": pod.id}


def _port_mappings(pod: PodNet) -> list[dict]:
    return [{"hostPort": port, "containerPort": target, "protocol": proto, **({"hostIP": ip} if ip else {})}
            for port, target, proto, ip in pod.hostports]


def _index(ipr, name: str) -> int:  # noqa: ANN001 - a pyroute2 IPRoute
    """A link's index by one RTM_GETLINK for the name (link_lookup dumps every link)."""
    return ipr.link("get", ifname=name)[0]["index"]


def _refuse_overlap(ipr, ipam: Ipam) -> None:  # noqa: ANN001 - an IPRoute
    """Pod addresses must not shadow the node's own (a route to them would go to the pods)."""
    import ipaddress

    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    for addr in ipr.get_addr():
        name, ip = names.get(addr["index"], "?"), addr.get_attr("IFA_ADDRESS")
        net = ipaddress.ip_network(f"{ip}/{addr['prefixlen']}", strict=False)
        ours = ipam.net if net.version == 4 else ipam.net6
        if ours is None or name.startswith(netrules.BRIDGE_PREFIX) or net.is_loopback or net.is_link_local:
            continue
        if net.overlaps(ours):  # type: ignore[arg-type]
            key = "pod_cidr" if net.version == 4 else "pod_cidr6"
            raise SpecError(f"{key} {ours} overlaps {ip}/{addr['prefixlen']} on {name}",
                            where=f"pod_network.{key}", hint="choose addresses the node does not use")


def _forwarding(dual_stack: bool) -> None:
    """The node routes between tenants and out. IPv6 forwarding also makes the namespace stop
    taking router advertisements on its own links (a router's rule): only where it is asked for."""
    _sysctl("net/ipv4/ip_forward", "1")
    if dual_stack:
        try:
            _sysctl("net/ipv6/conf/all/forwarding", "1")
        except OSError as exc:
            raise SpecError(f"cannot turn on IPv6 forwarding: {exc.strerror}", where="pod_network.pod_cidr6",
                            hint="a kernel with IPv6, or no pod_cidr6") from None


def _sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key}", "w") as f:
        f.write(value)
