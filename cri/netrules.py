"""Tenant network rules as plain data: tenant policy files in, one nftables ruleset (libnftables
JSON) out. Nothing here touches the kernel; network.py applies what `ruleset` returns in one
transaction, so a rebuild from state is atomic and idempotent.

A tenant policy, <policy_dir>/<tenant>.yaml:

    egress:                       # what the tenant's pods may reach beyond the tenant
      - cidr: 203.0.113.0/24      # or IPv6 (dual-stack pods), e.g. 2001:db8::/32
        except: [203.0.113.7/32]
        ports: [443, "8000-8100"] # none: every port
        protocol: tcp             # tcp, udp or sctp; none: tcp and udp
    ingress_from: [team-b]        # other tenants whose pods may reach this one's

With no file a tenant gets the defaults: its own pods, replies, DNS to the resolvers its pods
were given, and nothing else; the node reaches every pod (kubelet's probes).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os

from stockade.runtime._lite.dataclasses import dataclass, field
from stockade.runtime.errors import SpecError
from stockade.runtime.yamldoc import YamlDoc, ports

TABLE = "stockade"
BRIDGE_PREFIX = "stkt-"  # one bridge per tenant: stkt-<10 hex of the tenant's hash>
VETH_PREFIX = "stkp-"  # the node's end of a pod's veth: stkp-<10 hex of the pod id>
PROTOCOLS = ("tcp", "udp", "sctp")
EGRESS_ANNOTATION = "io.stockade.network/egress"  # a pod's own egress: within its tenant's, never more
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")  # the cloud metadata address among them
LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")
METADATA6 = ipaddress.IPv6Network("fd00:ec2::254/128")  # the cloud metadata service over IPv6
# What neighbour discovery needs on a pod's link (and MLD, which the kernel sends by itself)
NDP = ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert", "mld-listener-report",
       "mld-listener-done", "mld2-listener-report"]


def refused_always(dual_stack: bool) -> tuple[str, ...]:
    """What every tenant network refuses its pods whatever their policy: link-local (the metadata
    address among them) and, for pods with IPv4 only, all of IPv6. Containers are told
    (runtime/bpfpolicy.py), so a policy whose egress denials lie inside needs no egress programs
    on their cgroups."""
    if dual_stack:
        return (str(LINK_LOCAL), str(LINK_LOCAL6), str(METADATA6))
    return (str(LINK_LOCAL), "::/0")


LOG_GROUP = 2026  # the NFLOG group denials are logged to (netlog.py reads it)
LOG_PREFIX = "stk "  # "stk <tenant> <rule>" ("-": a chain all tenants share)


@dataclass
class Egress:
    cidr: str
    exceptions: list[str] = field(default_factory=list)
    ports: list[tuple[int, int]] = field(default_factory=list)  # empty: every port
    protocols: list[str] = field(default_factory=lambda: ["tcp", "udp"])


@dataclass
class Policy:
    egress: list[Egress] = field(default_factory=list)
    ingress_from: list[str] = field(default_factory=list)


@dataclass
class HostPort:
    host_port: int
    pod_ip: str
    container_port: int
    protocol: str = "tcp"
    host_ip: str = ""  # "": every node address
    pod_ip6: str = ""  # dual-stack: the node's IPv6 addresses lead to it too


@dataclass
class Port:
    """A pod's link as the node sees it: the node's end, the pod's addresses."""

    name: str
    ip: str
    ip6: str = ""


@dataclass
class Tenant:
    name: str
    subnet: str  # its pods' addresses: a subnet (bridge), or (cni) pod addresses joined by ","
    policy: Policy = field(default_factory=Policy)
    dns: list[str] = field(default_factory=list)  # resolvers its pods were given
    narrowed: list[tuple[list[str], str, list[Egress]]] = field(default_factory=list)  # (pod ips, id, egress)
    subnet6: str = ""  # dual-stack: as subnet, IPv6

    def members(self) -> list[str]:
        """Its pods' addresses, one entry per address family."""
        return [m for m in (self.subnet, self.subnet6) if m]


def bridge_name(tenant: str) -> str:
    return BRIDGE_PREFIX + hashlib.sha256(tenant.encode()).hexdigest()[:10]


