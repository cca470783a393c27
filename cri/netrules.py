"""Tenant network rules as plain data: tenant policy files in, one nftables ruleset (libnftables
JSON) out. Nothing here touches the kernel; network.py applies what `ruleset` returns in one
transaction, so a rebuild from state is atomic and idempotent.

A tenant policy, <policy_dir>/<tenant>.yaml:

    egress:                       # what the tenant's pods may reach beyond the tenant
      - cidr: 203.0.113.0/24
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
# What every tenant network refuses its pods whatever their policy: link-local (the metadata
# address) and all of IPv6 (pods have IPv4 only). Containers are told (runtime/bpfpolicy.py), so a
# policy whose egress denials lie inside needs no egress programs on their cgroups.
REFUSED_ALWAYS = (str(LINK_LOCAL), "::/0")
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


@dataclass
class Tenant:
    name: str
    subnet: str  # its pods' addresses: a subnet (bridge), or (cni) pod addresses joined by ","
    policy: Policy = field(default_factory=Policy)
    dns: list[str] = field(default_factory=list)  # resolvers its pods were given
    narrowed: list[tuple[str, str, list[Egress]]] = field(default_factory=list)  # (pod ip, pod id, egress)


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
        if not inner.subnet_of(cidr):
            raise SpecError(f"except {inner} is not inside {cidr}", where=doc.where(item))
        out.exceptions.append(str(inner))
    if "ports" in rule:
        out.ports = [ports(doc, item, "a port") for item in doc.seq(rule["ports"], "ports")]
    if "protocol" in rule:
        out.protocols = [doc.choice(rule["protocol"], PROTOCOLS, "protocol")]
    return out


def _network(doc: YamlDoc, node) -> ipaddress.IPv4Network:  # noqa: ANN001 - a YAML node
    text = doc.string(node, "a CIDR")
    try:
        return ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise SpecError(f"{text!r} is not an IPv4 CIDR: {exc}", where=doc.where(node),
                        hint="e.g. 10.0.0.0/8, host bits zero") from None


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
    net, big = ipaddress.IPv4Network(rule.cidr), ipaddress.IPv4Network(outer.cidr)
    holes = [ipaddress.IPv4Network(x) for x in rule.exceptions]
    for hole in (ipaddress.IPv4Network(x) for x in outer.exceptions):
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
    hint = 'e.g. "10.0.0.10:53/udp" or "10.0.0.0/24:8000-8100/tcp"'
    try:
        addr, _, rest = item.rpartition(":")
        span, _, proto = rest.partition("/")
        lo, _, hi = span.partition("-")
        net = ipaddress.IPv4Network(addr)
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise SpecError(f"node_allow entry {item!r} does not parse", where=where, hint=hint) from None
    if proto not in PROTOCOLS or not 0 < low <= high <= 65535:
        raise SpecError(f"node_allow entry {item!r}: protocol or ports", where=where, hint=hint)
    return str(net), low, high, proto


# -- the ruleset -------------------------------------------------------------------------------

def ruleset(tenants: list[Tenant], pod_cidr: str, node_allows: list[str], hostports: list[HostPort],
            backend: str = "bridge") -> list:
    """libnftables JSON commands that replace the Stockade table with one built from state.
    BACKEND "bridge": a tenant's traffic is known by the bridge it comes from; "cni": all pods
    share the conflist's bridge, so by its source address (which br_netfilter shows the forward
    hook for bridged packets too)."""
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
        from_pods = [_match("meta", "iifname", BRIDGE_PREFIX + "*")]
    else:  # the node's own address on the CNI bridge is in pod_cidr too: not over lo
        from_pods = [_match("payload", ("ip", "saddr"), _prefix(pod_cidr)),
                     _match("meta", "iifname", "lo", op="!=")]

    def of_tenant(t: Tenant) -> dict:
        if backend == "bridge":
            return _match("meta", "iifname", bridge_name(t.name))
        return _match("payload", ("ip", "saddr"), _members(t.subnet))

    chain("pod_egress")
    chain("pod_to_node")
    chain("forward", type="filter", hook="forward", prio=-1, policy="accept")
    rule("forward", _match("ct", "state", ["established", "related"]), {"accept": None})
    for t in tenants:  # a tenant's own traffic, should br_netfilter show bridged packets here
        own = _match("payload", ("ip", "saddr"), _members(t.subnet))
        rule("forward", own, _match("payload", ("ip", "daddr"), _members(t.subnet)), {"accept": None})
    rule("forward", *from_pods, {"jump": {"target": "pod_egress"}})
    chain("input", type="filter", hook="input", prio=-1, policy="accept")
    rule("input", _match("ct", "state", ["established", "related"]), {"accept": None})
    rule("input", *from_pods, {"jump": {"target": "pod_to_node"}})
    for item in node_allows:
        net, lo, hi, proto = node_allow(item, "pod_network.node_allow")
        rule("pod_to_node", _daddr(net), *_l4(proto, lo, hi), {"accept": None}, comment="node_allow")
    for t in tenants:
        tchain = f"tenant_{bridge_name(t.name)[len(BRIDGE_PREFIX):]}"
        for _, pod_id, egress in t.narrowed:  # before the tenant's chain, which jumps to them
            chain(f"pod_{pod_id[:10]}")
            _egress_rules(lambda *e, comment="", c=f"pod_{pod_id[:10]}": rule(c, *e, comment=comment), egress)
            _deny(lambda *e, comment="", c=f"pod_{pod_id[:10]}": rule(c, *e, comment=comment), t.name,
                  comment="pod egress default deny")
        chain(tchain)
        rule("pod_egress", of_tenant(t), {"jump": {"target": tchain}},
             comment=t.name)  # doctor names the tenant chains by it
        _tenant_rules(t, tenants, pod_cidr, lambda *e, comment="", c=tchain: rule(c, *e, comment=comment))
        for server in t.dns:  # the resolvers kubelet gave its pods, wherever they are
            for proto in ("udp", "tcp"):
                rule("pod_to_node", of_tenant(t), _daddr(server),
                     *_l4(proto, 53, 53), {"accept": None}, comment=f"dns {t.name}")
    _untracked_loopback(chain, rule, hostports)
    for name, why in (("pod_egress", "from no known tenant"), ("pod_to_node", "pod to node")):
        _deny(lambda *e, comment="", c=name: rule(c, *e, comment=comment), "-", comment=why)
    _nat(cmds, chain, rule, pod_cidr, hostports if backend == "bridge" else [])  # cni: portmap's DNAT
    return cmds


def port_guard(ports: list[tuple[str, str]]) -> list:
    """libnftables JSON commands that replace the `bridge stockade` table: every frame a pod
    sends into its bridge carries its own address (IPv4 with its source, ARP claiming it) or is
    dropped, before any bridging or routing. PORTS: (the node's end of the pod's link, its IPv4
    address). Without it a pod could take another's address: a sibling's, to leave its own
    narrowed egress, or (one CNI bridge for all) another tenant's, whose rules go by source."""
    table = {"family": "bridge", "name": TABLE}
    cmds: list = [{"add": {"table": table}}, {"delete": {"table": table}}, {"add": {"table": table}}]
    cmds.append({"add": {"chain": {"family": "bridge", "table": TABLE, "name": "pods", "type": "filter",
                                   "hook": "prerouting", "prio": -200, "policy": "accept"}}})

    def rule(*expr: dict, comment: str) -> None:
        body = {"family": "bridge", "table": TABLE, "chain": "pods", "comment": comment,
                "expr": [*expr, {"counter": None}, {"drop": None}]}
        cmds.append({"add": {"rule": body}})

    for port, ip in sorted(ports):
        on = _match("meta", "iifname", port)
        rule(on, _match("payload", ("ip", "saddr"), ip, op="!="), comment=f"{port}: not its address")
        rule(on, _match("payload", ("arp", "saddr ip"), ip, op="!="), comment=f"{port}: ARP for another")
        rule(on, _match("payload", ("ether", "type"), {"set": ["ip", "arp"]}, op="!="),
             comment=f"{port}: neither IPv4 nor ARP")
    return cmds


