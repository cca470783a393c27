"""Network denials as events: the tenant rules log what they drop to an NFLOG group (rate
limited in the rule), and a thread of the server reads that group over netfilter netlink and
appends one JSON line per denial to the events file the BPF programs' denials go to, so
`stockade events` shows both. Packets are decoded just far enough to say who sent what where.

The wire format (linux/netfilter/nfnetlink_log.h): a netlink header, nfgenmsg (family,
version, the group in network byte order), then attributes, each (length, type, data) padded to
4 bytes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import socket
import struct
import time

from .netrules import LOG_GROUP as GROUP
from .netrules import LOG_PREFIX as PREFIX

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any

NETLINK_NETFILTER = 12
_CONFIG, _PACKET = (4 << 8) | 1, (4 << 8) | 0  # NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_*
_REQUEST, _ACK = 1, 4
_CFG_CMD, _CFG_MODE = 1, 2
_BIND, _COPY_PACKET = 1, 2
_PAYLOAD, _PREFIX = 9, 10
_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}


def open_group(group: int = GROUP) -> socket.socket:
    """A netlink socket bound to the NFLOG group, copying the first 128 bytes of each packet."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    sock.bind((0, 0))
    _config(sock, group, struct.pack("B3x", _BIND), _CFG_CMD)
    _config(sock, group, struct.pack("!IBx2x", 128, _COPY_PACKET), _CFG_MODE)
    return sock


def _config(sock: socket.socket, group: int, data: bytes, attr: int) -> None:
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, group) + _attr(attr, data)
    sock.send(struct.pack("=IHHII", 16 + len(body), _CONFIG, _REQUEST | _ACK, 0, 0) + body)
    reply = sock.recv(4096)
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    if kind == 2:  # NLMSG_ERROR: 0 is the ACK
        err = struct.unpack_from("=i", reply, 16)[0]
        if err:
            raise OSError(-err, f"NFLOG group {group}: {os.strerror(-err)}")


def _attr(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def messages(data: bytes) -> list[dict[int, bytes]]:
    """The NFLOG packet messages in one netlink datagram, as {attribute type: data}."""
    out, at = [], 0
    while at + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, at)
        if length < 16:
            break
        if kind == _PACKET:
            attrs, pos = {}, at + 20  # after nlmsghdr and nfgenmsg
            while pos + 4 <= at + length:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                attrs[atype & 0x7FFF] = data[pos + 4: pos + alen]
                pos += (alen + 3) & ~3
            out.append(attrs)
        at += (length + 3) & ~3
    return out


def describe(payload: bytes) -> tuple[str, str, str]:
    """(source, destination[:port], protocol) of an IPv4 or IPv6 packet's first bytes (IPv6
    extension headers are not followed: the protocol is then the first of them)."""
    version = payload[0] >> 4 if payload else 0
    if version == 4 and len(payload) >= 20:
        header, number = (payload[0] & 0x0F) * 4, payload[9]
        src, dst = str(ipaddress.IPv4Address(payload[12:16])), str(ipaddress.IPv4Address(payload[16:20]))
    elif version == 6 and len(payload) >= 40:
        header, number = 40, payload[6]
        src, dst = str(ipaddress.IPv6Address(payload[8:24])), f"[{ipaddress.IPv6Address(payload[24:40])}]"
    else:
        return "", "", "other"
    proto = _PROTOCOLS.get(number, str(number))
    if proto in ("tcp", "udp", "sctp") and len(payload) >= header + 4:
        dst += f":{struct.unpack_from('!H', payload, header + 2)[0]}"
    return src, dst, proto


def event(attrs: dict[int, bytes], pod_of: Callable[[str], tuple[str, str]]) -> dict[str, Any] | None:
    """The JSON event for one logged packet (None: not one of ours). POD_OF: address -> (pod id,
    tenant), the tenant for chains all tenants share."""
    prefix = attrs.get(_PREFIX, b"").split(b"\0")[0].decode(errors="replace")
    if not prefix.startswith(PREFIX):
        return None
    _, tenant, rule = (prefix.split(" ", 2) + ["", ""])[:3]
    src, dst, proto = describe(attrs.get(_PAYLOAD, b""))
    pod_id, pod_tenant = pod_of(src)
    return {"time": round(time.time(), 6), "container_id": "", "pod_id": pod_id,
            "tenant": pod_tenant if tenant == "-" else tenant,
            "cgroup_id": 0, "pid": 0, "comm": "", "hook": "nftables", "decision": "denied",
            "object": f"{dst}/{proto} from {src} ({rule})"}


def pump(events_file: Path, pod_of: Callable[[str], tuple[str, str]], until: Any, group: int = GROUP) -> None:
    """Denials -> JSON lines until UNTIL (a threading.Event) is set."""
    sock = open_group(group)
    events_file.parent.mkdir(parents=True, exist_ok=True)
    poll = select.epoll()
    poll.register(sock.fileno(), select.EPOLLIN)
    try:
        with open(events_file, "a", buffering=1) as out:
            while not until.is_set():
                if not poll.poll(0.5):
                    continue
                for attrs in messages(sock.recv(65536)):
                    found = event(attrs, pod_of)
                    if found is not None:
                        out.write(json.dumps(found, sort_keys=True) + "\n")
    finally:
        poll.close()
        sock.close()
