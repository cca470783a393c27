"""The CRI server's configuration: a TOML file (CRI-O style) and the flags that override it, as
plain data. Every key is checked; a misspelt one is an error that names the file and the key.

    [stockade]
    socket = "/run/stockade/stockade.sock"
    state_dir = "/var/lib/stockade/cri"
    image_store = "/var/lib/stockade/images"
    cgroup_parent = "stockade"
    log_level = "info"            # debug, info, warning, error
    log_format = "text"           # or "json"
    default_handler = "stockade"
    tenant_annotation = ""        # a pod annotation that may name the tenant ("" : the namespace)
    network = "none"              # "bridge": a bridge per tenant (network.py); "cni": the node's conflist
    bpf_agent = true              # the BPF agent runs in the server (its cgroup root: cgroup_parent)

    [stockade.pod_network]         # (TOML: `network` above is the backend's name)
    pod_cidr = "10.88.0.0/16"     # the node's pod addresses (kubelet's UpdateRuntimeConfig may set it)
    pod_cidr6 = ""                # dual-stack: the pods' IPv6 addresses too, e.g. "fd00:88::/64"
    tenant_prefix = 24            # each tenant gets a subnet of this size out of pod_cidr
    node_allow = []               # node addresses pods may reach: "ADDR[/LEN]:PORT[-PORT]/tcp|udp|sctp"
    policy_dir = "/etc/stockade/tenants"   # <tenant>.yaml: egress allows, who may reach the tenant
    cni_conf_dir = "/etc/cni/net.d"   # network = "cni": the conflist (its addresses within pod_cidr)
    cni_bin_dir = "/usr/lib/cni"      # Debian's containernetworking-plugins

    [stockade.streaming]           # exec, attach, port-forward: the URLs Exec/Attach/PortForward return
    address = "127.0.0.1"
    port = 0                      # 0: any free port (containerd's default)
    tls_cert = ""                 # both or neither: HTTPS with this certificate and key
    tls_key = ""
    idle_timeout = 14400          # seconds a stream may stay silent (4 h, as kubelet's)

    [stockade.registries]
    insecure = ["localhost:5000"]
    mirrors = { "registry.k8s.io" = "mirror.local:5000" }   # asked first; the registry if it fails

    [stockade.handlers.stockade]
    profile = "restricted"
    bpf_policy = ""               # "" : the profile's; "audit" reports instead of denying
    user_namespace = true
    host_namespaces = false       # hostNetwork/hostPID/hostIPC pods
    privileged = false
    allow_degraded = false        # run where the profile's BPF layers cannot be enforced (reported)
"""

from __future__ import annotations

import os

from stockade.runtime._lite.dataclasses import dataclass, field
from stockade.runtime.errors import SpecError

DEFAULT_FILE = "/etc/stockade/stockade.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class Handler:
    """A RuntimeClass handler: how strictly its pods are confined."""

    name: str
    profile: str = "restricted"
    bpf_policy: str = ""  # the BPF policy by name ("": the profile's; "audit" reports instead of denying)
    user_namespace: bool = True
    host_namespaces: bool = False
    privileged: bool = False
    allow_degraded: bool = False  # run where a BPF layer its profile needs cannot be enforced (reported)


@dataclass
class NetworkConfig:
    pod_cidr: str = "10.88.0.0/16"
    pod_cidr6: str = ""  # "": IPv4 only
    tenant_prefix: int = 24
    node_allow: list[str] = field(default_factory=list)
    policy_dir: str = "/etc/stockade/tenants"
    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dir: str = "/usr/lib/cni"


@dataclass
class StreamingConfig:
    address: str = "127.0.0.1"
    port: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    idle_timeout: int = 4 * 3600