def _tenant_rules(t: Tenant, tenants: list[Tenant], pod_cidr: str, rule) -> None:  # noqa: ANN001
    accept = {"accept": None}
    rule(_match("payload", ("ip", "daddr"), _members(t.subnet)), accept, comment="own tenant")
    for server in t.dns:  # as addressed: a Service address kube-proxy rewrote, a node-local cache
        original = {"ct": {"key": "ip daddr", "dir": "original"}}
        for proto in ("udp", "tcp"):
            rule({"match": {"op": "==", "left": original, "right": server}}, *_l4(proto, 53, 53), accept,
                 comment="dns")
    _deny(rule, t.name, _daddr(str(LINK_LOCAL)), comment="link-local, metadata")
    for other in tenants:
        if other.name != t.name and t.name in other.policy.ingress_from:
            rule(_match("payload", ("ip", "daddr"), _members(other.subnet)), accept,
                 comment=f"{other.name} admits {t.name}")
    _deny(rule, t.name, _daddr(pod_cidr), comment="other tenants")
    for ip, pod_id, _ in t.narrowed:
        rule(_match("payload", ("ip", "saddr"), ip), {"jump": {"target": f"pod_{pod_id[:10]}"}},
             comment=f"pod {pod_id[:12]}")
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
        outside = [_match("payload", ("ip", "daddr"), _prefix(x), op="!=") for x in e.exceptions]
        for proto in e.protocols:
            for lo, hi in e.ports or [(0, 65535)]:
                rule(_daddr(e.cidr), *outside, *_l4(proto, lo, hi), {"accept": None}, comment=f"egress[{i}]")


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


