"""BPF policies: YAML data -> validated Policy -> CompiledPolicy (map entries).

A policy names what a container may do beyond what seccomp can express: files (by host path),
exec, mounts, process relations, kernel interfaces, network (families, egress, bind, unix),
capabilities and device nodes. Every error names the file and line. requirements() tells the
runtime which enforcement layers a policy needs, so it can refuse when a layer is missing.
"""

from __future__ import annotations

import os

from stockade.bpf import cache
from stockade.bpf.abi import (
    ACC_EXEC,
    ACC_READ,
    ACC_WRITE,
    F_DENY_BPF,
    F_DENY_HOST_UNIX,
    F_DENY_MKNOD,
    F_DENY_MODULES,
    F_DENY_MOUNT,
    F_DENY_PERF,
    F_DENY_SYSCTL_WRITE,
    F_DENY_USERNS,
    F_EGRESS_DENY,
    F_EXEC_ALLOWLIST,
    F_KILL_OWN,
    F_NO_EXEC_WRITABLE,
    F_PTRACE_OWN,
    MODE_AUDIT,
    MODE_ENFORCE,
)
from stockade.bpf.maps import CompiledPolicy, FileRule, NetRule
from stockade.runtime._lite.dataclasses import asdict, dataclass, field
from stockade.runtime.errors import SpecError
from stockade.runtime.linux import CAPABILITIES
from stockade.runtime.yamldoc import YamlDoc, ports

# The built-in policies are data of the profiles package, whose folder sits next to this one in
# every layout (checkout, editable or wheel install); found by path, not by importing profiles.
POLICY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles", "policy")

FAMILIES = {
    "unix": 1, "inet": 2, "ax25": 3, "ipx": 4, "appletalk": 5, "netrom": 6, "bridge": 7, "atmpvc": 8,
    "x25": 9, "inet6": 10, "rose": 11, "decnet": 12, "netbeui": 13, "security": 14, "key": 15,
    "netlink": 16, "packet": 17, "ash": 18, "econet": 19, "atmsvc": 20, "rds": 21, "sna": 22,
    "irda": 23, "pppox": 24, "wanpipe": 25, "llc": 26, "ib": 27, "mpls": 28, "can": 29, "tipc": 30,
    "bluetooth": 31, "iucv": 32, "rxrpc": 33, "isdn": 34, "phonet": 35, "ieee802154": 36, "caif": 37,
    "alg": 38, "nfc": 39, "vsock": 40, "kcm": 41, "qipcrtr": 42, "smc": 43, "xdp": 44, "mctp": 45,
}
_ACCESS = {"read": ACC_READ, "write": ACC_WRITE, "exec": ACC_EXEC}
SOCK_RAW, SOCK_PACKET = 3, 10
_ALL_INET = {"inet", "inet6"}


@dataclass
class FileAccessRule:
    path: str
    access: frozenset[str]
    line: int = 0


@dataclass
class EgressRule:
    to: str                 # CIDR
    action: str             # allow | deny
    port_min: int = 0
    port_max: int = 65535
    line: int = 0


@dataclass
class Policy:
    name: str
    source: str = ""
    mode: str = "enforce"                       # enforce | audit
    file_deny: list[FileAccessRule] = field(default_factory=list)
    exec_deny: list[str] = field(default_factory=list)
    exec_allow_only: list[str] | None = None    # None: every path not denied may exec
    exec_from_writable: str = "allow"           # allow | deny
    mount_after_start: str = "allow"
    ptrace: str = "any"                         # any | own (own cgroup subtree only)
    signal: str = "any"
    user_namespaces: str = "allow"
    kernel_modules: str = "allow"
    kernel_bpf: str = "allow"
    kernel_perf_event: str = "allow"
    kernel_sysctl_write: str = "allow"
    families: list[str] | None = None           # None: every family
    raw_sockets: str = "allow"
    egress_default: str = "allow"
    egress_rules: list[EgressRule] = field(default_factory=list)
    bind_ports: tuple[int, int] = (0, 65535)
    unix_host_sockets: str = "allow"
    capability_deny: list[str] = field(default_factory=list)
    device_mknod: str = "allow"


def _abs_path(doc: YamlDoc, node, what: str) -> str:
    path = doc.string(node, what)
    if not path.startswith("/"):
        raise SpecError(f"{what} must be an absolute path, not {path!r}", where=doc.where(node))
    return os.path.normpath(path)


