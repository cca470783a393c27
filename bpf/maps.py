"""Per-container policy in the pinned BPF maps, with plain bpf(2): the container start path.

`stockade-oci create` and `stockade run` call install_policy() after the container's cgroup
exists and before the workload starts, and remove_policy() on delete. Nothing here imports bcc
or compiles anything; a policy install is a handful of map updates on maps the agent pinned.
Layouts and constants come from stockade.bpf.abi (bpf/stockade.h's Python side).
"""

from __future__ import annotations

import errno
import os
import struct

from stockade.bpf import bpfsys
from stockade.bpf.abi import (
    CONFIG,
    EVENTS_RING_BYTES,
    F_EGRESS_TRIE,
    FILE_KEY,
    FILE_RULE,
    NET_INLINE,
    NET_INLINE_RULE,
    NET_KEY,
    NET_RULE,
    POLICY_HEAD,
    POLICY_SIZE,
)
from stockade.bpf.bpfsys import PIN_DIR, pin_path
from stockade.runtime._lite.dataclasses import dataclass
from stockade.runtime.errors import NotSupported, SpecError


@dataclass
class MapSpec:
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


# the maps of stockade.h's BPF_TABLE_PINNED lines and its event ring
MAPS: dict[str, MapSpec] = {
    "stk_config": MapSpec(bpfsys.MAP_ARRAY, 4, CONFIG.size, 1),
    "stk_policies": MapSpec(bpfsys.MAP_HASH, 8, POLICY_SIZE, 4096, bpfsys.F_NO_PREALLOC),
    "stk_net": MapSpec(bpfsys.MAP_LPM_TRIE, NET_KEY.size, NET_RULE.size, 16384, bpfsys.F_NO_PREALLOC),
    "stk_files": MapSpec(bpfsys.MAP_HASH, FILE_KEY.size, FILE_RULE.size, 16384),
    "stk_events": MapSpec(bpfsys.MAP_RINGBUF, 0, 0, EVENTS_RING_BYTES),
}

# programs the agent pins as prog_<name>; the cgroup layer is "up" when all of them are pinned
CGROUP_PROGRAMS = ("stk_sock_create", "stk_connect4", "stk_connect6", "stk_sendmsg4", "stk_sendmsg6",
                   "stk_sysctl")
# The egress programs and their hooks. They are attached per container cgroup, and only where no
# network already refuses what the policy refuses (runtime/bpfpolicy.py): a program at a socket
# address hook anywhere on the host costs every process's socket calls (bench/README.md).
EGRESS_PROGRAMS = {
    "stk_connect4": bpfsys.CGROUP_INET4_CONNECT, "stk_connect6": bpfsys.CGROUP_INET6_CONNECT,
    "stk_sendmsg4": bpfsys.CGROUP_UDP4_SENDMSG, "stk_sendmsg6": bpfsys.CGROUP_UDP6_SENDMSG,
}


def agent_running(pin_dir: str | None = None) -> bool:
    """True when the agent's maps and cgroup programs are pinned (it need not be a live process)."""
    names = list(MAPS) + [f"prog_{n}" for n in CGROUP_PROGRAMS]
    return all(os.path.exists(pin_path(n, pin_dir)) for n in names)


def loaded_layers(pin_dir: str | None = None) -> set[str]:
    """Layers the pinned programs provide, in requirements() vocabulary."""
    d = pin_dir or PIN_DIR
    layers: set[str] = set()
    if not agent_running(d):
        return layers
    layers |= CGROUP_LAYERS
    try:
        if any(n.startswith("link_lsm_") for n in os.listdir(d)):
            layers.add("lsm")
    except OSError:
        pass
    return layers


CGROUP_LAYERS = frozenset({"cgroup_sock", "cgroup_sock_addr", "cgroup_sysctl", "cgroup_device"})