def _nat(cmds: list, chain, rule, pod_cidr: str, hostports: list[HostPort]) -> None:  # noqa: ANN001
    chain("postrouting", type="nat", hook="postrouting", prio=100, policy="accept")
    rule("postrouting", _match("payload", ("ip", "saddr"), _prefix(pod_cidr)),
         _match("payload", ("ip", "daddr"), _prefix(pod_cidr), op="!="), {"masquerade": None},
         comment="pods out")
    # a hostPort reached from the node's own 127.0.0.1 leaves with that source: make it the bridge's
    rule("postrouting", _match("payload", ("ip", "saddr"), _prefix("127.0.0.0/8")),
         _match("payload", ("ip", "daddr"), _prefix(pod_cidr)), {"masquerade": None}, comment="hostport lo")
    if not hostports:
        return
    chain("prerouting", type="nat", hook="prerouting", prio=-100, policy="accept")
    chain("output", type="nat", hook="output", prio=-100, policy="accept")
    for hp in hostports:
        where = [_match("payload", ("ip", "daddr"), hp.host_ip)] if hp.host_ip else [
            _match("fib", "daddr", "local")]
        dnat = {"dnat": {"family": "ip", "addr": hp.pod_ip, "port": hp.container_port}}
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


def _prefix(cidr: str) -> object:
    net = ipaddress.IPv4Network(cidr)
    if net.prefixlen == 32:
        return str(net.network_address)
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _members(addresses: str) -> object:
    """A subnet, one address, or an anonymous set of addresses/prefixes (comma-separated)."""
    parts = [a for a in addresses.split(",") if a]
    if len(parts) == 1:
        return _prefix(parts[0])
    return {"set": [_prefix(a) for a in parts]}


def _daddr(cidr: str) -> dict:
    return _match("payload", ("ip", "daddr"), _prefix(cidr))


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
