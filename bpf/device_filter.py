"""cgroup v2 device control: OCI linux.resources.devices as a BPF_PROG_TYPE_CGROUP_DEVICE program.

cgroup v2 has no devices.allow; the kernel asks a BPF program attached to the task's cgroup
instead. The program is assembled here instruction by instruction (no compiler, no bcc): a
container start only loads and attaches it (bench/README.md). OCI semantics: rules apply in
order, later rules override earlier ones, anything no rule matches is denied. The program
therefore tests the rules from last to first and returns the first match's verdict, falling
back to deny.
"""

from __future__ import annotations

import errno
import os
import struct

from stockade.bpf import bpfsys
from stockade.runtime.errors import NotSupported, SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol

    class DeviceRule(Protocol):
        """runtime.resources.DeviceRule: an OCI device rule, validated there."""

        allow: bool
        type: str  # a, b or c
        major: int | None  # None: any
        minor: int | None
        access: str  # letters from "rwm"

PROG_NAME = "stockade_device"

# struct bpf_cgroup_dev_ctx { u32 access_type /* (access << 16) | type */; u32 major; u32 minor; }
_DEV_BLOCK, _DEV_CHAR = 1, 2
_TYPE_CODES = {"a": None, "b": _DEV_BLOCK, "c": _DEV_CHAR}  # linux.DEVICE_RULE_TYPES
_ACC = {"m": 1, "r": 2, "w": 4}

# opcodes (include/uapi/linux/bpf.h, bpf_common.h)
_LDXW = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_STW_IMM, _STDW_IMM, _STXW, _STXDW = 0x62, 0x7A, 0x63, 0x7B
_MOV64_REG, _MOV64_IMM, _ADD64_IMM = 0xBF, 0xB7, 0x07
_AND64_IMM, _RSH64_IMM = 0x57, 0x77
_JNE_IMM, _JEQ_IMM, _JA = 0x55, 0x15, 0x05
_LD_IMM64, _CALL, _EXIT = 0x18, 0x85, 0x95
_PSEUDO_MAP_FD = 1
# helpers
_KTIME_GET_NS, _GET_CURRENT_PID_TGID, _GET_CURRENT_COMM = 5, 14, 16
_GET_CURRENT_CGROUP_ID, _RINGBUF_OUTPUT = 80, 130
# struct stk_event and enum stk_hook of stockade.h, spelled out here rather than taken from
# stockade.bpf.abi, whose import every container start would pay; tests/test_bpf_abi.py checks
# them (and where the assembled program stores each field) against the header
_H_DEVICE = 7       # STK_H_DEVICE
_EVENT_SIZE = 200   # sizeof(struct stk_event)
_EV_TS, _EV_CGID, _EV_PID, _EV_HOOK, _EV_FAMILY, _EV_ARG0, _EV_ARG1, _EV_ADDR, _EV_COMM = (
    0, 8, 16, 20, 28, 32, 36, 40, 56)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("=BBhi", code, (src << 4) | dst, off, imm)


class _Asm:
    """Instructions with symbolic jump targets, resolved when the program is done."""

    def __init__(self) -> None:
        self.code: list[tuple] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> None:
        self.code.append((code, dst, src, off, imm, None))

    def jump(self, code: int, dst: int, imm: int, target: str) -> None:
        self.code.append((code, dst, 0, 0, imm, target))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def referenced(self, name: str) -> bool:
        return any(insn[5] == name for insn in self.code)

    def bytes(self) -> bytes:
        out = []
        for pc, (code, dst, src, off, imm, target) in enumerate(self.code):
            if target is not None:
                off = self.labels[target] - pc - 1
            out.append(_insn(code, dst, src, off, imm))
        return b"".join(out)


def _rule_fields(rule: DeviceRule) -> tuple[bool, int | None, int | None, int | None, int]:
    """A rule as runtime.resources validated it (DeviceRule: allow, type a/b/c, major and minor
    or None for any, access letters from "rwm"): the one place device rules are checked."""
    mask = 0
    for letter in rule.access:
        mask |= _ACC[letter]
    return rule.allow, _TYPE_CODES[rule.type], rule.major, rule.minor, mask