@dataclass
class Config:
    socket: str = "/run/stockade/stockade.sock"
    state_dir: str = "/var/lib/stockade/cri"
    image_store: str = "/var/lib/stockade/images"
    cgroup_parent: str = "stockade"
    log_level: str = "info"
    log_format: str = "text"
    default_handler: str = "stockade"
    tenant_annotation: str = ""
    network: str = "none"
    bpf_agent: bool = True  # load, attach and pin the BPF programs in this process, stream their events
    insecure_registries: list[str] = field(default_factory=list)
    registry_mirrors: dict[str, str] = field(default_factory=dict)  # registry -> host asked first
    handlers: dict[str, Handler] = field(default_factory=dict)
    net: NetworkConfig = field(default_factory=NetworkConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)

    def handler(self, name: str) -> Handler:
        """The handler a RuntimeClass names ("" : the default one)."""
        found = self.handlers.get(name or self.default_handler)
        if found is None:
            raise SpecError(f"unknown runtime handler {name!r}", where="runtime_handler",
                            hint=f"configured handlers: {', '.join(sorted(self.handlers))}")
        return found


def default_handlers() -> dict[str, Handler]:
    return {
        "stockade": Handler("stockade"),
        "stockade-audit": Handler("stockade-audit", bpf_policy="audit"),
    }


_TOP = {"socket": str, "state_dir": str, "image_store": str, "cgroup_parent": str, "log_level": str,
        "log_format": str, "default_handler": str, "tenant_annotation": str, "network": str,
        "bpf_agent": bool}
_TABLES = ("registries", "handlers", "pod_network", "streaming")
_STREAMING = {"address": str, "port": int, "tls_cert": str, "tls_key": str, "idle_timeout": int}
_NETWORK = {"pod_cidr": str, "pod_cidr6": str, "tenant_prefix": int, "node_allow": list, "policy_dir": str,
            "cni_conf_dir": str, "cni_bin_dir": str}
NETWORKS = ("none", "bridge", "cni")
_HANDLER = {"profile": str, "bpf_policy": str, "user_namespace": bool, "host_namespaces": bool,
            "privileged": bool, "allow_degraded": bool}


def load(path: str | None, explicit: bool = False) -> Config:
    """The configuration in PATH (the default file when None; a missing default file is fine,
    a missing file named on the command line is not)."""
    path = path or DEFAULT_FILE
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if explicit:
            raise SpecError("no such configuration file", where=path) from None
        return Config(handlers=default_handlers())
    import tomllib

    try:
        doc = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"not valid TOML: {exc}", where=path) from None
    return parse(doc, path)


def parse(doc: dict, where: str) -> Config:
    unknown = set(doc) - {"stockade"}
    if unknown:
        raise SpecError(f"unknown table {sorted(unknown)[0]!r}", where=where,
                        hint="everything is under [stockade]")
    section = doc.get("stockade", {})
    config = Config(handlers={})
    for key, value in section.items():
        if key == "registries":
            found = _registries(value, f"{where}: stockade.registries")
            config.insecure_registries, config.registry_mirrors = found
        elif key == "handlers":
            config.handlers = _handlers(value, f"{where}: stockade.handlers")
        elif key == "pod_network":
            config.net = _network(value, f"{where}: stockade.pod_network")
        elif key == "streaming":
            config.streaming = _streaming(value, f"{where}: stockade.streaming")
        elif key in _TOP:
            setattr(config, key, _typed(value, _TOP[key], f"{where}: stockade.{key}"))
        else:
            raise SpecError(f"unknown key {key!r}", where=f"{where}: [stockade]",
                            hint=f"known: {', '.join(sorted([*_TOP, *_TABLES]))}")
    if not config.handlers:
        config.handlers = default_handlers()
    check(config, where)
    return config