def covers(cgroup_dir: str, pin_dir: str | None = None) -> bool:
    """True when the programs govern the cgroup2 directory CGROUP_DIR: it is below a parent the
    config names (what the LSM asks) and the cgroup programs run for it. A cgroup elsewhere (a
    kubelet pod's below a /kubepods no parent names) is confined by neither, whatever the maps say."""
    try:
        cfg = read_config(pin_dir)
        prog = bpfsys.obj_get(pin_path("prog_stk_sock_create", pin_dir))
    except (NotSupported, OSError):
        return False
    try:
        if not _below(cgroup_dir, {cfg["root_cgid"], cfg["alt_cgid"]} - {0}):
            return False
        wanted = bpfsys.prog_info(prog)["id"]
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return wanted in bpfsys.prog_query(fd, bpfsys.CGROUP_INET_SOCK_CREATE, effective=True)
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        os.close(prog)


def _below(cgroup_dir: str, parents: set[int]) -> bool:
    path = os.path.realpath(cgroup_dir)
    dev = os.stat(path).st_dev
    while path != "/":
        path = os.path.dirname(path)
        st = os.stat(path)
        if st.st_dev != dev:  # left the cgroup2 mount: ids are only unique inside it
            return False
        if st.st_ino in parents:
            return True
    return False


def attach_egress(cgroup_dir: str, pin_dir: str | None = None) -> None:
    """Attach the pinned egress programs to one container's cgroup (idempotent). They go with
    the cgroup; detach_egress() takes them off earlier."""
    _each_egress(cgroup_dir, pin_dir, attach=True)


def detach_egress(cgroup_dir: str, pin_dir: str | None = None) -> None:
    _each_egress(cgroup_dir, pin_dir, attach=False)


def egress_attached(cgroup_dir: str) -> int:
    """How many programs sit directly on the cgroup's egress hooks (0 when none)."""
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return sum(len(bpfsys.prog_query(fd, hook)) for hook in EGRESS_PROGRAMS.values())
    finally:
        os.close(fd)


def _each_egress(cgroup_dir: str, pin_dir: str | None, *, attach: bool) -> None:
    cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name, hook in EGRESS_PROGRAMS.items():
            prog = bpfsys.obj_get(pin_path(f"prog_{name}", pin_dir))
            try:
                there = bpfsys.prog_info(prog)["id"] in bpfsys.prog_query(cg, hook)
                if attach and not there:
                    bpfsys.prog_attach(cg, prog, hook, bpfsys.F_ALLOW_MULTI)
                elif there and not attach:
                    bpfsys.prog_detach(cg, prog, hook)
            finally:
                os.close(prog)
    finally:
        os.close(cg)


def missing_layers(required: set[str], pin_dir: str | None = None) -> set[str]:
    """Which of the REQUIRED layers (policy.requirements()) the pinned programs do not provide."""
    return set(required) - loaded_layers(pin_dir)


def open_map(name: str, pin_dir: str | None = None) -> int:
    path = pin_path(name, pin_dir)
    try:
        return bpfsys.obj_get(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise NotSupported(f"BPF map {name} is not pinned", where=path,
                               hint="start the agent: stockade agent") from None
        raise


def open_maps(names, pin_dir: str | None = None) -> dict[str, int]:
    """{name: fd} for pinned maps, all or none (a failure closes those already opened)."""
    fds: dict[str, int] = {}
    try:
        for name in names:
            fds[name] = open_map(name, pin_dir)
    except BaseException:
        close_all(fds)
        raise
    return fds


def close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)


@dataclass
class NetRule:
    network: str        # CIDR, IPv4 or IPv6
    action: str         # "allow" | "deny"
    port_min: int = 0
    port_max: int = 65535


@dataclass
class FileRule:
    path: str           # host path, resolved to (dev, ino) when installed
    deny: int = 0       # STK_ACC_* bits
    allow: int = 0


@dataclass
class CompiledPolicy:
    """Plain data for the map entries of one container (see stockade.bpf.policy)."""

    name: str
    flags: int
    mode: int                       # abi.MODE_ENFORCE | abi.MODE_AUDIT
    families: int
    cap_deny: int
    sock_type_deny: int
    bind_port_min: int = 0
    bind_port_max: int = 65535
    net_rules: tuple[NetRule, ...] = ()
    file_rules: tuple[FileRule, ...] = ()