def assemble(rules: list[DeviceRule], events_fd: int | None = None) -> bytes:
    """The program text for a rule list (validated DeviceRules, in OCI order).

    Registers: r6 = access_type, r7 = major, r8 = minor, r9 = type, r4 = access (r6-r9 survive
    helper calls). With EVENTS_FD (the agent's pinned ring buffer), a denial is logged first.
    """
    asm = _Asm()
    asm.op(_LDXW, dst=6, src=1, off=0)      # r6 = ctx->access_type
    asm.op(_LDXW, dst=7, src=1, off=4)      # r7 = ctx->major
    asm.op(_LDXW, dst=8, src=1, off=8)      # r8 = ctx->minor
    asm.op(_MOV64_REG, dst=9, src=6)        # r9 = type = access_type & 0xffff
    asm.op(_AND64_IMM, dst=9, imm=0xFFFF)
    asm.op(_MOV64_REG, dst=4, src=6)        # r4 = access = access_type >> 16
    asm.op(_RSH64_IMM, dst=4, imm=16)
    for index in reversed(range(len(rules))):
        allow, type_code, major, minor, mask = _rule_fields(rules[index])
        if _rule_block(asm, index, allow, type_code, major, minor, mask):
            # a rule matching everything decides alone: nothing after it is reachable, and the
            # verifier rejects unreachable code
            if not asm.referenced("deny"):
                return asm.bytes()
            break
    else:
        asm.jump(_JA, 0, 0, "deny")
    asm.label("deny")
    if events_fd is not None:
        _log_denial(asm, events_fd)
    asm.op(_MOV64_IMM, dst=0, imm=0)
    asm.op(_EXIT)
    return asm.bytes()


def _rule_block(asm: _Asm, index: int, allow: bool, type_code: int | None, major: int | None,
                minor: int | None, mask: int) -> bool:
    """Tests that jump to the next rule on mismatch, then the verdict; True when unconditional.

    An allow rule matches when every requested access is in its set; a deny rule matches when
    any requested access is in its set (so "deny w" blocks an O_RDWR open).
    """
    nxt = f"rule{index}"
    tests = 0
    if type_code is not None:
        asm.jump(_JNE_IMM, 9, type_code, nxt)
        tests += 1
    if mask != 7:
        asm.op(_MOV64_REG, dst=3, src=4)
        asm.op(_AND64_IMM, dst=3, imm=(~mask & 7) if allow else mask)
        asm.jump(_JNE_IMM if allow else _JEQ_IMM, 3, 0, nxt)
        tests += 1
    if major is not None:
        asm.jump(_JNE_IMM, 7, major, nxt)
        tests += 1
    if minor is not None:
        asm.jump(_JNE_IMM, 8, minor, nxt)
        tests += 1
    if allow:
        asm.op(_MOV64_IMM, dst=0, imm=1)
        asm.op(_EXIT)
    else:
        asm.jump(_JA, 0, 0, "deny")
    asm.label(nxt)
    return tests == 0


def _log_denial(asm: _Asm, events_fd: int) -> None:
    """Build a struct stk_event on the stack and bpf_ringbuf_output() it (see stockade.h).

    The event is zeroed first, so its decision is STK_DENIED (0) and the rest of addr empty."""
    base = -_EVENT_SIZE
    for off in range(base, 0, 8):
        asm.op(_STDW_IMM, dst=10, off=off, imm=0)
    asm.op(_CALL, imm=_KTIME_GET_NS)
    asm.op(_STXDW, dst=10, src=0, off=base + _EV_TS)
    asm.op(_CALL, imm=_GET_CURRENT_CGROUP_ID)
    asm.op(_STXDW, dst=10, src=0, off=base + _EV_CGID)
    asm.op(_CALL, imm=_GET_CURRENT_PID_TGID)
    asm.op(_RSH64_IMM, dst=0, imm=32)
    asm.op(_STXW, dst=10, src=0, off=base + _EV_PID)
    asm.op(_STW_IMM, dst=10, off=base + _EV_HOOK, imm=_H_DEVICE)
    asm.op(_STXW, dst=10, src=9, off=base + _EV_FAMILY)    # family := device type
    asm.op(_STXW, dst=10, src=7, off=base + _EV_ARG0)      # arg0 := major
    asm.op(_STXW, dst=10, src=8, off=base + _EV_ARG1)      # arg1 := minor
    asm.op(_MOV64_REG, dst=2, src=6)
    asm.op(_RSH64_IMM, dst=2, imm=16)
    asm.op(_STXW, dst=10, src=2, off=base + _EV_ADDR)      # addr[0] := access bits
    asm.op(_MOV64_REG, dst=1, src=10)
    asm.op(_ADD64_IMM, dst=1, imm=base + _EV_COMM)
    asm.op(_MOV64_IMM, dst=2, imm=16)
    asm.op(_CALL, imm=_GET_CURRENT_COMM)                   # comm
    asm.op(_LD_IMM64, dst=1, src=_PSEUDO_MAP_FD, imm=events_fd)
    asm.op(0, 0, 0, 0, 0)                                  # second half of ld_imm64
    asm.op(_MOV64_REG, dst=2, src=10)
    asm.op(_ADD64_IMM, dst=2, imm=base)
    asm.op(_MOV64_IMM, dst=3, imm=_EVENT_SIZE)
    asm.op(_MOV64_IMM, dst=4, imm=0)
    asm.op(_CALL, imm=_RINGBUF_OUTPUT)