ALLOW_DENY = ("allow", "deny")


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    doc = YamlDoc(text, source)
    if doc.root is None:
        raise SpecError("the policy is empty", where=source)
    top = doc.mapping(doc.root, {"name", "description", "mode", "file", "exec", "mount", "process",
                                 "kernel", "network", "capability", "device"}, "the policy")
    if "name" not in top:
        raise SpecError("the policy needs a 'name'", where=doc.where(doc.root))
    p = Policy(name=doc.string(top["name"], "name"), source=source)
    if "mode" in top:
        p.mode = doc.choice(top["mode"], ("enforce", "audit"), "mode")
    if "file" in top:
        _parse_file(doc, top["file"], p)
    if "exec" in top:
        _parse_exec(doc, top["exec"], p)
    if "mount" in top:
        sec = doc.mapping(top["mount"], {"after_start"}, "mount")
        if "after_start" in sec:
            p.mount_after_start = doc.choice(sec["after_start"], ALLOW_DENY, "mount.after_start")
    if "process" in top:
        sec = doc.mapping(top["process"], {"ptrace", "signal", "user_namespaces"}, "process")
        if "ptrace" in sec:
            p.ptrace = doc.choice(sec["ptrace"], ("any", "own"), "process.ptrace")
        if "signal" in sec:
            p.signal = doc.choice(sec["signal"], ("any", "own"), "process.signal")
        if "user_namespaces" in sec:
            p.user_namespaces = doc.choice(sec["user_namespaces"], ALLOW_DENY, "process.user_namespaces")
    if "kernel" in top:
        sec = doc.mapping(top["kernel"], {"modules", "bpf", "perf_event", "sysctl_write"}, "kernel")
        for key in sec:
            setattr(p, f"kernel_{key}", doc.choice(sec[key], ALLOW_DENY, f"kernel.{key}"))
    if "network" in top:
        _parse_network(doc, top["network"], p)
    if "capability" in top:
        sec = doc.mapping(top["capability"], {"deny"}, "capability")
        denied = doc.seq(sec["deny"], "capability.deny") if "deny" in sec else []
        for node in denied:
            cap = doc.string(node, "capability").upper().removeprefix("CAP_")
            if f"CAP_{cap}" not in CAPABILITIES:
                raise SpecError(f"unknown capability {cap!r}", where=doc.where(node), hint="e.g. SYS_MODULE")
            p.capability_deny.append(cap)
    if "device" in top:
        sec = doc.mapping(top["device"], {"mknod"}, "device")
        if "mknod" in sec:
            p.device_mknod = doc.choice(sec["mknod"], ALLOW_DENY, "device.mknod")
    return p


def _parse_file(doc: YamlDoc, node, p: Policy) -> None:
    sec = doc.mapping(node, {"deny"}, "file")
    for item in doc.seq(sec["deny"], "file.deny") if "deny" in sec else []:
        rule = doc.mapping(item, {"path", "access"}, "a file.deny rule")
        if "path" not in rule:
            raise SpecError("a file.deny rule needs a 'path'", where=doc.where(item))
        access = set()
        for a in doc.seq(rule["access"], "access") if "access" in rule else []:
            name = doc.value(a)
            if name not in _ACCESS:
                raise SpecError(f"access {name!r} must be read, write or exec", where=doc.where(a))
            access.add(name)
        p.file_deny.append(FileAccessRule(_abs_path(doc, rule["path"], "path"),
                                          frozenset(access or _ACCESS), item.start_mark.line + 1))


def _parse_exec(doc: YamlDoc, node, p: Policy) -> None:
    sec = doc.mapping(node, {"deny", "allow_only", "from_writable_mounts"}, "exec")
    if "deny" in sec:
        p.exec_deny = [_abs_path(doc, n, "exec.deny entry") for n in doc.seq(sec["deny"], "exec.deny")]
    if "allow_only" in sec:
        p.exec_allow_only = [_abs_path(doc, n, "exec.allow_only entry")
                             for n in doc.seq(sec["allow_only"], "exec.allow_only")]
    if "from_writable_mounts" in sec:
        p.exec_from_writable = doc.choice(sec["from_writable_mounts"], ALLOW_DENY,
                                          "exec.from_writable_mounts")