def veth_name(pod_id: str) -> str:
    return VETH_PREFIX + pod_id[:10]


# -- policy files ------------------------------------------------------------------------------

def parse_policy(text: str, source: str) -> Policy:
    doc = YamlDoc(text, source)
    if doc.root is None:
        return Policy()
    top = doc.mapping(doc.root, {"egress", "ingress_from"}, "the tenant policy")
    policy = Policy()
    for node in doc.seq(top["egress"], "egress") if "egress" in top else []:
        policy.egress.append(_egress(doc, node))
    for node in doc.seq(top["ingress_from"], "ingress_from") if "ingress_from" in top else []:
        policy.ingress_from.append(doc.string(node, "a tenant in ingress_from"))
    return policy


def _egress(doc: YamlDoc, node) -> Egress:  # noqa: ANN001 - a YAML node
    rule = doc.mapping(node, {"cidr", "except", "ports", "protocol"}, "an egress rule")
    if "cidr" not in rule:
        raise SpecError("an egress rule needs a cidr", where=doc.where(node), hint="cidr: 203.0.113.0/24")
    cidr = _network(doc, rule["cidr"])
    out = Egress(str(cidr))
    for item in doc.seq(rule["except"], "except") if "except" in rule else []:
        inner = _network(doc, item)
        if inner.version != cidr.version or not inner.subnet_of(cidr):  # type: ignore[arg-type]
            raise SpecError(f"except {inner} is not inside {cidr}", where=doc.where(item))
        out.exceptions.append(str(inner))
    if "ports" in rule:
        out.ports = [ports(doc, item, "a port") for item in doc.seq(rule["ports"], "ports")]
    if "protocol" in rule:
        out.protocols = [doc.choice(rule["protocol"], PROTOCOLS, "protocol")]
    return out


def _network(doc: YamlDoc, node) -> ipaddress.IPv4Network | ipaddress.IPv6Network:  # noqa: ANN001 - a YAML node
    text = doc.string(node, "a CIDR")
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise SpecError(f"{text!r} is not a CIDR: {exc}", where=doc.where(node),
                        hint="e.g. 10.0.0.0/8 or 2001:db8::/32, host bits zero") from None


def pod_egress(annotations: dict, tenant: Policy) -> list[Egress] | None:
    """The pod's egress rules from its annotation (None without one), each of which must lie
    within one of the tenant's: a pod may narrow its tenant's egress, never widen it."""
    text = annotations.get(EGRESS_ANNOTATION)
    if text is None:
        return None
    where = f"annotation {EGRESS_ANNOTATION}"
    own = parse_policy(f"egress: {text}" if not text.lstrip().startswith("egress") else text, where)
    for i, rule in enumerate(own.egress):
        if not any(_within(rule, t) for t in tenant.egress):
            raise SpecError(f"egress rule {i} ({rule.cidr}) is not within the tenant's policy", where=where,
                            hint="a pod may only narrow its tenant's egress allows")
    return own.egress


def _within(rule: Egress, outer: Egress) -> bool:
    net, big = ipaddress.ip_network(rule.cidr), ipaddress.ip_network(outer.cidr)
    if net.version != big.version:
        return False
    holes = [ipaddress.ip_network(x) for x in rule.exceptions]
    for hole in (ipaddress.ip_network(x) for x in outer.exceptions):
        if hole.overlaps(net) and not any(hole.subnet_of(h) for h in holes):
            return False
    spans = outer.ports or [(0, 65535)]
    return (net.subnet_of(big) and set(rule.protocols) <= set(outer.protocols)
            and all(any(a <= lo and hi <= b for a, b in spans) for lo, hi in rule.ports or [(0, 65535)]))


def load_policy(policy_dir: str, tenant: str) -> Policy:
    """The tenant's policy file, or the defaults when it has none."""
    path = os.path.join(policy_dir, f"{tenant}.yaml")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return Policy()
    return parse_policy(text, path)