def _events_map(pin_dir: str | None = None) -> int | None:
    """The agent's event ring, when it runs: denials are then logged like every other layer's."""
    try:  # not through bpf.maps, which a start without a BPF policy does not import
        return bpfsys.obj_get(bpfsys.pin_path("stk_events", pin_dir))
    except OSError:
        return None


def _open_cgroup(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise SpecError(f"cannot open cgroup directory: {e.strerror}", where=path,
                        hint="create the container's cgroup in the unified hierarchy first") from None


def attached_device_programs(cgroup_fd: int) -> list[int]:
    """IDs of Stockade device programs attached directly to a cgroup."""
    ours = []
    for prog_id in bpfsys.prog_query(cgroup_fd, bpfsys.CGROUP_DEVICE):
        try:
            fd = bpfsys.prog_fd_by_id(prog_id)
        except bpfsys.BpfError:
            continue
        try:
            if bpfsys.prog_info(fd)["name"] == PROG_NAME:
                ours.append(prog_id)
        finally:
            os.close(fd)
    return ours


def attach_device_filter(
    cgroup_unified_path: str, rules: list[DeviceRule], pin_dir: str | None = None, replace: bool = True
) -> None:
    """Attach (or replace) the container's device filter on its unified-hierarchy cgroup.

    When the agent runs, denials go to its event ring (PIN_DIR: the agent's pin directory).
    replace=False for a cgroup just created: nothing to look up and detach (the query waits on
    the cgroup mutex, which a busy host holds often; bench/README.md).
    """
    events_fd = _events_map(pin_dir)
    try:
        insns = assemble(rules, events_fd)
        prog_fd = bpfsys.prog_load(bpfsys.PROG_CGROUP_DEVICE, insns, name=PROG_NAME)
    except bpfsys.BpfError as e:
        raise NotSupported(f"the kernel refused the device filter program: {e.strerror}",
                           where="linux.resources.devices",
                           hint="cgroup device programs need CONFIG_CGROUP_BPF") from None
    finally:
        if events_fd is not None:
            os.close(events_fd)
    cgroup_fd = _open_cgroup(cgroup_unified_path)
    try:
        previous = attached_device_programs(cgroup_fd) if replace else []
        bpfsys.prog_attach(cgroup_fd, prog_fd, bpfsys.CGROUP_DEVICE, bpfsys.F_ALLOW_MULTI)
        # the new filter is live before the old one goes, so there is no unfiltered moment
        for prog_id in previous:
            _detach_id(cgroup_fd, prog_id)
    finally:
        os.close(cgroup_fd)
        os.close(prog_fd)


def detach_device_filter(cgroup_unified_path: str) -> int:
    """Remove Stockade's device programs from a cgroup; returns how many were attached."""
    cgroup_fd = _open_cgroup(cgroup_unified_path)
    try:
        previous = attached_device_programs(cgroup_fd)
        for prog_id in previous:
            _detach_id(cgroup_fd, prog_id)
        return len(previous)
    finally:
        os.close(cgroup_fd)


def _detach_id(cgroup_fd: int, prog_id: int) -> None:
    try:
        fd = bpfsys.prog_fd_by_id(prog_id)
    except bpfsys.BpfError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        bpfsys.prog_detach(cgroup_fd, fd, bpfsys.CGROUP_DEVICE)
    finally:
        os.close(fd)
