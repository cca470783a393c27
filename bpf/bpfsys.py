"""The bpf(2) system call through ctypes: maps, pins, program load/attach/query.

No bcc here: this module is imported on the container start path, and importing bcc (which
loads LLVM) would cost more than the whole start (bench/README.md has the figures). Every layout
below is `union bpf_attr` from include/uapi/linux/bpf.h, packed by hand into a zeroed buffer.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_SYS_BPF = 321  # x86_64

# Where the agent pins its maps and programs (bpffs); tests and labs point it elsewhere.
PIN_DIR = os.environ.get("STOCKADE_BPF_PIN_DIR", "/sys/fs/bpf/stockade")
_ATTR_SIZE = 128

# commands
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD, OBJ_PIN, OBJ_GET, PROG_ATTACH, PROG_DETACH = 5, 6, 7, 8, 9
PROG_GET_FD_BY_ID, MAP_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD, PROG_QUERY = 13, 14, 15, 16
RAW_TRACEPOINT_OPEN = 17

# map types
MAP_HASH, MAP_ARRAY, MAP_LPM_TRIE, MAP_RINGBUF = 1, 2, 11, 27
F_NO_PREALLOC = 1

# program types
PROG_CGROUP_SOCK, PROG_CGROUP_DEVICE, PROG_CGROUP_SOCK_ADDR, PROG_CGROUP_SYSCTL, PROG_LSM = 9, 15, 18, 23, 29

# attach types
CGROUP_INET_SOCK_CREATE = 2
CGROUP_DEVICE = 6
CGROUP_INET4_BIND, CGROUP_INET6_BIND = 8, 9
CGROUP_INET4_CONNECT, CGROUP_INET6_CONNECT = 10, 11
CGROUP_UDP4_SENDMSG, CGROUP_UDP6_SENDMSG = 14, 15
CGROUP_SYSCTL = 18
LSM_MAC = 27

F_ALLOW_MULTI = 2
ANY = 0  # BPF_ANY for updates
NOEXIST = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pin_path(name: str, pin_dir: str | None = None) -> str:
    """The pinned path of NAME (a map, prog_<program>, link_lsm_<hook>) in PIN_DIR unless given."""
    return os.path.join(pin_dir or PIN_DIR, name)


class BpfError(OSError):
    """A failed bpf(2) call, with the command that failed in the message."""


def bpf(cmd: int, attr: ctypes.Array) -> int:
    ret = _libc.syscall(_SYS_BPF, ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"bpf(cmd={cmd}): {os.strerror(err)}")
    return ret


def _attr(fmt: str, *values) -> ctypes.Array:
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into(fmt, buf, 0, *values)
    return buf


def _addr(buf) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


# -- maps ------------------------------------------------------------------------------------

def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    attr = _attr("=7I16s", map_type, key_size, value_size, max_entries, flags, 0, 0,
                 name.encode()[:15])
    return bpf(MAP_CREATE, attr)


def map_update(fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    bpf(MAP_UPDATE_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), _addr(v), flags))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    try:
        bpf(MAP_LOOKUP_ELEM, _attr("=IIQQQ", fd, 0, _addr(k), _addr(v), 0))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> bool:
    """Delete a key; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        bpf(MAP_DELETE_ELEM, _attr("=IIQQ", fd, 0, _addr(k), 0))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> list[bytes]:
    keys: list[bytes] = []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        k = ctypes.create_string_buffer(cur, key_size) if cur is not None else None
        try:
            bpf(MAP_GET_NEXT_KEY, _attr("=IIQQ", fd, 0, _addr(k), _addr(nxt)))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return keys
            raise
        cur = nxt.raw
        keys.append(cur)


# -- pins ------------------------------------------------------------------------------------

def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    bpf(OBJ_PIN, _attr("=QII", _addr(p), fd, 0))


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(OBJ_GET, _attr("=QII", _addr(p), 0, 0))


# -- programs --------------------------------------------------------------------------------