def node_allow(item: str, where: str) -> tuple[str, int, int, str]:
    """"ADDR[/LEN]:PORT[-PORT]/PROTO" -> (network, lo, hi, protocol)."""
    hint = 'e.g. "10.0.0.10:53/udp", "10.0.0.0/24:8000-8100/tcp" or "fd00::10:53/udp"'
    try:
        addr, _, rest = item.rpartition(":")
        span, _, proto = rest.partition("/")
        lo, _, hi = span.partition("-")
        net = ipaddress.ip_network(addr)
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise SpecError(f"node_allow entry {item!r} does not parse", where=where, hint=hint) from None
    if proto not in PROTOCOLS or not 0 < low <= high <= 65535:
        raise SpecError(f"node_allow entry {item!r}: protocol or ports", where=where, hint=hint)
    return str(net), low, high, proto


# -- the ruleset -------------------------------------------------------------------------------

def ruleset(tenants: list[Tenant], pod_cidrs: list[str], node_allows: list[str], hostports: list[HostPort],
            backend: str = "bridge") -> list:
    """libnftables JSON commands that replace the Stockade table with one built from state.
    POD_CIDRS: the pods' IPv4 CIDR, and their IPv6 one when dual-stack. BACKEND "bridge": a
    tenant's traffic is known by the bridge it comes from; "cni": all pods share the conflist's
    bridge, so by its source address (which br_netfilter shows the forward hook for bridged
    packets too)."""
    table = {"family": "inet", "name": TABLE}
    cmds: list = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]

    def chain(name: str, **hook: object) -> None:
        cmds.append({"add": {"chain": {"family": "inet", "table": TABLE, "name": name, **hook}}})

    def rule(chain_name: str, *expr: dict, comment: str = "") -> None:
        body = {"family": "inet", "table": TABLE, "chain": chain_name, "expr": list(expr)}
        if comment:
            body["comment"] = comment
        cmds.append({"add": {"rule": body}})

    if backend == "bridge":
        from_pods = [[_match("meta", "iifname", BRIDGE_PREFIX + "*")]]
    else:  # the node's own address on the CNI bridge is in the pod CIDR too: not over lo
        from_pods = [[_addr("saddr", cidr), _match("meta", "iifname", "lo", op="!=")] for cidr in pod_cidrs]

    def of_tenant(t: Tenant) -> list[list[dict]]:
        """Matches for T's traffic, any of which will do."""
        if backend == "bridge":
            return [[_match("meta", "iifname", bridge_name(t.name))]]
        return [[_addr("saddr", m)] for m in t.members()]

    chain("pod_egress")
    chain("pod_to_node")
    chain("forward", type="filter", hook="forward", prio=-1, policy="accept")
    rule("forward", _match("ct", "state", ["established", "related"]), {"accept": None})
    ndp = _match("payload", ("icmpv6", "type"), {"set": NDP})  # link-scope: bridged, never routed
    rule("forward", ndp, {"accept": None}, comment="ndp")
    for t in tenants:  # a tenant's own traffic, should br_netfilter show bridged packets here
        for m in t.members():
            rule("forward", _addr("saddr", m), _addr("daddr", m), {"accept": None})
    for match in from_pods:
        rule("forward", *match, {"jump": {"target": "pod_egress"}})
    chain("input", type="filter", hook="input", prio=-1, policy="accept")
    rule("input", _match("ct", "state", ["established", "related"]), {"accept": None})
    for match in from_pods:
        rule("input", *match, {"jump": {"target": "pod_to_node"}})
    # a pod finds its gateway by neighbour discovery (and the kernel reports its multicast groups)
    rule("pod_to_node", ndp, {"accept": None}, comment="ndp")
    for item in node_allows:
        net, lo, hi, proto = node_allow(item, "pod_network.node_allow")
        rule("pod_to_node", _addr("daddr", net), *_l4(proto, lo, hi), {"accept": None}, comment="node_allow")
    for t in tenants:
        tchain = f"tenant_{bridge_name(t.name)[len(BRIDGE_PREFIX):]}"
        for _, pod_id, egress in t.narrowed:  # before the tenant's chain, which jumps to them
            chain(f"pod_{pod_id[:10]}")
            _egress_rules(lambda *e, comment="", c=f"pod_{pod_id[:10]}": rule(c, *e, comment=comment), egress)
            _deny(lambda *e, comment="", c=f"pod_{pod_id[:10]}": rule(c, *e, comment=comment), t.name,
                  comment="pod egress default deny")
        chain(tchain)
        for match in of_tenant(t):
            rule("pod_egress", *match, {"jump": {"target": tchain}}, comment=t.name)  # doctor's tenant names
        _tenant_rules(t, tenants, pod_cidrs, lambda *e, comment="", c=tchain: rule(c, *e, comment=comment))
        for server in t.dns:  # the resolvers kubelet gave its pods, wherever they are
            for match in of_tenant(t):
                for proto in ("udp", "tcp"):
                    rule("pod_to_node", *match, _addr("daddr", server), *_l4(proto, 53, 53), {"accept": None},
                         comment=f"dns {t.name}")
    _untracked_loopback(chain, rule, hostports)
    for name, why in (("pod_egress", "from no known tenant"), ("pod_to_node", "pod to node")):
        _deny(lambda *e, comment="", c=name: rule(c, *e, comment=comment), "-", comment=why)
    _nat(chain, rule, pod_cidrs, hostports if backend == "bridge" else [])  # cni: portmap's DNAT
    return cmds