def _cgid_bytes(cgroup_id: int) -> tuple[int, int]:
    if not isinstance(cgroup_id, int) or cgroup_id <= 0:
        raise SpecError(f"invalid cgroup id {cgroup_id!r}", hint="use Cgroup.unified_id()")
    return _halves(cgroup_id)


def _halves(cgroup_id: int) -> tuple[int, int]:
    """(cgid_lo, cgid_hi) of struct stk_net_key."""
    return cgroup_id & 0xFFFFFFFF, cgroup_id >> 32


def _policy_key(cgroup_id: int) -> bytes:
    return struct.pack("=Q", cgroup_id)


def _mapped(network: str) -> tuple[bytes, int]:
    """(address, prefix bits) in the IPv6 space the programs compare in (IPv4 as ::ffff:a.b.c.d)."""
    import ipaddress  # only policies with egress rules need it

    net = ipaddress.ip_network(network, strict=False)
    if net.version == 4:
        return ipaddress.IPv6Address("::ffff:" + str(net.network_address)).packed, 96 + net.prefixlen
    return net.network_address.packed, net.prefixlen


def net_key(cgroup_id: int, network: str) -> bytes:
    addr, bits = _mapped(network)
    lo, hi = _cgid_bytes(cgroup_id)
    return NET_KEY.pack(64 + bits, lo, hi, addr)


def _net_rule(rule: NetRule) -> bytes:
    return NET_RULE.pack(1 if rule.action == "deny" else 0, rule.port_min, rule.port_max)


def _file_rule(rule: FileRule) -> bytes:
    return FILE_RULE.pack(rule.deny, rule.allow)


def _config(root_cgid: int, root_level: int, alt_cgid: int = 0, alt_level: int = 0) -> bytes:
    return CONFIG.pack(root_cgid, root_level, alt_level, alt_cgid)


def _by_network(rules: tuple[NetRule, ...]) -> dict[tuple[bytes, int], NetRule]:
    """One rule per network, the last one winning (what successive trie updates would leave)."""
    out: dict[tuple[bytes, int], NetRule] = {}
    for rule in rules:
        out[_mapped(rule.network)] = rule
    return out


def inline_rules(rules: tuple[NetRule, ...]) -> list[bytes] | None:
    """struct stk_net_inline entries, longest prefix first, or None when they do not fit inline.

    With at most one rule per network, two matching rules always differ in length, so the
    first match in this order is the longest prefix: the trie's answer, found by a short scan.
    """
    unique = _by_network(rules)
    if len(unique) > NET_INLINE:
        return None
    out = []
    for (addr, bits), rule in sorted(unique.items(), key=lambda item: -item[0][1]):
        mask = (((1 << 128) - 1) << (128 - bits) & ((1 << 128) - 1)).to_bytes(16, "big")
        masked = bytes(a & m for a, m in zip(addr, mask, strict=True))
        out.append(NET_INLINE_RULE.pack(*struct.unpack("=4I", masked), *struct.unpack("=4I", mask),
                                        rule.port_min, rule.port_max, 1 if rule.action == "deny" else 0))
    return out


def _file_key(cgroup_id: int, path: str) -> bytes | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there to protect on this host
    return _stat_key(cgroup_id, st)


