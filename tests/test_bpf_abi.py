"""The BPF ABI has one source, bpf/stockade.h: the Python side (stockade.bpf.abi, the maps and
events code built on it, the device filter's own copy of the event layout) must agree with it
constant by constant and byte by byte. The header is compiled with gcc against small stand-ins
for bcc's macros and helpers, and the compiler reports every #define, enumerator, struct size
and field offset; the header is parsed only for the names to ask about.

The bpf(2) numbers the Python side hand-copies from <linux/bpf.h> (commands, map, program and
attach types, helpers) are checked the same way against the installed uapi header."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import pytest
from stockade.bpf import abi, bpfsys, device_filter, events, maps
from stockade.runtime.resources import DeviceRule

HEADER = Path(__file__).resolve().parent.parent / "bpf" / "stockade.h"
TEXT = HEADER.read_text()
# numeric #defines the Python side has no use for (why in the value)
HEADER_ONLY = {
    "STK_MAX_DEPTH": "how far the programs walk up the cgroup tree",
    "STK_OBJ_LEN": "the size of stk_event.object, checked with the event layout",
}
NOT_SHARED = {"stk_events_table_t"}  # bcc's shape of the ring buffer table, not data
# enum stk_hook names whose event name is not the enumerator in lower case
HOOK_NAMES = {"STK_H_BPRM_CHECK": "bprm_check_security", "STK_H_PTRACE": "ptrace_access_check",
              "STK_H_MODULE_REQUEST": "kernel_module_request"}
BCC_STANDINS = r"""
#include <stddef.h>
#include <stdio.h>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#define __always_inline inline __attribute__((always_inline))
#define BPF_TABLE_PINNED(_type, _key, _leaf, _name, _entries, _path, ...) \
    struct { _leaf *(*lookup)(_key *); } _name