def port_guard(ports: list[Port]) -> list:
    """libnftables JSON commands that replace the `bridge stockade` table: every frame a pod
    sends into its bridge carries its own address (IPv4 or IPv6 with its source, ARP or a
    neighbour advertisement claiming it) and is unicast, or is dropped, before any bridging or
    routing. Without it a pod could take another's address: a sibling's, to leave its own
    narrowed egress, or (one CNI bridge for all) another tenant's, whose rules go by source; and
    on a shared bridge its broadcasts, multicasts and link-local packets would reach other
    tenants' pods unrouted. Neighbour discovery, which needs link-local and multicast, passes."""
    table = {"family": "bridge", "name": TABLE}
    cmds: list = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]

    def chain(name: str, **hook: object) -> None:
        cmds.append({"add": {"chain": {"family": "bridge", "table": TABLE, "name": name, **hook}}})

    def add(chain_name: str, *expr: dict, comment: str = "") -> None:
        cmds.append({"add": {"rule": {"family": "bridge", "table": TABLE, "chain": chain_name,
                                      "expr": list(expr), **({"comment": comment} if comment else {})}}})

    chain("pods", type="filter", hook="prerouting", prio=-200, policy="accept")
    ports = sorted(ports, key=lambda p: p.name)
    for port in ports:
        name = port.name
        chain(name)

        def rule(*expr: dict, comment: str, verdict: str = "drop", c: str = name) -> None:
            add(c, *expr, {"counter": None}, {verdict: None}, comment=comment)

        rule(_match("payload", ("ip", "saddr"), port.ip, op="!="), comment=f"{name}: not its address")
        rule(_match("payload", ("ether", "type"), "ip"), _TO_MANY, comment=f"{name}: IPv4 to many")
        rule(_match("payload", ("arp", "saddr ip"), port.ip, op="!="), comment=f"{name}: ARP for another")
        families = ["ip", "arp"]
        if port.ip6:
            families.append("ip6")
            _guard6(rule, name, port.ip6)
        rule(_match("payload", ("ether", "type"), {"set": families}, op="!="),
             comment=f"{name}: {' '.join(families)} only")
    if ports:  # one lookup sends a frame to its port's chain: a pod's frames never meet others' rules
        jumps = [[port.name, {"jump": {"target": port.name}}] for port in ports]
        add("pods", {"vmap": {"key": {"meta": {"key": "iifname"}}, "data": {"set": jumps}}})
    return cmds


def _guard6(rule, name: str, ip6: str) -> None:  # noqa: ANN001
    """A pod's IPv6: its own address, neighbour discovery, and unicast beyond its link. A pod
    may advertise its own address and link-local ones (which nobody routes to, and which only
    neighbour discovery may use)."""
    def target(offset: int, length: int, right: int) -> dict:  # what an advertisement claims
        field = {"payload": {"base": "th", "offset": 64 + offset, "len": length}}
        return {"match": {"op": "!=", "left": field, "right": hex(right)}}

    icmp = ("icmpv6", "type")
    other = [target(0, 128, int(ipaddress.IPv6Address(ip6))), target(0, 10, 0xFE80 >> 6)]
    rule(_match("payload", icmp, "nd-neighbor-advert"), *other, comment=f"{name}: advertises another")
    sources = {"set": ["::", _prefix(str(LINK_LOCAL6)), ip6]}
    rule(_match("payload", ("ip6", "saddr"), sources), _match("payload", icmp, {"set": NDP}),
         comment=f"{name}: ndp", verdict="accept")
    rule(_match("payload", ("ip6", "saddr"), ip6, op="!="), comment=f"{name}: not its address")
    rule(_match("payload", ("ip6", "daddr"), _prefix(str(LINK_LOCAL6))), comment=f"{name}: to link-local")
    rule(_match("payload", ("ether", "type"), "ip6"), _TO_MANY, comment=f"{name}: IPv6 to many")