def _parse_network(doc: YamlDoc, node, p: Policy) -> None:
    import ipaddress  # lazy, like yaml: the start path reads compiled policies from the cache

    keys = {"families", "raw_sockets", "egress", "bind_ports", "unix_host_sockets"}
    sec = doc.mapping(node, keys, "network")
    if "families" in sec:
        p.families = []
        for n in doc.seq(sec["families"], "network.families"):
            fam = doc.string(n, "family").lower().removeprefix("af_")
            if fam not in FAMILIES:
                raise SpecError(f"unknown socket family {fam!r}", where=doc.where(n),
                                hint="e.g. unix, inet, inet6")
            p.families.append(fam)
    if "raw_sockets" in sec:
        p.raw_sockets = doc.choice(sec["raw_sockets"], ALLOW_DENY, "network.raw_sockets")
    if "unix_host_sockets" in sec:
        p.unix_host_sockets = doc.choice(sec["unix_host_sockets"], ALLOW_DENY, "network.unix_host_sockets")
    if "bind_ports" in sec:
        p.bind_ports = ports(doc, sec["bind_ports"], "network.bind_ports")
    if "egress" in sec:
        eg = doc.mapping(sec["egress"], {"default", "rules"}, "network.egress")
        if "default" in eg:
            p.egress_default = doc.choice(eg["default"], ALLOW_DENY, "network.egress.default")
        seen: dict[str, int] = {}
        for item in doc.seq(eg["rules"], "network.egress.rules") if "rules" in eg else []:
            rule = doc.mapping(item, {"to", "ports", "action"}, "an egress rule")
            for need in ("to", "action"):
                if need not in rule:
                    raise SpecError(f"an egress rule needs '{need}'", where=doc.where(item))
            to = doc.string(rule["to"], "to")
            try:
                net = ipaddress.ip_network(to, strict=False)
            except ValueError:
                raise SpecError(f"{to!r} is not an address or CIDR", where=doc.where(rule["to"])) from None
            if str(net) in seen:
                raise SpecError(f"{net} already has a rule at line {seen[str(net)]}", where=doc.where(item),
                                hint="one rule per network; the longest matching prefix decides")
            seen[str(net)] = item.start_mark.line + 1
            lo, hi = ports(doc, rule["ports"], "ports") if "ports" in rule else (0, 65535)
            p.egress_rules.append(EgressRule(str(net), doc.choice(rule["action"], ALLOW_DENY, "action"),
                                             lo, hi, item.start_mark.line + 1))


def builtin_policies() -> list[str]:
    """Names of the built-in policies (profiles/policy/NAME.yaml)."""
    try:
        return sorted(name[:-5] for name in os.listdir(POLICY_DIR) if name.endswith(".yaml"))
    except OSError:
        return []


def _read(name_or_path: str) -> tuple[str, str]:
    path = name_or_path
    if not (os.path.splitext(name_or_path)[1] in (".yaml", ".yml") or os.sep in name_or_path):
        path = os.path.join(POLICY_DIR, f"{name_or_path}.yaml")
    try:
        with open(path) as f:
            return path, f.read()
    except FileNotFoundError:
        raise SpecError(f"no BPF policy {name_or_path!r}", where=path,
                        hint=f"built-in policies: {', '.join(builtin_policies())}") from None


def load_policy(name_or_path: str) -> Policy:
    """A policy by name (profiles/policy/<name>.yaml) or by path."""
    path, text = _read(name_or_path)
    return parse_policy(text, path)


