"""OCI LinuxSeccomp -> classic BPF program (libseccomp, cached) and its installation with seccomp(2).

The container start path calls `compile_program` in the parent before fork and `load_program` in the
init as the last step before execve. On a cache hit nothing heavier than hashlib and ctypes is
imported: the libseccomp Python bindings (`seccomp`) are imported only to compile.

Decisions (documented because runtimes differ):
- Unknown syscall names are refused (SpecError naming the rule), unlike runc which skips them, since
  a typo in a deny rule would weaken the filter in silence. The one exception: names of real Linux
  syscalls newer than this libseccomp (`NEWER_SYSCALLS`) are skipped in rules that are *less*
  restrictive than the default action (an allow rule under a deny default), because skipping them
  can only make the filter stricter. In any other rule they are refused.
- Rules whose action equals the default action are dropped (they change nothing; libseccomp refuses
  them), like runc does.
- Several conditions on the same argument index in one rule are OR-ed (one libseccomp rule each),
  conditions on distinct indexes are AND-ed: runc's semantics.
- SCMP_ACT_NOTIFY and listenerPath are refused (no seccomp agent support).
- The binary-tree optimisation (SCMP_FLTATR_CTL_OPTIMIZE=2) is always used: libseccomp >= 2.5 has it.
"""

from __future__ import annotations

import ctypes
import os
import struct

from stockade.runtime._lite import json as jsonlite
from stockade.runtime._lite.hashlib import sha256
from stockade.runtime.errors import NotSupported, SpecError

COMPILER_VERSION = "1"  # bump when the compile logic changes: part of the cache key

ACTIONS = (
    "SCMP_ACT_KILL",
    "SCMP_ACT_KILL_THREAD",
    "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE",
    "SCMP_ACT_ALLOW",
    "SCMP_ACT_LOG",
)
# How permissive an action is: higher lets more through. Used to decide when skipping a name is safe.
_PERMISSIVENESS = {
    "SCMP_ACT_KILL": 0,
    "SCMP_ACT_KILL_THREAD": 0,
    "SCMP_ACT_KILL_PROCESS": 0,
    "SCMP_ACT_TRAP": 1,
    "SCMP_ACT_ERRNO": 1,
    "SCMP_ACT_TRACE": 1,
    "SCMP_ACT_LOG": 2,
    "SCMP_ACT_ALLOW": 3,
}
OPERATORS = (
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
)
# OCI architecture name -> libseccomp Arch attribute name.
ARCHITECTURES = {
    "SCMP_ARCH_X86": "X86",
    "SCMP_ARCH_X86_64": "X86_64",
    "SCMP_ARCH_X32": "X32",
    "SCMP_ARCH_ARM": "ARM",
    "SCMP_ARCH_AARCH64": "AARCH64",
    "SCMP_ARCH_MIPS": "MIPS",
    "SCMP_ARCH_MIPS64": "MIPS64",
    "SCMP_ARCH_MIPS64N32": "MIPS64N32",
    "SCMP_ARCH_MIPSEL": "MIPSEL",
    "SCMP_ARCH_MIPSEL64": "MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32": "MIPSEL64N32",
    "SCMP_ARCH_PPC": "PPC",
    "SCMP_ARCH_PPC64": "PPC64",
    "SCMP_ARCH_PPC64LE": "PPC64LE",
    "SCMP_ARCH_S390": "S390",
    "SCMP_ARCH_S390X": "S390X",
    "SCMP_ARCH_PARISC": "PARISC",
    "SCMP_ARCH_PARISC64": "PARISC64",
    "SCMP_ARCH_RISCV64": "RISCV64",
    "SCMP_ARCH_LOONGARCH64": "LOONGARCH64",
    "SCMP_ARCH_M68K": "M68K",
    "SCMP_ARCH_SH": "SH",
    "SCMP_ARCH_SHEB": "SHEB",
}
# seccomp(2) filter flags (linux/seccomp.h). WAIT_KILLABLE_RECV and NEW_LISTENER belong to
# SCMP_ACT_NOTIFY, which is not supported.
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}
# Real Linux syscalls (up to 6.18) that libseccomp 2.5.4 cannot resolve. See the module docstring.
NEWER_SYSCALLS = frozenset(
    {
        "statmount",
        "listmount",
        "lsm_get_self_attr",
        "lsm_set_self_attr",
        "lsm_list_modules",
        "mseal",
        "setxattrat",
        "getxattrat",
        "listxattrat",
        "removexattrat",
        "open_tree_attr",
        "uretprobe",
        "file_getattr",
        "file_setattr",
        "riscv_hwprobe",
    }
)