def prog_load(prog_type: int, insns: bytes, *, name: str = "", license: str = "GPL",
              expected_attach_type: int = 0, attach_btf_id: int = 0) -> int:
    """Load a program; a refusal carries the verifier's log. The first attempt asks for no log:
    writing one slows the verifier, and the kernel refuses (ENOSPC) a program whose log outgrows
    the buffer even when it verifies. Only a refused program is loaded again, for its log."""
    try:
        return _prog_load(prog_type, insns, name, license, expected_attach_type, attach_btf_id, None)
    except BpfError:
        log = ctypes.create_string_buffer(65536)
        try:
            return _prog_load(prog_type, insns, name, license, expected_attach_type, attach_btf_id, log)
        except BpfError as e:
            verifier = log.value.decode(errors="replace").strip()
            raise BpfError(e.errno, f"{e.strerror}; verifier: {verifier[-800:]}") from None


def _prog_load(prog_type: int, insns: bytes, name: str, license: str, expected_attach_type: int,
               attach_btf_id: int, log: ctypes.Array | None) -> int:
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    # prog_type, insn_cnt, insns, license, log_level, log_size, log_buf, kern_version,
    # prog_flags, prog_name[16], prog_ifindex, expected_attach_type
    fmt = "=IIQQIIQII16sII"
    log_args = (1, len(log), _addr(log)) if log is not None else (0, 0, 0)
    attr = _attr(fmt, prog_type, len(insns) // 8, _addr(code), _addr(lic), *log_args,
                 0, 0, name.encode()[:15], 0, expected_attach_type)
    struct.pack_into("=I", attr, 108, attach_btf_id)  # LSM/tracing: the kernel function's BTF id
    return bpf(PROG_LOAD, attr)


def raw_tracepoint_open(prog_fd: int) -> int:
    """Link an LSM/tracing program to its attach_btf_id; returns a pinnable bpf_link fd."""
    return bpf(RAW_TRACEPOINT_OPEN, _attr("=QI", 0, prog_fd))


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int = F_ALLOW_MULTI) -> None:
    bpf(PROG_ATTACH, _attr("=IIIII", target_fd, prog_fd, attach_type, flags, 0))


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    bpf(PROG_DETACH, _attr("=IIIII", target_fd, prog_fd, attach_type, 0, 0))


def prog_query(target_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """IDs of the programs attached directly to a cgroup for one attach type; EFFECTIVE: those
    that run for it, inherited from its ancestors too (BPF_F_QUERY_EFFECTIVE)."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr("=IIIIQI", target_fd, attach_type, 1 if effective else 0, 0, ctypes.addressof(ids), 64)
    bpf(PROG_QUERY, attr)
    count = struct.unpack_from("=I", attr, 24)[0]
    return list(ids[:count])


def prog_fd_by_id(prog_id: int) -> int:
    return bpf(PROG_GET_FD_BY_ID, _attr("=III", prog_id, 0, 0))


def map_fd_by_id(map_id: int) -> int:
    return bpf(MAP_GET_FD_BY_ID, _attr("=III", map_id, 0, 0))


def prog_info(fd: int) -> dict:
    """type, id and name of a loaded program (struct bpf_prog_info, first fields)."""
    info = ctypes.create_string_buffer(256)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, 256, ctypes.addressof(info)))
    prog_type, prog_id = struct.unpack_from("=II", info, 0)
    name = struct.unpack_from("=16s", info, 64)[0].split(b"\0")[0].decode()
    return {"type": prog_type, "id": prog_id, "name": name}


def map_info(fd: int) -> dict:
    """struct bpf_map_info's first fields: what a pinned path holds."""
    info = ctypes.create_string_buffer(128)
    bpf(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, 128, ctypes.addressof(info)))
    t, i, ks, vs, me, fl = struct.unpack_from("=6I", info, 0)
    name = struct.unpack_from("=16s", info, 24)[0].split(b"\0")[0].decode()
    return {"type": t, "id": i, "key_size": ks, "value_size": vs, "max_entries": me, "flags": fl,
            "name": name}