def _tenant_rules(t: Tenant, tenants: list[Tenant], pod_cidrs: list[str], rule) -> None:  # noqa: ANN001
    accept = {"accept": None}
    for m in t.members():
        rule(_addr("daddr", m), accept, comment="own tenant")
    for server in t.dns:  # as addressed: a Service address kube-proxy rewrote, a node-local cache
        key = "ip6 daddr" if ":" in server else "ip daddr"
        original = {"ct": {"key": key, "dir": "original"}}
        for proto in ("udp", "tcp"):
            rule({"match": {"op": "==", "left": original, "right": server}}, *_l4(proto, 53, 53), accept,
                 comment="dns")
    refused = refused_always(dual_stack=len(pod_cidrs) > 1)
    for cidr in (c for c in refused if c != "::/0"):
        _deny(rule, t.name, _addr("daddr", cidr), comment="link-local, metadata")
    for other in tenants:
        if other.name != t.name and t.name in other.policy.ingress_from:
            for m in other.members():
                rule(_addr("daddr", m), accept, comment=f"{other.name} admits {t.name}")
    for cidr in pod_cidrs:
        _deny(rule, t.name, _addr("daddr", cidr), comment="other tenants")
    for ips, pod_id, _ in t.narrowed:
        for ip in ips:
            rule(_addr("saddr", ip), {"jump": {"target": f"pod_{pod_id[:10]}"}}, comment=f"pod {pod_id[:12]}")
    _egress_rules(rule, t.policy.egress)
    _deny(rule, t.name, comment="egress default deny")


def _deny(rule, tenant: str, *matches: dict, comment: str) -> None:  # noqa: ANN001
    """Count and drop what MATCHES; first log it (20 a second at most) to the NFLOG group
    netlog reads, prefixed "stk <tenant> <rule>" (a log rule of its own: an exhausted limit
    must not skip the drop)."""
    limit = {"limit": {"rate": 20, "per": "second", "burst": 40}}
    prefix = f"{LOG_PREFIX}{tenant[:40]} {comment}"[:63]
    rule(*matches, limit, {"log": {"group": LOG_GROUP, "prefix": prefix}}, comment=f"{comment} (log)")
    rule(*matches, {"counter": None}, {"drop": None}, comment=comment)


def _egress_rules(rule, egress: list[Egress]) -> None:  # noqa: ANN001
    for i, e in enumerate(egress):
        outside = [_addr("daddr", x, op="!=") for x in e.exceptions]
        for proto in e.protocols:
            for lo, hi in e.ports or [(0, 65535)]:
                rule(_addr("daddr", e.cidr), *outside, *_l4(proto, lo, hi), {"accept": None},
                     comment=f"egress[{i}]")


def _untracked_loopback(chain, rule, hostports: list[HostPort]) -> None:  # noqa: ANN001
    """The node's own loopback traffic skips conntrack, which the rules above would otherwise
    switch on for every packet of the node (bench/README.md); hostPorts reached through
    127.0.0.1 stay tracked, or they could not be translated."""
    ports = sorted({hp.host_port for hp in hostports})
    for hook, side in (("output", "oifname"), ("prerouting", "iifname")):
        name = f"raw_{hook}"
        chain(name, type="filter", hook=hook, prio=-300, policy="accept")
        if ports:
            rule(name, _match("meta", side, "lo"), _match("payload", ("th", "dport"), {"set": ports}),
                 {"accept": None}, comment="hostports")
        rule(name, _match("meta", side, "lo"), {"notrack": None}, comment="node loopback")