_SECCOMP_SET_MODE_FILTER = 1
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "ppc64le": 358, "s390x": 348}
_BPF_MAXINSNS = 4096
_CACHE_MAGIC = b"STKSCMP1"


# ---------------------------------------------------------------------------------------------
# compile


def compile_program(config: dict, where: str = "linux.seccomp") -> bytes:
    """OCI LinuxSeccomp dict -> raw BPF program bytes, from the cache when possible."""
    _validate(config, where)
    key = _cache_key(config)
    path = os.path.join(cache_dir(), key + ".bpf")
    program = _cache_read(path)
    if program is None:
        program = _compile(config, where)
        _cache_write(path, program)
    return program


def cache_dir() -> str:
    return os.environ.get("STOCKADE_CACHE_DIR") or "/var/cache/stockade/seccomp"


def instruction_count(program: bytes) -> int:
    return len(program) // 8


def _canonical(config: dict) -> bytes:
    return jsonlite.dumps(config, sort_keys=True).encode()  # = json.dumps(sort_keys, (",", ":"))


def _cache_key(config: dict) -> str:
    digest = sha256(_canonical(config))
    digest.update(f"|{libseccomp_version()}|{os.uname().machine}|{COMPILER_VERSION}".encode())
    return digest.hexdigest()


def _cache_read(path: str) -> bytes | None:
    """The cached program, or None when absent or corrupt (a corrupt entry is recompiled)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    head = len(_CACHE_MAGIC) + 32
    if len(data) <= head or not data.startswith(_CACHE_MAGIC):
        return None
    program = data[head:]
    if sha256(program).digest() != data[len(_CACHE_MAGIC) : head] or len(program) % 8:
        return None
    return program


def _cache_write(path: str, program: bytes) -> None:
    """An unwritable cache only costs the next compile."""
    from stockade.runtime.files import write_atomic

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_atomic(path, _CACHE_MAGIC + sha256(program).digest() + program, durable=True)
    except OSError:
        pass


_VERSION: str | None = None


def libseccomp_version() -> str:
    """libseccomp's runtime version through ctypes (cheap; no Python bindings import)."""
    global _VERSION
    if _VERSION is None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2")
            lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)
            v = lib.seccomp_version().contents
            _VERSION = f"{v[0]}.{v[1]}.{v[2]}"
        except (OSError, AttributeError):
            _VERSION = "unknown"
    return _VERSION


def _validate(config: dict, where: str) -> None:
    """Structure checks that need no libseccomp, so a cache hit still refuses bad input."""
    if not isinstance(config, dict):
        raise SpecError("must be an object", where=where)
    _check_action(config.get("defaultAction"), f"{where}.defaultAction")
    if config.get("listenerPath"):
        raise NotSupported(
            "seccomp user notification (listenerPath) is not supported",
            where=where,
            hint="remove listenerPath and SCMP_ACT_NOTIFY rules",
        )
    for i, arch in enumerate(config.get("architectures") or []):
        if arch not in ARCHITECTURES:
            raise SpecError(
                f"unknown architecture {arch!r}",
                where=f"{where}.architectures[{i}]",
                hint="one of " + ", ".join(ARCHITECTURES),
            )
    for i, flag in enumerate(config.get("flags") or []):
        if flag not in FLAGS:
            raise SpecError(
                f"unsupported seccomp flag {flag!r}",
                where=f"{where}.flags[{i}]",
                hint="one of " + ", ".join(FLAGS),
            )
    syscalls = config.get("syscalls") or []
    if not isinstance(syscalls, list):
        raise SpecError("must be a list", where=f"{where}.syscalls")
    for i, rule in enumerate(syscalls):
        rwhere = f"{where}.syscalls[{i}]"
        if not isinstance(rule, dict):
            raise SpecError("must be an object", where=rwhere)
        _check_action(rule.get("action"), f"{rwhere}.action")
        names = rule.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise SpecError("names must be a non-empty list of syscall names", where=f"{rwhere}.names")
        for j, arg in enumerate(rule.get("args") or []):
            check_arg(arg, f"{rwhere}.args[{j}]")


