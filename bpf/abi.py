"""bpf/stockade.h as Python sees it: the constants, struct layouts and hook numbers it shares
with the BPF programs.

stockade.h is the source of truth and this module its Python copy: maps, policy and events take
everything from here (the device filter keeps the few event offsets it writes, off this import).
tests/test_bpf_abi.py compiles the header and checks every constant, struct size and field
offset below against it, so a change on one side fails that test instead of silently changing
what is enforced. Imported on the container start path when a BPF policy is installed: it needs
nothing but struct.
"""

from __future__ import annotations

import struct

# struct stk_policy.flags (STK_F_*)
F_DENY_MOUNT = 1 << 0
F_PTRACE_OWN = 1 << 1
F_KILL_OWN = 1 << 2
F_DENY_USERNS = 1 << 3
F_DENY_MODULES = 1 << 4
F_DENY_BPF = 1 << 5
F_DENY_PERF = 1 << 6
F_DENY_MKNOD = 1 << 7
F_DENY_SYSCTL_WRITE = 1 << 8
F_NO_EXEC_WRITABLE = 1 << 9
F_DENY_HOST_UNIX = 1 << 10
F_EGRESS_DENY = 1 << 11
F_EXEC_ALLOWLIST = 1 << 12
F_EGRESS_TRIE = 1 << 13

NET_INLINE = 16                   # STK_NET_INLINE: egress rules inside the policy value
MODE_ENFORCE, MODE_AUDIT = 0, 1   # STK_MODE_*
DENIED, AUDITED = 0, 1            # STK_DENIED, STK_AUDITED: an event's decision
ACC_READ, ACC_WRITE, ACC_EXEC = 1, 2, 4  # STK_ACC_*: file rule access bits

# enum stk_hook by value (0 is none): the name an event shows for each hook
HOOKS = (
    "", "sock_create", "connect4", "connect6", "sendmsg4", "sendmsg6", "sysctl", "device", "file_open",
    "bprm_check_security", "sb_mount", "move_mount", "sb_umount", "sb_pivotroot", "ptrace_access_check",
    "task_kill", "userns_create", "kernel_module_request", "kernel_read_file", "kernel_load_data", "bpf",
    "perf_event_open", "socket_create", "socket_connect", "socket_bind", "unix_stream_connect",
    "inode_mknod", "capable",
)


# struct layouts: native byte order, no implicit padding (the header spells out its pads); one
# format item per field ("4I" is a u32[4], "16s" a char[16]), named in FIELDS
CONFIG = struct.Struct("=QIIQ")
NET_INLINE_RULE = struct.Struct("=4I4IHHI")
POLICY_HEAD = struct.Struct("=IIQQIHH64s32sII")  # stk_policy up to net[NET_INLINE] (NET_INLINE_RULE)
POLICY_SIZE = POLICY_HEAD.size + NET_INLINE * NET_INLINE_RULE.size
NET_KEY = struct.Struct("=III16s")
NET_RULE = struct.Struct("=IHH")
FILE_KEY = struct.Struct("=QQII")
FILE_RULE = struct.Struct("=II")
EVENT = struct.Struct("=QQIIIIII16s16s128s")
EVENTS_RING_BYTES = 256 * 4096    # stk_events.max_entries

FIELDS = {  # C struct name: (layout, field names)
    "stk_config": (CONFIG, ("root_cgid", "root_level", "alt_level", "alt_cgid")),
    "stk_net_inline": (NET_INLINE_RULE, ("addr", "mask", "port_min", "port_max", "action")),
    "stk_policy": (POLICY_HEAD, ("flags", "mode", "families", "cap_deny", "sock_type_deny",
                                 "bind_port_min", "bind_port_max", "container_id", "tenant",
                                 "net_count", "pad")),
    "stk_net_key": (NET_KEY, ("prefixlen", "cgid_lo", "cgid_hi", "addr")),
    "stk_net_rule": (NET_RULE, ("action", "port_min", "port_max")),
    "stk_file_key": (FILE_KEY, ("cgid", "ino", "dev", "pad")),
    "stk_file_rule": (FILE_RULE, ("deny", "allow")),
    "stk_event": (EVENT, ("ts_ns", "cgid", "pid", "hook", "decision", "family", "arg0", "arg1",
                          "addr", "comm", "object")),
}


def fields(c_name: str) -> dict[str, tuple[int, int]]:
    """{field: (offset, size)} of a struct in FIELDS, from its format."""
    layout, names = FIELDS[c_name]
    items, count = [], ""
    for ch in layout.format.lstrip("=<>@!"):
        if ch.isdigit():
            count += ch
        else:
            items.append(count + ch)
            count = ""
    if len(items) != len(names):
        raise ValueError(f"{c_name}: {len(items)} format items for {len(names)} fields")
    out, offset = {}, 0
    for name, item in zip(names, items, strict=True):
        size = struct.calcsize("=" + item)
        out[name] = (offset, size)
        offset += size
    return out