def _nat(chain, rule, pod_cidrs: list[str], hostports: list[HostPort]) -> None:  # noqa: ANN001
    chain("postrouting", type="nat", hook="postrouting", prio=100, policy="accept")
    for cidr in pod_cidrs:
        rule("postrouting", _addr("saddr", cidr), _addr("daddr", cidr, op="!="), {"masquerade": None},
             comment="pods out")
    # a hostPort reached from the node's own 127.0.0.1 leaves with that source: make it the bridge's
    # (IPv6 has no such path: the kernel never routes ::1 off the node)
    rule("postrouting", _addr("saddr", "127.0.0.0/8"), _addr("daddr", pod_cidrs[0]), {"masquerade": None},
         comment="hostport lo")
    if not hostports:
        return
    chain("prerouting", type="nat", hook="prerouting", prio=-100, policy="accept")
    chain("output", type="nat", hook="output", prio=-100, policy="accept")
    for hp in hostports:
        for family, proto, pod_ip in (("ip", "ipv4", hp.pod_ip), ("ip6", "ipv6", hp.pod_ip6)):
            if not pod_ip or (hp.host_ip and (":" in hp.host_ip) != (family == "ip6")):
                continue
            where = [_addr("daddr", hp.host_ip)] if hp.host_ip else [
                _match("meta", "nfproto", proto), _match("fib", "daddr", "local")]
            dnat = {"dnat": {"family": family, "addr": pod_ip, "port": hp.container_port}}
            for hook in ("prerouting", "output"):
                rule(hook, *where, *_l4(hp.protocol, hp.host_port, hp.host_port), dnat,
                     comment=f"hostport {hp.host_port}/{hp.protocol}")


def _match(kind: str, key: object, right: object, op: str = "==") -> dict:
    if kind == "payload":
        protocol, fieldname = key  # type: ignore[misc]
        left: dict = {"payload": {"protocol": protocol, "field": fieldname}}
    elif kind == "fib":
        left = {"fib": {"flags": [key], "result": "type"}}
    else:
        left = {kind: {"key": key}}
    if kind == "ct":
        op = "in"
    return {"match": {"op": op, "left": left, "right": right}}


_TO_MANY = _match("meta", "pkttype", {"set": ["broadcast", "multicast"]})  # not to one neighbour


def _prefix(cidr: str) -> object:
    net = ipaddress.ip_network(cidr)
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _members(addresses: str) -> object:
    """A subnet, one address, or an anonymous set of addresses/prefixes (comma-separated)."""
    parts = [a for a in addresses.split(",") if a]
    if len(parts) == 1:
        return _prefix(parts[0])
    return {"set": [_prefix(a) for a in parts]}


def _addr(side: str, addresses: str, op: str = "==") -> dict:
    """The packet's SIDE (saddr, daddr) among ADDRESSES (as _members; one family, which says
    whether this is an IPv4 or an IPv6 match)."""
    return _match("payload", ("ip6" if ":" in addresses else "ip", side), _members(addresses), op=op)


def _l4(proto: str, lo: int, hi: int) -> list[dict]:
    if (lo, hi) == (0, 65535):
        return [_match("meta", "l4proto", proto)]
    return [_match("payload", (proto, "dport"), lo if lo == hi else {"range": [lo, hi]})]


def summary(listing: dict) -> dict[str, dict[str, int]]:
    """From `nft -j list table inet stockade`: {tenant: {"rules": n, "denied": packets}} and, as
    "(node)", the pod-to-node chain's."""
    items = listing.get("nftables", [])
    rules = [i["rule"] for i in items if "rule" in i]
    names = {}
    for r in rules:
        jump = next((e["jump"]["target"] for e in r["expr"] if "jump" in e), "")
        if r["chain"] == "pod_egress" and jump.startswith("tenant_"):
            names[jump] = r.get("comment", jump)
    names["pod_to_node"] = "(node)"
    out: dict[str, dict[str, int]] = {}
    for r in rules:
        if r["chain"] not in names:
            continue
        entry = out.setdefault(names[r["chain"]], {"rules": 0, "denied": 0})
        if any("log" in e for e in r["expr"]):
            continue  # the log half of a denial
        entry["rules"] += 1
        if any("drop" in e for e in r["expr"]):
            counters = [e["counter"] or {} for e in r["expr"] if "counter" in e]
            entry["denied"] += sum(c.get("packets", 0) for c in counters)
    return out