def _check_action(action: object, where: str) -> None:
    if action == "SCMP_ACT_NOTIFY":
        raise NotSupported("SCMP_ACT_NOTIFY (seccomp user notification) is not supported", where=where)
    if action not in ACTIONS:
        raise SpecError(
            f"unknown seccomp action {action!r}", where=where, hint="one of " + ", ".join(ACTIONS)
        )


def check_arg(arg: object, where: str) -> None:
    """An OCI seccomp argument condition (index, op, value, valueTwo), validated once for the
    runtime and the profile tools."""
    if not isinstance(arg, dict):
        raise SpecError("must be an object", where=where)
    index = arg.get("index")
    if not isinstance(index, int) or not 0 <= index <= 5:
        raise SpecError(f"argument index {index!r} out of range", where=f"{where}.index", hint="0..5")
    if arg.get("op") not in OPERATORS:
        raise SpecError(
            f"unknown operator {arg.get('op')!r}", where=f"{where}.op", hint="one of " + ", ".join(OPERATORS)
        )
    for field in ("value", "valueTwo"):
        value = arg.get(field, 0)
        if not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise SpecError(f"{field} {value!r} is not an unsigned 64-bit integer", where=f"{where}.{field}")


def _errno(value: object, where: str) -> int:
    errno = 1 if value is None else value  # EPERM, like runc and Docker
    if not isinstance(errno, int) or not 0 <= errno <= 4095:
        raise SpecError(f"errno {value!r} out of range", where=where, hint="0..4095")
    return errno


def _action(sc, name: str, errno_ret: object, where: str) -> int:  # noqa: ANN001 - sc is the module
    if name == "SCMP_ACT_ERRNO":
        return sc.ERRNO(_errno(errno_ret, where))
    if name == "SCMP_ACT_TRACE":
        return sc.TRACE(_errno(errno_ret, where))
    return {
        "SCMP_ACT_KILL": sc.KILL,
        "SCMP_ACT_KILL_THREAD": sc.KILL,
        "SCMP_ACT_KILL_PROCESS": sc.KILL_PROCESS,
        "SCMP_ACT_TRAP": sc.TRAP,
        "SCMP_ACT_ALLOW": sc.ALLOW,
        "SCMP_ACT_LOG": sc.LOG,
    }[name]


def _compile(config: dict, where: str) -> bytes:
    import seccomp as sc  # only on a cache miss

    default = _action(sc, config["defaultAction"], config.get("defaultErrnoRet"), f"{where}.defaultErrnoRet")
    filt = sc.SyscallFilter(default)
    filt.set_attr(sc.Attr.CTL_NNP, 0)  # no_new_privs is the init's job, not libseccomp's
    try:
        filt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    except (RuntimeError, ValueError, OSError):
        pass  # older libseccomp: linear filter, still correct
    native = sc.system_arch()
    for arch_name in config.get("architectures") or []:
        arch = getattr(sc.Arch, ARCHITECTURES[arch_name], None)
        if arch is None:
            raise NotSupported(
                f"libseccomp {libseccomp_version()} cannot filter {arch_name}",
                where=f"{where}.architectures",
                hint="drop that architecture",
            )
        if arch != native and not filt.exist_arch(arch):
            filt.add_arch(arch)
    default_rank = _PERMISSIVENESS[config["defaultAction"]]
    for i, rule in enumerate(config.get("syscalls") or []):
        _add_rule(sc, filt, rule, f"{where}.syscalls[{i}]", config["defaultAction"], default_rank)
    import tempfile

    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        program = f.read()
    if instruction_count(program) > _BPF_MAXINSNS:
        raise SpecError(
            f"filter compiles to {instruction_count(program)} instructions, more than the "
            f"kernel's {_BPF_MAXINSNS}",
            where=where,
            hint="merge rules or drop architectures",
        )
    return program