u64 bpf_get_current_ancestor_cgroup_id(int level);
u64 bpf_ktime_get_ns(void);
u64 bpf_get_current_pid_tgid(void);
long bpf_get_current_comm(void *buf, u32 size);
"""


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def _defines() -> list[str]:
    """Object-like STK_* macros with a numeric value (not STK_PIN_DIR, a string)."""
    found = re.findall(r"^#define\s+(STK_\w+)\s+([^\s\"].*)$", _strip_comments(TEXT), re.M)
    return [name for name, _ in found]


def _hooks() -> list[str]:
    body = re.search(r"enum stk_hook\s*\{(.*?)\};", TEXT, re.S).group(1)
    return re.findall(r"\b(STK_H_\w+)", body)


def _structs() -> dict[str, list[str]]:
    """{struct name: field names} for the shared structs."""
    out = {}
    for name, body in re.findall(r"struct (stk_\w+)\s*\{(.*?)\};", _strip_comments(TEXT), re.S):
        if name not in NOT_SHARED:
            out[name] = [re.search(r"(\w+)\s*(\[[^\]]*\])?\s*$", decl).group(1)
                         for decl in body.split(";") if decl.strip()]
    return out


def _tables() -> dict[str, tuple[str, str, str, str, str]]:
    """{map name: (bcc type, key type, leaf type, max entries, flags)} of BPF_TABLE_PINNED."""
    pattern = (r'BPF_TABLE_PINNED\(\s*"(\w+)",\s*([^,]+?),\s*([^,]+?),\s*(\w+),\s*([^,]+?),'
               r"\s*[^,)]+?(?:,\s*(\w+))?\s*\);")
    return {m[3]: (m[0], m[1], m[2], m[4], m[5]) for m in re.findall(pattern, _strip_comments(TEXT))}


def _ring() -> str:
    return re.search(r'section\("maps/ringbuf:" STK_PIN_DIR "/(\w+)"\)', TEXT).group(1)


def _compile_and_run(tmp: Path, source: str) -> dict[str, int]:
    src, exe = tmp / "probe.c", tmp / "probe"
    src.write_text(source)
    subprocess.run(["gcc", "-std=gnu11", "-w", f"-I{HEADER.parent}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in (line.rsplit(" ", 1) for line in out.splitlines())}


def _print(key: str, expr: str) -> str:
    return f'    printf("%s %lld\\n", "{key}", (long long)({expr}));\n'


@pytest.fixture(scope="module")
def c(tmp_path_factory) -> dict[str, int]:
    """What the compiler says about stockade.h: {"NAME": value, "sizeof stk_x": n,
    "offsetof stk_x.f": n, "sizeof stk_x.f": n, "key|leaf|entries MAP": n, "ring entries": n}."""
    lines = [_print(name, name) for name in _defines() + _hooks()]
    for struct_name, fields in _structs().items():
        lines.append(_print(f"sizeof {struct_name}", f"sizeof(struct {struct_name})"))
        for f in fields:
            lines.append(_print(f"offsetof {struct_name}.{f}", f"offsetof(struct {struct_name}, {f})"))
            lines.append(_print(f"sizeof {struct_name}.{f}", f"sizeof(((struct {struct_name} *)0)->{f})"))
    for name, (_kind, key, leaf, entries, _flags) in _tables().items():
        lines += [_print(f"key {name}", f"sizeof({key})"), _print(f"leaf {name}", f"sizeof({leaf})"),
                  _print(f"entries {name}", entries)]
    lines.append(_print("ring entries", f"{_ring()}.max_entries"))
    main = "int main(void)\n{\n" + "".join(lines) + "    return 0;\n}\n"
    return _compile_and_run(tmp_path_factory.mktemp("abi"), BCC_STANDINS + '#include "stockade.h"\n\n' + main)


def test_the_header_is_read_whole(c: dict[str, int]) -> None:
    # a parse that silently found nothing would make every other test pass
    assert len(_defines()) >= 20 and len(_hooks()) >= 27
    assert set(_structs()) == set(abi.FIELDS)
    assert set(_tables()) | {_ring()} == set(maps.MAPS)


def test_constants(c: dict[str, int]) -> None:
    for name in _defines():
        if name in HEADER_ONLY:
            continue
        mirrored = name.removeprefix("STK_")
        assert hasattr(abi, mirrored), f"{name} from stockade.h has no abi.{mirrored}"
        assert getattr(abi, mirrored) == c[name], name
    # and the other way: every abi constant named after the header is in it
    for attr in dir(abi):
        if re.fullmatch(r"(F|ACC|MODE)_\w+|NET_INLINE|DENIED|AUDITED", attr):
            assert f"STK_{attr}" in c, f"abi.{attr} is not in stockade.h"


def test_hook_numbers(c: dict[str, int]) -> None:
    hooks = _hooks()
    assert len(abi.HOOKS) == max(c[h] for h in hooks) + 1 and abi.HOOKS[0] == ""
    for hook in hooks:
        want = HOOK_NAMES.get(hook, hook.removeprefix("STK_H_").lower())
        assert abi.HOOKS[c[hook]] == want, hook


@pytest.mark.parametrize("name", sorted(abi.FIELDS))
def test_struct_layout(c: dict[str, int], name: str) -> None:
    layout, names = abi.FIELDS[name]
    ours = abi.fields(name)
    for field, (offset, size) in ours.items():
        assert offset == c[f"offsetof {name}.{field}"], f"{name}.{field} offset"
        assert size == c[f"sizeof {name}.{field}"], f"{name}.{field} size"
    c_fields = _structs()[name]
    if name == "stk_policy":  # then the inline rules
        assert c_fields[len(names):] == ["net"]
        assert c["offsetof stk_policy.net"] == layout.size
        assert c["sizeof stk_policy.net"] == abi.NET_INLINE * abi.NET_INLINE_RULE.size
        assert abi.POLICY_SIZE == c["sizeof stk_policy"]
    else:
        assert c_fields == list(names)
        assert layout.size == c[f"sizeof {name}"]


def test_maps(c: dict[str, int]) -> None:
    kinds = {"array": bpfsys.MAP_ARRAY, "hash": bpfsys.MAP_HASH, "lpm_trie": bpfsys.MAP_LPM_TRIE}
    flags = {"": 0, "BPF_F_NO_PREALLOC": bpfsys.F_NO_PREALLOC}
    for name, (kind, _key, _leaf, _entries, flag) in _tables().items():
        spec = maps.MAPS[name]
        assert (spec.map_type, spec.flags) == (kinds[kind], flags[flag]), name
        assert (spec.key_size, spec.value_size, spec.max_entries) == (
            c[f"key {name}"], c[f"leaf {name}"], c[f"entries {name}"]), name
    ring = maps.MAPS[_ring()]
    assert (ring.map_type, ring.max_entries) == (bpfsys.MAP_RINGBUF, c["ring entries"])


def _at(c: dict[str, int], value: bytes, struct_name: str, field: str, base: int = 0) -> int | bytes:
    """A field of a packed struct, read where the compiler put it (integers little-endian)."""
    off = base + c[f"offsetof {struct_name}.{field}"]
    raw = value[off:off + c[f"sizeof {struct_name}.{field}"]]
    return int.from_bytes(raw, "little") if len(raw) in (1, 2, 4, 8) else raw


def test_values_the_python_side_packs_land_where_the_programs_read(c: dict[str, int], tmp_path) -> None:
    rules = (maps.NetRule("10.1.0.0/16", "deny", 10, 20),)
    compiled = maps.CompiledPolicy("p", 0x3, abi.MODE_AUDIT, 0x1234_5678_9ABC, 0x2_0000_0001, 1 << 3,
                                   bind_port_min=1024, bind_port_max=4096, net_rules=rules)
    value = maps.policy_value("ctr-1", compiled, "acme")
    assert len(value) == c["sizeof stk_policy"]
    want = {"flags": 0x3, "mode": c["STK_MODE_AUDIT"], "families": 0x1234_5678_9ABC,
            "cap_deny": 0x2_0000_0001, "sock_type_deny": 1 << 3, "bind_port_min": 1024,
            "bind_port_max": 4096, "net_count": 1}
    assert {f: _at(c, value, "stk_policy", f) for f in want} == want
    assert _at(c, value, "stk_policy", "container_id").rstrip(b"\0") == b"ctr-1"
    assert _at(c, value, "stk_policy", "tenant").rstrip(b"\0") == b"acme"
    net0 = c["offsetof stk_policy.net"]
    inline = {f: _at(c, value, "stk_net_inline", f, net0) for f in ("port_min", "port_max", "action")}
    assert inline == {"port_min": 10, "port_max": 20, "action": 1}
    v4_mapped = bytes(10) + b"\xff\xff" + bytes([10, 1, 0, 0])
    assert _at(c, value, "stk_net_inline", "addr", net0) == v4_mapped
    assert _at(c, value, "stk_net_inline", "mask", net0) == b"\xff" * 14 + bytes(2)
    trie = maps.policy_value("c", maps.CompiledPolicy(
        "t", 0, 0, 0, 0, 0, net_rules=tuple(maps.NetRule(f"10.{i}.0.0/16", "deny")
                                            for i in range(c["STK_NET_INLINE"] + 1))))
    assert _at(c, trie, "stk_policy", "flags") & c["STK_F_EGRESS_TRIE"]

    cgid = (7 << 32) | 9
    key = maps.net_key(cgid, "10.1.0.0/16")
    assert {f: _at(c, key, "stk_net_key", f) for f in ("prefixlen", "cgid_lo", "cgid_hi")} == {
        "prefixlen": 64 + 96 + 16, "cgid_lo": 9, "cgid_hi": 7}
    assert _at(c, key, "stk_net_key", "addr") == v4_mapped
    rule = maps._net_rule(rules[0])
    assert [_at(c, rule, "stk_net_rule", f) for f in ("action", "port_min", "port_max")] == [1, 10, 20]
    frule = maps._file_rule(maps.FileRule("/x", deny=c["STK_ACC_WRITE"], allow=c["STK_ACC_EXEC"]))
    assert [_at(c, frule, "stk_file_rule", f) for f in ("deny", "allow")] == [2, 4]
    (tmp_path / "f").write_text("x")
    st = os.stat(tmp_path / "f")
    fkey = maps._file_key(cgid, str(tmp_path / "f"))
    assert [_at(c, fkey, "stk_file_key", f) for f in ("cgid", "ino", "dev")] == [
        cgid, st.st_ino, (os.major(st.st_dev) << 20) | os.minor(st.st_dev)]
    config = maps._config(cgid, 3, cgid + 1, 2)
    fields = ("root_cgid", "root_level", "alt_cgid", "alt_level")
    assert [_at(c, config, "stk_config", f) for f in fields] == [cgid, 3, cgid + 1, 2]


def test_events_are_read_where_the_programs_write(c: dict[str, int]) -> None:
    raw = bytearray(c["sizeof stk_event"])

    def put(field: str, value: int | bytes) -> None:
        off, size = c[f"offsetof stk_event.{field}"], c[f"sizeof stk_event.{field}"]
        data = value.ljust(size, b"\0") if isinstance(value, bytes) else value.to_bytes(size, "little")
        raw[off:off + size] = data

    for field, value in (("ts_ns", 5_000_000_000), ("cgid", 77), ("pid", 4242), ("hook", c["STK_H_CONNECT4"]),
                         ("decision", c["STK_AUDITED"]), ("family", 2), ("arg0", 8080), ("arg1", 6),
                         ("addr", bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])), ("comm", b"curl"),
                         ("object", b"")):
        put(field, value)
    event = events.decode(bytes(raw), 0.0, {77: {"container_id": "ctr", "tenant": "t"}})
    assert (event.time, event.cgroup_id, event.pid, event.comm) == (5.0, 77, 4242, "curl")
    assert (event.hook, event.decision, event.object) == ("connect4", "audited", "192.0.2.1:8080")
    assert (event.container_id, event.tenant) == ("ctr", "t")


def test_the_device_filter_logs_stk_events(c: dict[str, int]) -> None:
    """The hand-assembled device program (its own copy of the event layout, see there) writes
    each field at stk_event's offset, with the header's hook number and event size."""
    assert device_filter._H_DEVICE == c["STK_H_DEVICE"]
    assert device_filter._EVENT_SIZE == c["sizeof stk_event"]
    copied = {"ts_ns": "_EV_TS", "cgid": "_EV_CGID", "pid": "_EV_PID", "hook": "_EV_HOOK",
              "family": "_EV_FAMILY", "arg0": "_EV_ARG0", "arg1": "_EV_ARG1", "addr": "_EV_ADDR",
              "comm": "_EV_COMM"}
    for field, name in copied.items():
        assert getattr(device_filter, name) == c[f"offsetof stk_event.{field}"], name
    insns = device_filter.assemble([DeviceRule(True, "c", 1, 3)], events_fd=3)
    stores = {struct.unpack_from("=h", insns, i + 2)[0] for i in range(0, len(insns), 8)
              if insns[i] in (0x62, 0x63, 0x7B)}  # STW_IMM, STXW, STXDW from r10 (the stack)
    base = -c["sizeof stk_event"]
    for field in ("ts_ns", "cgid", "pid", "hook", "family", "arg0", "arg1", "addr"):
        assert base + c[f"offsetof stk_event.{field}"] in stores, field
    assert c["STK_DENIED"] == 0  # the program zeroes the event and leaves the decision at that


# --- bpf(2) numbers from the kernel's uapi header --------------------------------------------

UAPI = {  # bpfsys / device_filter name: <linux/bpf.h> name
    **{n: f"BPF_{n}" for n in (
        "MAP_CREATE", "MAP_LOOKUP_ELEM", "MAP_UPDATE_ELEM", "MAP_DELETE_ELEM", "MAP_GET_NEXT_KEY",
        "PROG_LOAD", "OBJ_PIN", "OBJ_GET", "PROG_ATTACH", "PROG_DETACH", "PROG_GET_FD_BY_ID",
        "MAP_GET_FD_BY_ID", "OBJ_GET_INFO_BY_FD", "PROG_QUERY", "RAW_TRACEPOINT_OPEN", "ANY", "NOEXIST",
        "CGROUP_INET_SOCK_CREATE", "CGROUP_DEVICE", "CGROUP_INET4_BIND", "CGROUP_INET6_BIND",
        "CGROUP_INET4_CONNECT", "CGROUP_INET6_CONNECT", "CGROUP_UDP4_SENDMSG", "CGROUP_UDP6_SENDMSG",
        "CGROUP_SYSCTL", "LSM_MAC", "F_ALLOW_MULTI", "F_NO_PREALLOC")},
    "MAP_HASH": "BPF_MAP_TYPE_HASH", "MAP_ARRAY": "BPF_MAP_TYPE_ARRAY",
    "MAP_LPM_TRIE": "BPF_MAP_TYPE_LPM_TRIE", "MAP_RINGBUF": "BPF_MAP_TYPE_RINGBUF",
    "PROG_CGROUP_SOCK": "BPF_PROG_TYPE_CGROUP_SOCK", "PROG_CGROUP_DEVICE": "BPF_PROG_TYPE_CGROUP_DEVICE",
    "PROG_CGROUP_SOCK_ADDR": "BPF_PROG_TYPE_CGROUP_SOCK_ADDR",
    "PROG_CGROUP_SYSCTL": "BPF_PROG_TYPE_CGROUP_SYSCTL", "PROG_LSM": "BPF_PROG_TYPE_LSM",
    "_KTIME_GET_NS": "BPF_FUNC_ktime_get_ns", "_GET_CURRENT_PID_TGID": "BPF_FUNC_get_current_pid_tgid",
    "_GET_CURRENT_COMM": "BPF_FUNC_get_current_comm",
    "_GET_CURRENT_CGROUP_ID": "BPF_FUNC_get_current_cgroup_id", "_RINGBUF_OUTPUT": "BPF_FUNC_ringbuf_output",
    "_DEV_BLOCK": "BPF_DEVCG_DEV_BLOCK", "_DEV_CHAR": "BPF_DEVCG_DEV_CHAR",
}
DEVICE_ACCESS = {"m": "BPF_DEVCG_ACC_MKNOD", "r": "BPF_DEVCG_ACC_READ", "w": "BPF_DEVCG_ACC_WRITE"}


def test_bpf_uapi_numbers(tmp_path) -> None:
    lines = "".join(_print(name, name) for name in [*UAPI.values(), *DEVICE_ACCESS.values()])
    kernel = _compile_and_run(tmp_path, f"#include <stdio.h>\n#include <linux/bpf.h>\nint main(void)\n{{\n"
                                        f"{lines}    return 0;\n}}\n")
    for ours, uapi in UAPI.items():
        module = device_filter if ours.startswith("_") else bpfsys
        assert getattr(module, ours) == kernel[uapi], f"{module.__name__}.{ours} != {uapi}"
    assert device_filter._ACC == {letter: kernel[uapi] for letter, uapi in DEVICE_ACCESS.items()}
