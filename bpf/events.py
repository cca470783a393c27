"""Denial events: the pinned BPF ring buffer -> JSON lines.

The agent is the ring's only consumer (a ring buffer has one consumer position). It reads the
pinned map through mmap (no bcc, so a restarted agent picks up where the old one stopped),
resolves cgroup ids to container ids via the policy map and appends one JSON object per
event to the events file, which `stockade events` reads.

Ring layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (we write it), page 1
the producer position, then the data area mapped twice so records never wrap. Each record
has an 8-byte header: u32 length with BUSY (bit 31) and DISCARD (bit 30) flags, u32 page
offset; records are 8-byte aligned.
"""

from __future__ import annotations

import ipaddress
import json
import mmap
import os
import select
import signal
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stockade.bpf import bpfsys, maps
from stockade.bpf.abi import AUDITED, EVENT, HOOKS, fields

EVENTS_FILE = Path(os.environ.get("STOCKADE_EVENTS_FILE", "/run/stockade/events.jsonl"))  # the stream
_CGID_AT = fields("stk_event")["cgid"][0]
_BUSY, _DISCARD = 1 << 31, 1 << 30
MAX_EVENTS_BYTES = 64 << 20
_NET_HOOKS = {"connect4", "connect6", "sendmsg4", "sendmsg6", "socket_connect", "socket_bind"}


@dataclass
class Event:
    time: float             # seconds since the epoch
    container_id: str
    tenant: str
    cgroup_id: int
    pid: int
    comm: str
    hook: str
    decision: str           # "denied" | "audited"
    object: str             # path, address:port, sysctl name, family/type, capability ...

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _object(hook: str, family: int, arg0: int, arg1: int, addr: bytes, text: str) -> str:
    if hook in _NET_HOOKS:
        ip = ipaddress.IPv6Address(addr)
        shown = str(ip.ipv4_mapped) if ip.ipv4_mapped else f"[{ip}]"
        return f"{shown}:{arg0}"
    if hook == "sock_create" or hook == "socket_create":
        return f"family={family} type={arg0} protocol={arg1}"
    if hook == "capable":
        return f"capability={arg0}"
    if hook == "device":
        access = "".join(c for bit, c in ((1, "m"), (2, "r"), (4, "w")) if addr[0] & bit)
        return f"{'b' if family == 1 else 'c'} {arg0}:{arg1} {access}"
    if hook == "inode_mknod":
        return f"{arg0}:{arg1}"
    if hook == "task_kill":
        return f"{text} signal={arg1}" if text else f"pid={arg0} signal={arg1}"
    return text or (f"arg={arg0}" if arg0 else "")


def decode(raw: bytes, boot_offset: float, names: dict[int, dict]) -> Event:
    ts, cgid, pid, hook, decision, family, arg0, arg1, addr, comm, obj = EVENT.unpack_from(raw)
    hook_name = HOOKS[hook] if hook < len(HOOKS) else f"hook{hook}"
    who = names.get(cgid, {})
    text = obj.split(b"\0")[0].decode(errors="replace")
    return Event(time=round(boot_offset + ts / 1e9, 6), container_id=who.get("container_id", ""),
                 tenant=who.get("tenant", ""), cgroup_id=cgid, pid=pid,
                 comm=comm.split(b"\0")[0].decode(errors="replace"), hook=hook_name,
                 decision="audited" if decision == AUDITED else "denied",
                 object=_object(hook_name, family, arg0, arg1, addr, text))


class RingReader:
    """Consumer side of a pinned BPF_MAP_TYPE_RINGBUF."""

    def __init__(self, path: str) -> None:
        self.fd = bpfsys.obj_get(path)
        info = bpfsys.map_info(self.fd)
        self.size = info["max_entries"]
        self.page = mmap.PAGESIZE
        self.cons = mmap.mmap(self.fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        self.prod = mmap.mmap(self.fd, self.page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=self.page)
        self.poll = select.epoll()
        self.poll.register(self.fd, select.EPOLLIN)

    def close(self) -> None:
        self.poll.close()
        self.cons.close()
        self.prod.close()
        os.close(self.fd)

    def drain(self) -> list[bytes]:
        """Every committed record; advances the consumer position past them."""
        out = []
        cons = struct.unpack_from("=Q", self.cons, 0)[0]
        prod = struct.unpack_from("=Q", self.prod, 0)[0]
        while cons < prod:
            off = self.page + (cons & (self.size - 1))
            length = struct.unpack_from("=I", self.prod, off)[0]
            if length & _BUSY:
                break  # the producer has not committed this one yet
            size = length & ~(_BUSY | _DISCARD)
            if not length & _DISCARD:
                out.append(bytes(self.prod[off + 8: off + 8 + size]))
            cons += (size + 8 + 7) & ~7
            struct.pack_into("=Q", self.cons, 0, cons)
        return out

    def wait(self, timeout: float) -> None:
        self.poll.poll(timeout)


def boot_offset() -> float:
    """Seconds to add to CLOCK_MONOTONIC (bpf_ktime_get_ns) to get wall-clock time."""
    return time.time() - time.monotonic()


def pump(pin_dir: str, events_file: Path, *, once: bool = False, until: Any = None) -> int:
    """The agent's event loop: ring -> JSON lines, until SIGTERM/SIGINT (once: one drain). UNTIL:
    a threading.Event that ends it instead (a thread of a server, which keeps its own signals)."""
    stop: list[int] = []
    if not once and until is None:
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    reader = RingReader(maps.pin_path("stk_events", pin_dir))
    names: dict[int, dict] = {}
    events_file.parent.mkdir(parents=True, exist_ok=True)
    out = open(events_file, "a", buffering=1)
    try:
        while not stop and not (until is not None and until.is_set()):
            if out.tell() > MAX_EVENTS_BYTES:  # keep one previous file, like logrotate's rotate 1
                out.close()
                os.replace(events_file, events_file.with_name(events_file.name + ".1"))
                out = open(events_file, "a", buffering=1)
            records = reader.drain()
            if records:
                offset = boot_offset()
                for raw in records:
                    cgid = struct.unpack_from("=Q", raw, _CGID_AT)[0]
                    if cgid not in names:
                        names.update(_names(pin_dir))  # cached: entries vanish on delete
                    out.write(decode(raw, offset, names).to_json() + "\n")
            if once:
                break
            reader.wait(0.5)
    finally:
        out.close()
        reader.close()
    return 0


def _names(pin_dir: str) -> dict[int, dict]:
    try:
        return maps.all_policies(pin_dir)
    except OSError:
        return {}


def read_events(events_file: Path, container: str | None = None, follow: bool = False,
                poll: float = 0.2):
    """Yield events (dicts) from the JSON lines file; with follow, wait for new ones."""
    handle = None
    while handle is None:
        try:
            handle = open(events_file, "rb")
        except FileNotFoundError:
            if not follow:
                return
            time.sleep(poll)
    with handle:
        while True:
            line = handle.readline()
            if not line:
                if not follow:
                    return
                time.sleep(poll)
                continue
            if not line.endswith(b"\n"):
                handle.seek(-len(line), os.SEEK_CUR)  # a half-written line: wait for the rest
                time.sleep(poll)
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if container and not event.get("container_id", "").startswith(container):
                continue
            yield event