def _add_rule(sc, filt, rule: dict, where: str, default_action: str, default_rank: int) -> None:  # noqa: ANN001
    action_name = rule["action"]
    if action_name == default_action and (
        action_name not in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE") or rule.get("errnoRet") is None
    ):
        return
    action = _action(sc, action_name, rule.get("errnoRet"), f"{where}.errnoRet")
    args = rule.get("args") or []
    conds = [
        sc.Arg(a["index"], getattr(sc, a["op"][len("SCMP_CMP_") :]), a.get("value", 0), a.get("valueTwo", 0))
        for a in args
    ]
    indexes = [a["index"] for a in args]
    groups = [conds] if len(set(indexes)) == len(indexes) else [[c] for c in conds]
    for name in rule["names"]:
        if sc.resolve_syscall(sc.Arch.NATIVE, name) == -1:
            if name in NEWER_SYSCALLS and _PERMISSIVENESS[action_name] > default_rank:
                continue  # skipping an allow only makes the filter stricter
            raise SpecError(
                f"unknown syscall name {name!r}",
                where=f"{where}.names",
                hint=f"libseccomp {libseccomp_version()} does not know it; check the spelling",
            )
        for group in groups:
            try:
                filt.add_rule(action, name, *group)
            except (RuntimeError, ValueError, OSError) as e:
                raise SpecError(
                    f"libseccomp refused the rule for {name!r}: {e}",
                    where=where,
                    hint="conflicting actions for the same syscall and arguments?",
                ) from None


# ---------------------------------------------------------------------------------------------
# load


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def load_program(program: bytes, flags: list[str]) -> None:
    """Install the filter in the calling thread (all threads with TSYNC) with seccomp(2).

    Needs no_new_privs set or CAP_SYS_ADMIN; raises OSError with the kernel's errno otherwise.
    """
    if not program or len(program) % 8:
        raise OSError(22, "seccomp program length is not a multiple of 8 bytes")
    bits = 0
    for flag in flags or []:
        if flag not in FLAGS:
            raise OSError(22, f"unsupported seccomp flag {flag!r}")
        bits |= FLAGS[flag]
    count = len(program) // 8
    insns = (_SockFilter * count).from_buffer_copy(program)
    prog = _SockFprog(count, ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
    nr = _SYS_SECCOMP.get(os.uname().machine)
    if nr is None:
        raise OSError(38, f"seccomp syscall number unknown for {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(
        ctypes.c_long(nr), ctypes.c_long(_SECCOMP_SET_MODE_FILTER), ctypes.c_long(bits), ctypes.byref(prog)
    )
    if ret != 0:
        err = ctypes.get_errno()
        if ret > 0:  # TSYNC: the id of a thread that could not be synchronised
            raise OSError(16, f"seccomp TSYNC failed for thread {ret}")
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")


def set_no_new_privs() -> None:
    """prctl(PR_SET_NO_NEW_PRIVS, 1): lets an unprivileged process install a filter."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---------------------------------------------------------------------------------------------
# features


def supported() -> dict:
    """What this host's seccomp layer accepts, for `stockade-oci features`."""
    import seccomp as sc

    known = 0
    for nr in range(0, 1024):
        try:
            sc.resolve_syscall(sc.Arch.NATIVE, nr)
        except (ValueError, RuntimeError, OverflowError):
            continue
        known += 1
    return {
        "enabled": True,
        "actions": list(ACTIONS),
        "operators": list(OPERATORS),
        "archs": list(ARCHITECTURES),
        "knownFlags": list(FLAGS) + ["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"],
        "supportedFlags": list(FLAGS),
        "libseccompVersion": libseccomp_version(),
        "knownSyscalls": known,
    }


def unpack(program: bytes) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) per instruction, for `stockade profile compile --dump`."""
    return [struct.unpack("<HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