def check(config: Config, where: str) -> None:
    """What the file and the flags together must satisfy."""
    if config.log_level not in LOG_LEVELS:
        raise SpecError(f"log_level {config.log_level!r}", where=where,
                        hint=f"one of {', '.join(LOG_LEVELS)}")
    if config.log_format not in ("text", "json"):
        raise SpecError(f"log_format {config.log_format!r}", where=where, hint="text or json")
    if config.default_handler not in config.handlers:
        raise SpecError(f"default_handler {config.default_handler!r} is not a configured handler",
                        where=where, hint=f"configured: {', '.join(sorted(config.handlers))}")
    for key in ("socket", "state_dir", "image_store"):
        if not os.path.isabs(getattr(config, key)):
            raise SpecError(f"{key} must be an absolute path", where=where)
    if config.network not in NETWORKS:
        raise SpecError(f"network {config.network!r}", where=where, hint=f"one of {', '.join(NETWORKS)}")
    from .ipam import check_cidr, check_cidr6  # checked whatever the backend: a later switch finds them sound
    from .netrules import node_allow

    net = check_cidr(config.net.pod_cidr, config.net.tenant_prefix, f"{where}: stockade.pod_network")
    check_cidr6(config.net.pod_cidr6, net, f"{where}: stockade.pod_network")
    for item in config.net.node_allow:
        node_allow(item, f"{where}: stockade.pod_network.node_allow")


def _handlers(value: object, where: str) -> dict[str, Handler]:
    if not isinstance(value, dict):
        raise SpecError("must be a table of handlers", where=where)
    return {name: _fill(Handler(name), table, _HANDLER, f"{where}.{name}") for name, table in value.items()}


def _fill(target: object, table: object, keys: dict[str, type], where: str):  # noqa: ANN202 - target
    """TARGET with the TOML TABLE's values, each key known (KEYS: name -> type) and typed."""
    if not isinstance(table, dict):
        raise SpecError("must be a table", where=where)
    for key, item in table.items():
        if key not in keys:
            raise SpecError(f"unknown key {key!r}", where=where, hint=f"known: {', '.join(sorted(keys))}")
        setattr(target, key, _typed(item, keys[key], f"{where}.{key}"))
    return target


def _network(value: object, where: str) -> NetworkConfig:
    """[stockade.pod_network]: the bridge backend's addresses and rules."""
    net = _fill(NetworkConfig(), value, _NETWORK, where)
    if not all(isinstance(item, str) for item in net.node_allow):
        raise SpecError("node_allow must be a list of strings", where=f"{where}.node_allow")
    return net


def _streaming(value: object, where: str) -> StreamingConfig:
    out = _fill(StreamingConfig(), value, _STREAMING, where)
    if not 0 <= out.port < 65536:
        raise SpecError(f"port {out.port} is not a port", where=f"{where}.port", hint="0 picks a free one")
    if bool(out.tls_cert) != bool(out.tls_key):
        raise SpecError("tls_cert and tls_key go together", where=where)
    if out.idle_timeout <= 0:
        raise SpecError("idle_timeout must be positive (seconds)", where=f"{where}.idle_timeout")
    return out


def _registries(value: object, where: str) -> tuple[list[str], dict[str, str]]:
    """(insecure hosts, mirrors: registry -> host)."""
    if not isinstance(value, dict) or set(value) - {"insecure", "mirrors"}:
        raise SpecError("expected `insecure = [\"host:port\", ...]` and `mirrors = {registry = \"host\"}`",
                        where=where)
    hosts = value.get("insecure", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise SpecError("insecure must be a list of host[:port] strings", where=where)
    mirrors = value.get("mirrors", {})
    if not isinstance(mirrors, dict) or not all(isinstance(v, str) and v for v in mirrors.values()):
        raise SpecError("mirrors must map registries to hosts", where=f"{where}.mirrors",
                        hint='e.g. mirrors = { "registry.k8s.io" = "mirror.local:5000" }')
    return list(hosts), dict(mirrors)


def _typed(value: object, kind: type, where: str) -> object:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise SpecError(f"expected a {kind.__name__}, got {value!r}", where=where)
    return value
