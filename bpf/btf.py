"""BTF (BPF Type Format): what the running kernel's vmlinux BTF says, without libbpf or bcc.

An LSM program is loaded against the BTF id of its hook's bpf_lsm_<hook> function (the
attach_btf_id of BPF_PROG_LOAD), and the kernel's enums (bpf_cmd, bpf_map_type, bpf_func_id,
bpf_attach_type) say which BPF features it has. The blob is read as include/uapi/linux/btf.h
lays it out: a header, the types (each a 12-byte struct btf_type followed by data that depends
on its kind), then the string section.
"""

from __future__ import annotations

import struct

VMLINUX = "/sys/kernel/btf/vmlinux"
_MAGIC = 0xEB9F
_KIND_ENUM, _KIND_FUNC, _KIND_ENUM64 = 6, 12, 19
# Bytes of kind-specific data after each btf_type, by kind: (fixed, per entry); vlen = entries.
_EXTRA = {
    1: (4, 0),    # INT
    3: (12, 0),   # ARRAY
    4: (0, 12),   # STRUCT
    5: (0, 12),   # UNION
    6: (0, 8),    # ENUM: name_off, val
    13: (0, 8),   # FUNC_PROTO
    14: (4, 0),   # VAR
    15: (0, 12),  # DATASEC
    17: (4, 0),   # DECL_TAG
    19: (0, 12),  # ENUM64: name_off, val_lo32, val_hi32
}


class _Blob:
    """A vmlinux BTF blob: its types in order, and the strings they name."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self.data = f.read()
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", self.data, 0)
        type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", self.data, 8)
        self.valid = magic == _MAGIC
        self.start, self.end = hdr_len + type_off, hdr_len + type_off + type_len
        self.strs = hdr_len + str_off

    def string(self, off: int) -> bytes:
        start = self.strs + off
        return self.data[start:self.data.index(b"\0", start)]

    def types(self):
        """(type id, kind, name offset, vlen, offset of the kind-specific data) for each type."""
        pos, type_id = self.start, 1
        while self.valid and pos < self.end:
            name_off, info, _ = struct.unpack_from("<III", self.data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            yield type_id, kind, name_off, vlen, pos + 12
            fixed, per_entry = _EXTRA.get(kind, (0, 0))
            pos += 12 + fixed + per_entry * vlen
            type_id += 1


def func_ids(names, path: str = VMLINUX) -> dict[str, int]:
    """{name: BTF type id} for the kernel functions among NAMES (absent ones are left out).
    OSError when PATH cannot be read (a kernel without CONFIG_DEBUG_INFO_BTF)."""
    blob = _Blob(path)
    wanted = {name.encode(): name for name in names}
    found: dict[str, int] = {}
    for type_id, kind, name_off, _vlen, _at in blob.types():
        if kind == _KIND_FUNC:
            name = wanted.get(blob.string(name_off))
            if name is not None and name not in found:
                found[name] = type_id
                if len(found) == len(wanted):
                    break
    return found


def func_id(name: str, path: str = VMLINUX) -> int | None:
    """The BTF type id of kernel function NAME, or None when the kernel has no such function."""
    return func_ids((name,), path).get(name)


def names(prefix: str = "bpf_lsm_", path: str = VMLINUX) -> tuple[set[str], dict[str, set[str]]]:
    """(the kernel functions named PREFIX..., {enum name: its enumerators}) in one pass: with the
    default prefix, the LSM hooks a BPF program can attach to. OSError as func_ids."""
    blob = _Blob(path)
    funcs: set[str] = set()
    enums: dict[str, set[str]] = {}
    want = prefix.encode()
    for _type_id, kind, name_off, vlen, at in blob.types():
        if kind == _KIND_FUNC:
            name = blob.string(name_off)
            if name.startswith(want):
                funcs.add(name.decode())
        elif kind in (_KIND_ENUM, _KIND_ENUM64):
            step = 8 if kind == _KIND_ENUM else 12  # each entry starts with its name offset
            members = enums.setdefault(blob.string(name_off).decode(), set())
            for entry in range(at, at + step * vlen, step):
                members.add(blob.string(struct.unpack_from("<I", blob.data, entry)[0]).decode())
    return funcs, enums