def _stat_key(cgroup_id: int, st: os.stat_result) -> bytes:
    # the LSM sees inode->i_sb->s_dev, the kernel's internal dev_t: MKDEV(ma, mi) = ma << 20 | mi
    dev = (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
    return FILE_KEY.pack(cgroup_id, st.st_ino, dev, 0)


MAX_TREE_ENTRIES = 256


def _file_keys(cgroup_id: int, path: str) -> list[bytes]:
    """Keys for a path; a directory also covers what it holds now (up to MAX_TREE_ENTRIES).

    Rules match inodes, so files created under a protected directory later are not covered.
    """
    first = _file_key(cgroup_id, path)
    if first is None:
        return []
    keys = [first]
    if os.path.isdir(path) and not os.path.islink(path):
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    keys.append(_stat_key(cgroup_id, os.stat(os.path.join(top, name), follow_symlinks=False)))
                except OSError:
                    continue
                if len(keys) > MAX_TREE_ENTRIES:
                    return keys
    return keys


def policy_value(container_id: str, policy: CompiledPolicy, tenant: str = "") -> bytes:
    """struct stk_policy; egress rules inline when they fit, else STK_F_EGRESS_TRIE (stk_net)."""
    rules = inline_rules(policy.net_rules)
    flags = policy.flags & ~F_EGRESS_TRIE
    if rules is None:
        flags |= F_EGRESS_TRIE
        rules = []
    head = POLICY_HEAD.pack(flags, policy.mode, policy.families, policy.cap_deny,
                            policy.sock_type_deny, policy.bind_port_min, policy.bind_port_max,
                            container_id.encode()[:63], tenant.encode()[:31], len(rules), 0)
    return (head + b"".join(rules)).ljust(POLICY_SIZE, b"\0")


def decode_policy(value: bytes) -> dict:
    flags, mode, fam, caps, types, bmin, bmax, cid, tenant, count, _ = POLICY_HEAD.unpack_from(value)
    return {"flags": flags, "mode": mode, "families": fam, "cap_deny": caps, "sock_type_deny": types,
            "bind_port_min": bmin, "bind_port_max": bmax,
            "container_id": cid.split(b"\0")[0].decode(errors="replace"),
            "tenant": tenant.split(b"\0")[0].decode(errors="replace"),
            "egress_inline": count, "egress_in_trie": bool(flags & F_EGRESS_TRIE)}


def install_policy(cgroup_id: int, container_id: str, policy: CompiledPolicy, tenant: str = "",
                   pin_dir: str | None = None) -> None:
    """Put a container's policy in the maps; enforcement starts with the last update."""
    _cgid_bytes(cgroup_id)
    fds = open_maps(("stk_policies", "stk_net", "stk_files"), pin_dir)
    try:
        try:
            replacing = bpfsys.map_lookup(fds["stk_policies"], _policy_key(cgroup_id), POLICY_SIZE)
            value = policy_value(container_id, policy, tenant)
            # rules first, the policy entry (which switches enforcement on) last; egress rules
            # that fit travel inside that entry, so only larger sets touch the trie
            net_keys, file_keys = set(), set()
            if POLICY_HEAD.unpack_from(value)[0] & F_EGRESS_TRIE:
                for rule in policy.net_rules:
                    key = net_key(cgroup_id, rule.network)
                    bpfsys.map_update(fds["stk_net"], key, _net_rule(rule))
                    net_keys.add(key)
            for frule in policy.file_rules:
                for key in _file_keys(cgroup_id, frule.path):
                    bpfsys.map_update(fds["stk_files"], key, _file_rule(frule))
                    file_keys.add(key)
            bpfsys.map_update(fds["stk_policies"], _policy_key(cgroup_id), value)
            if replacing:
                _remove_rules(fds, cgroup_id, keep=net_keys | file_keys)
        except OSError as e:
            _remove(fds, cgroup_id)
            raise NotSupported(f"cannot install BPF policy {policy.name!r}: {e.strerror}",
                               where=f"cgroup id {cgroup_id}",
                               hint="the maps may be full; check `stockade agent --status`") from None
    finally:
        close_all(fds)


def remove_policy(cgroup_id: int, pin_dir: str | None = None) -> None:
    """Delete every entry of a container; a no-op when the agent's maps are gone."""
    _cgid_bytes(cgroup_id)
    if not os.path.exists(pin_path("stk_policies", pin_dir)):
        return
    fds = open_maps(("stk_policies", "stk_net", "stk_files"), pin_dir)
    try:
        _remove(fds, cgroup_id)
    finally:
        close_all(fds)


def _remove(fds: dict[str, int], cgroup_id: int) -> None:
    # the policy entry goes first so no half-removed rule set is ever enforced
    bpfsys.map_delete(fds["stk_policies"], _policy_key(cgroup_id))
    _remove_rules(fds, cgroup_id, keep=set())


def _rule_keys(fds: dict[str, int], cgroup_id: int) -> tuple[list[bytes], list[bytes]]:
    """The cgroup's keys in stk_net and in stk_files."""
    halves = _halves(cgroup_id)
    net = [k for k in bpfsys.map_keys(fds["stk_net"], NET_KEY.size) if NET_KEY.unpack(k)[1:3] == halves]
    files = [k for k in bpfsys.map_keys(fds["stk_files"], FILE_KEY.size)
             if FILE_KEY.unpack(k)[0] == cgroup_id]
    return net, files


def _remove_rules(fds: dict[str, int], cgroup_id: int, keep: set[bytes]) -> None:
    net, files = _rule_keys(fds, cgroup_id)
    for name, keys in (("stk_net", net), ("stk_files", files)):
        for key in keys:
            if key not in keep:
                bpfsys.map_delete(fds[name], key)


def entries_for(cgroup_id: int, pin_dir: str | None = None) -> dict[str, int]:
    """How many map entries a cgroup id owns, per map (for tests and `stockade agent --status`)."""
    fds = open_maps(("stk_policies", "stk_net", "stk_files"), pin_dir)
    try:
        policy = bpfsys.map_lookup(fds["stk_policies"], _policy_key(cgroup_id), POLICY_SIZE)
        net, files = _rule_keys(fds, cgroup_id)
    finally:
        close_all(fds)
    return {"stk_policies": 1 if policy else 0, "stk_net": len(net), "stk_files": len(files)}


def lookup_policy(cgroup_id: int, pin_dir: str | None = None) -> dict | None:
    fd = open_map("stk_policies", pin_dir)
    try:
        value = bpfsys.map_lookup(fd, _policy_key(cgroup_id), POLICY_SIZE)
    finally:
        os.close(fd)
    return decode_policy(value) if value else None


def all_policies(pin_dir: str | None = None) -> dict[int, dict]:
    fd = open_map("stk_policies", pin_dir)
    try:
        out = {}
        for key in bpfsys.map_keys(fd, 8):
            value = bpfsys.map_lookup(fd, key, POLICY_SIZE)
            if value:
                out[struct.unpack("=Q", key)[0]] = decode_policy(value)
        return out
    finally:
        os.close(fd)


def create_maps(pin_dir: str | None = None) -> list[str]:
    """Create and pin every map that is not pinned yet (the agent, before compiling programs).

    Returns the maps that were pinned with an older layout and made afresh: programs still
    pinned from before use the old maps and must be reloaded."""
    replaced = []
    for name, spec in MAPS.items():
        path = pin_path(name, pin_dir)
        if os.path.exists(path):
            fd = bpfsys.obj_get(path)
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            if (info["type"], info["key_size"], info["value_size"], info["flags"]) == (
                    spec.map_type, spec.key_size, spec.value_size, spec.flags):
                continue
            os.unlink(path)  # layout changed with a new Stockade version: start afresh
            replaced.append(name)
        fd = bpfsys.map_create(spec.map_type, spec.key_size, spec.value_size, spec.max_entries,
                               spec.flags, name)
        try:
            bpfsys.obj_pin(fd, path)
        finally:
            os.close(fd)
    return replaced


def read_config(pin_dir: str | None = None) -> dict[str, int]:
    """The parents the programs govern below: root_cgid/root_level and alt_cgid/alt_level."""
    fd = open_map("stk_config", pin_dir)
    try:
        raw = bpfsys.map_lookup(fd, struct.pack("=I", 0), CONFIG.size)
    finally:
        os.close(fd)
    root_cgid, root_level, alt_level, alt_cgid = CONFIG.unpack(raw)
    return {"root_cgid": root_cgid, "root_level": root_level, "alt_cgid": alt_cgid, "alt_level": alt_level}


def write_config(root_cgid: int, root_level: int, pin_dir: str | None = None, *,
                 alt: tuple[int, int] | None = None) -> None:
    """Set the runtime's parent; ALT (cgid, level) sets the second one, None keeps it."""
    if alt is None:
        old = read_config(pin_dir)
        alt = (old["alt_cgid"], old["alt_level"])
    fd = open_map("stk_config", pin_dir)
    try:
        bpfsys.map_update(fd, struct.pack("=I", 0), _config(root_cgid, root_level, *alt))
    finally:
        os.close(fd)