def load_compiled(name_or_path: str) -> tuple[CompiledPolicy, set[str]]:
    """(compile_policy(p), requirements(p)) for a policy, cached by content: the start path's
    call, which skips YAML parsing (and importing yaml) when the policy file is unchanged."""
    from stockade.runtime._lite import json as jsonlite
    from stockade.runtime._lite.hashlib import sha256

    path, text = _read(name_or_path)
    key = sha256(f"{_FORMAT}\0{path}\0{text}".encode()).hexdigest()[:32]
    cache_file = f"policy-{key}.json"
    try:
        data = jsonlite.loads(cache.read(cache_file))
        compiled = CompiledPolicy(**{k: v for k, v in data["compiled"].items()
                                     if k not in ("net_rules", "file_rules")},
                                  net_rules=tuple(NetRule(**r) for r in data["compiled"]["net_rules"]),
                                  file_rules=tuple(FileRule(**r) for r in data["compiled"]["file_rules"]))
        return compiled, set(data["requirements"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    policy = parse_policy(text, path)
    compiled, needs = compile_policy(policy), requirements(policy)
    # without a cache the next start parses again
    cache.write(cache_file, jsonlite.dumps({"compiled": asdict(compiled), "requirements": sorted(needs)}))
    return compiled, needs


_FORMAT = 1  # bump when CompiledPolicy or the compiler changes meaning


# -- compile ---------------------------------------------------------------------------------

def _deny(value: str) -> bool:
    return value == "deny"


def compile_policy(policy: Policy) -> CompiledPolicy:
    flags = 0
    for cond, bit in (
        (_deny(policy.mount_after_start), F_DENY_MOUNT), (policy.ptrace == "own", F_PTRACE_OWN),
        (policy.signal == "own", F_KILL_OWN), (_deny(policy.user_namespaces), F_DENY_USERNS),
        (_deny(policy.kernel_modules), F_DENY_MODULES), (_deny(policy.kernel_bpf), F_DENY_BPF),
        (_deny(policy.kernel_perf_event), F_DENY_PERF), (_deny(policy.device_mknod), F_DENY_MKNOD),
        (_deny(policy.kernel_sysctl_write), F_DENY_SYSCTL_WRITE),
        (_deny(policy.exec_from_writable), F_NO_EXEC_WRITABLE),
        (_deny(policy.unix_host_sockets), F_DENY_HOST_UNIX), (_deny(policy.egress_default), F_EGRESS_DENY),
        (policy.exec_allow_only is not None, F_EXEC_ALLOWLIST),
    ):
        if cond:
            flags |= bit
    if policy.families is None:
        families = (1 << 64) - 1
    else:
        families = sum(1 << FAMILIES[f] for f in set(policy.families))
    caps = sum(1 << CAPABILITIES[f"CAP_{c}"] for c in set(policy.capability_deny))
    types = (1 << SOCK_RAW) | (1 << SOCK_PACKET) if _deny(policy.raw_sockets) else 0
    files: dict[str, list[int]] = {}
    for rule in policy.file_deny:
        files.setdefault(rule.path, [0, 0])[0] |= sum(_ACCESS[a] for a in rule.access)
    for path in policy.exec_deny:
        files.setdefault(path, [0, 0])[0] |= ACC_EXEC
    for path in policy.exec_allow_only or []:
        files.setdefault(path, [0, 0])[1] |= ACC_EXEC
    return CompiledPolicy(
        name=policy.name, flags=flags, mode=MODE_AUDIT if policy.mode == "audit" else MODE_ENFORCE,
        families=families,
        cap_deny=caps, sock_type_deny=types, bind_port_min=policy.bind_ports[0],
        bind_port_max=policy.bind_ports[1],
        net_rules=tuple(NetRule(r.to, r.action, r.port_min, r.port_max) for r in policy.egress_rules),
        file_rules=tuple(FileRule(path, deny, allow) for path, (deny, allow) in sorted(files.items())),
    )


# A network refuses nothing inside the namespace itself: its loopback is always reachable.
_LOOPBACK = ("127.0.0.0/8", "::1/128", "::ffff:127.0.0.0/104")


def egress_covered(compiled: CompiledPolicy, refused: list[str]) -> bool:
    """True when a network that refuses REFUSED (CIDRs, beyond the namespace's own loopback)
    already refuses everything the policy's egress rules refuse, so the egress programs would
    add nothing: the default is allow and every deny rule lies inside a refused network and
    clear of loopback. Anything else (a default deny, a deny the network lets through) keeps
    the programs."""
    import ipaddress

    if compiled.flags & F_EGRESS_DENY:
        return False
    nets = [ipaddress.ip_network(c, strict=False) for c in refused]
    loopback = [ipaddress.ip_network(c) for c in _LOOPBACK]
    for rule in compiled.net_rules:
        if rule.action != "deny":
            continue
        net = ipaddress.ip_network(rule.network, strict=False)
        if any(net.version == lo.version and net.overlaps(lo) for lo in loopback):
            return False
        if not any(net.version == n.version and net.subnet_of(n) for n in nets):
            return False
    return True


def requirements(policy: Policy) -> set[str]:
    """Enforcement layers the policy needs: lsm, cgroup_sock, cgroup_sock_addr, cgroup_sysctl."""
    need: set[str] = set()
    fams = None if policy.families is None else set(policy.families)
    if (fams is not None and not _ALL_INET <= fams) or _deny(policy.raw_sockets):
        need.add("cgroup_sock")
    if policy.egress_rules or _deny(policy.egress_default):
        need.add("cgroup_sock_addr")
    if _deny(policy.kernel_sysctl_write):
        need.add("cgroup_sysctl")
    lsm = (
        policy.file_deny or policy.exec_deny or policy.exec_allow_only is not None
        or any(_deny(v) for v in (policy.exec_from_writable, policy.mount_after_start, policy.user_namespaces,
                                  policy.kernel_modules, policy.kernel_bpf, policy.kernel_perf_event,
                                  policy.unix_host_sockets, policy.device_mknod))
        or policy.ptrace == "own" or policy.signal == "own" or policy.capability_deny
        or policy.bind_ports != (0, 65535)
        # the cgroup hook sees only inet sockets; other families need the LSM
        or (fams is not None and set(FAMILIES) - _ALL_INET - fams)
    )
    if lsm:
        need.add("lsm")
    return need
