"""The profile model: a named, versioned bundle of a seccomp part (Docker/moby profile format, which is
a superset of OCI LinuxSeccomp) and a BPF policy part (carried as data; the BPF layer defines it).

Round trips are lossless: every field is kept with its presence (None means absent) and unknown keys
are kept in `extra`, so `Seccomp.from_dict(d).to_dict() == d` for any valid profile.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field

from stockade.runtime.defaults import OCI_DEFAULT_CAPS
from stockade.runtime.errors import SpecError
from stockade.runtime.seccomp import ACTIONS, ARCHITECTURES, check_arg

KIND = "StockadeProfile"
HERE = os.path.dirname(os.path.abspath(__file__))
BUILTIN_DIR = os.path.join(HERE, "builtin")
GALLERY_DIR = os.path.join(HERE, "gallery")

# What a container gets when nobody says otherwise (the OCI/Docker default capability set).
DEFAULT_CAPS = OCI_DEFAULT_CAPS
# Go architecture names used by moby's includes/excludes.arches.
GO_ARCHES = (
    "amd64",
    "x86",
    "x32",
    "arm",
    "arm64",
    "mips",
    "mips64",
    "mips64n32",
    "mipsel",
    "mipsel64",
    "mipsel64n32",
    "ppc",
    "ppc64",
    "ppc64le",
    "s390",
    "s390x",
    "parisc",
    "parisc64",
    "riscv64",
    "386",
    "loong64",
    "m68k",
    "sh",
    "sheb",
)
_MACHINE = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
    "i686": ("SCMP_ARCH_X86", "x86"),
}


def native_arch() -> tuple[str, str]:
    """(OCI arch name, Go arch name) of this machine."""
    return _MACHINE.get(platform.machine(), ("SCMP_ARCH_" + platform.machine().upper(), platform.machine()))


# ---------------------------------------------------------------------------------------------
# helpers for strict parsing


def _take(d: dict, key: str, kind: type | tuple, where: str, default=None):  # noqa: ANN001, ANN202
    if key not in d:
        return default
    value = d[key]
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SpecError(f"{key} has the wrong type ({type(value).__name__})", where=f"{where}.{key}")
    return value


def _str_list(d: dict, key: str, where: str) -> list[str] | None:
    value = _take(d, key, list, where)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise SpecError(f"{key} must be a list of strings", where=f"{where}.{key}")
    return value


def _put(out: dict, key: str, value) -> None:  # noqa: ANN001
    if value is not None:
        out[key] = value


# ---------------------------------------------------------------------------------------------
# seccomp part


@dataclass
class Arg:
    index: int
    value: int
    op: str
    value_two: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: object, where: str) -> Arg:
        check_arg(d, where)
        assert isinstance(d, dict)
        index, value, op = d["index"], d.get("value", 0), d["op"]
        extra = {k: v for k, v in d.items() if k not in ("index", "value", "valueTwo", "op")}
        return cls(index, value, op, d.get("valueTwo"), extra)

    def to_dict(self) -> dict:
        out = {"index": self.index, "value": self.value}
        _put(out, "valueTwo", self.value_two)
        out["op"] = self.op
        out.update(self.extra)
        return out

    def describe(self) -> str:
        sym = {
            "SCMP_CMP_NE": "!=",
            "SCMP_CMP_LT": "<",
            "SCMP_CMP_LE": "<=",
            "SCMP_CMP_EQ": "==",
            "SCMP_CMP_GE": ">=",
            "SCMP_CMP_GT": ">",
        }.get(self.op)
        if sym:
            return f"arg{self.index} {sym} {self.value:#x}"
        return f"arg{self.index} & {self.value:#x} == {self.value_two or 0:#x}"


@dataclass
class Condition:
    """moby's includes/excludes filter."""

    caps: list[str] | None = None
    arches: list[str] | None = None
    min_kernel: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: object, where: str) -> Condition:
        if not isinstance(d, dict):
            raise SpecError("must be an object", where=where)
        caps, arches = _str_list(d, "caps", where), _str_list(d, "arches", where)
        for cap in caps or []:
            if not cap.startswith("CAP_"):
                raise SpecError(
                    f"{cap!r} is not a capability name", where=f"{where}.caps", hint="like CAP_SYS_ADMIN"
                )
        for arch in arches or []:
            if arch not in GO_ARCHES:
                raise SpecError(
                    f"unknown architecture {arch!r}",
                    where=f"{where}.arches",
                    hint="Go names: " + ", ".join(GO_ARCHES),
                )
        min_kernel = _take(d, "minKernel", str, where)
        if min_kernel is not None and _kernel_tuple(min_kernel) is None:
            raise SpecError(
                f"minKernel {min_kernel!r} is not a version", where=f"{where}.minKernel", hint="like 4.8"
            )
        extra = {k: v for k, v in d.items() if k not in ("caps", "arches", "minKernel")}
        return cls(caps, arches, min_kernel, extra)

    def to_dict(self) -> dict:
        out: dict = {}
        _put(out, "caps", self.caps)
        _put(out, "arches", self.arches)
        _put(out, "minKernel", self.min_kernel)
        out.update(self.extra)
        return out

    def describe(self) -> str:
        parts = []
        if self.caps:
            parts.append("+".join(self.caps))
        if self.arches:
            parts.append("arch " + "/".join(self.arches))
        if self.min_kernel:
            parts.append("kernel>=" + self.min_kernel)
        return ", ".join(parts)


def _kernel_tuple(text: str) -> tuple[int, ...] | None:
    head = text.split("-")[0].split("+")[0]
    try:
        parts = tuple(int(p) for p in head.split(".")[:3])
    except ValueError:
        return None
    return parts if parts else None


@dataclass
class Context:
    """What a profile is resolved against: capabilities, Go arch, kernel release."""

    caps: tuple[str, ...] = DEFAULT_CAPS
    arch: str = ""
    kernel: str = ""

    def __post_init__(self) -> None:
        self.arch = self.arch or native_arch()[1]
        self.kernel = self.kernel or os.uname().release


@dataclass
class Rule:
    names: list[str]
    action: str
    errno_ret: int | None = None
    args: list[Arg] | None = None
    comment: str | None = None
    includes: Condition | None = None
    excludes: Condition | None = None
    name: str | None = None  # moby's deprecated single-name field
    extra: dict = field(default_factory=dict)

    KEYS = ("name", "names", "action", "errnoRet", "args", "comment", "includes", "excludes")

    @classmethod
    def from_dict(cls, d: object, where: str) -> Rule:
        if not isinstance(d, dict):
            raise SpecError("syscall rule must be an object", where=where)
        names = _str_list(d, "names", where)
        single = _take(d, "name", str, where)
        if not names and not single:
            raise SpecError("rule names no syscall", where=where, hint='add "names": [...]')
        action = d.get("action")
        if action not in ACTIONS and action != "SCMP_ACT_NOTIFY":
            raise SpecError(
                f"unknown seccomp action {action!r}",
                where=f"{where}.action",
                hint="one of " + ", ".join(ACTIONS),
            )
        errno_ret = _take(d, "errnoRet", int, where)
        args_raw = _take(d, "args", list, where)
        args = (
            None
            if args_raw is None
            else [Arg.from_dict(a, f"{where}.args[{i}]") for i, a in enumerate(args_raw)]
        )
        inc = d.get("includes")
        exc = d.get("excludes")
        return cls(
            names=names if names is not None else None,
            action=action,
            errno_ret=errno_ret,
            args=args,
            comment=_take(d, "comment", str, where),
            includes=None if inc is None else Condition.from_dict(inc, f"{where}.includes"),
            excludes=None if exc is None else Condition.from_dict(exc, f"{where}.excludes"),
            name=single,
            extra={k: v for k, v in d.items() if k not in cls.KEYS},
        )

    def to_dict(self) -> dict:
        out: dict = {}
        _put(out, "name", self.name)
        _put(out, "names", self.names)
        out["action"] = self.action
        _put(out, "errnoRet", self.errno_ret)
        if self.args is not None:
            out["args"] = [a.to_dict() for a in self.args]
        _put(out, "comment", self.comment)
        if self.includes is not None:
            out["includes"] = self.includes.to_dict()
        if self.excludes is not None:
            out["excludes"] = self.excludes.to_dict()
        out.update(self.extra)
        return out

    def all_names(self) -> list[str]:
        return ([self.name] if self.name else []) + list(self.names or [])

    def applies(self, ctx: Context) -> bool:
        inc, exc = self.includes, self.excludes
        kernel = _kernel_tuple(ctx.kernel) or (0,)
        if inc:
            if inc.caps and not all(c in ctx.caps for c in inc.caps):
                return False
            if inc.arches and ctx.arch not in inc.arches:
                return False
            if inc.min_kernel and kernel < (_kernel_tuple(inc.min_kernel) or (0,)):
                return False
        if exc:
            if exc.caps and any(c in ctx.caps for c in exc.caps):
                return False
            if exc.arches and ctx.arch in exc.arches:
                return False
            if exc.min_kernel and kernel >= (_kernel_tuple(exc.min_kernel) or (0,)):
                return False
        return True


@dataclass
class ArchMapEntry:
    architecture: str
    sub_architectures: list[str] | None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"architecture": self.architecture, "subArchitectures": self.sub_architectures}
        out.update(self.extra)
        return out


@dataclass
class Seccomp:
    default_action: str
    default_errno_ret: int | None = None
    architectures: list[str] | None = None
    arch_map: list[ArchMapEntry] | None = None
    flags: list[str] | None = None
    listener_path: str | None = None
    listener_metadata: str | None = None
    syscalls: list[Rule] | None = None
    extra: dict = field(default_factory=dict)

    KEYS = (
        "defaultAction",
        "defaultErrnoRet",
        "architectures",
        "archMap",
        "flags",
        "listenerPath",
        "listenerMetadata",
        "syscalls",
    )

    @classmethod
    def from_dict(cls, d: object, where: str = "seccomp") -> Seccomp:
        if not isinstance(d, dict):
            raise SpecError("seccomp profile must be an object", where=where)
        action = d.get("defaultAction")
        if action not in ACTIONS:
            raise SpecError(
                f"unknown or missing defaultAction {action!r}",
                where=f"{where}.defaultAction",
                hint="one of " + ", ".join(ACTIONS),
            )
        arches = _str_list(d, "architectures", where)
        for i, a in enumerate(arches or []):
            _check_arch(a, f"{where}.architectures[{i}]")
        arch_map = None
        raw_map = _take(d, "archMap", list, where)
        if raw_map is not None:
            arch_map = []
            for i, e in enumerate(raw_map):
                ew = f"{where}.archMap[{i}]"
                if not isinstance(e, dict):
                    raise SpecError("must be an object", where=ew)
                _check_arch(e.get("architecture"), f"{ew}.architecture")
                subs = _str_list(e, "subArchitectures", ew)
                for s in subs or []:
                    _check_arch(s, f"{ew}.subArchitectures")
                arch_map.append(
                    ArchMapEntry(
                        e["architecture"],
                        subs,
                        {k: v for k, v in e.items() if k not in ("architecture", "subArchitectures")},
                    )
                )
        rules_raw = _take(d, "syscalls", list, where)
        rules = (
            None
            if rules_raw is None
            else [Rule.from_dict(r, f"{where}.syscalls[{i}]") for i, r in enumerate(rules_raw)]
        )
        return cls(
            default_action=action,
            default_errno_ret=_take(d, "defaultErrnoRet", int, where),
            architectures=arches,
            arch_map=arch_map,
            flags=_str_list(d, "flags", where),
            listener_path=_take(d, "listenerPath", str, where),
            listener_metadata=_take(d, "listenerMetadata", str, where),
            syscalls=rules,
            extra={k: v for k, v in d.items() if k not in cls.KEYS},
        )

    def to_dict(self) -> dict:
        out: dict = {"defaultAction": self.default_action}
        _put(out, "defaultErrnoRet", self.default_errno_ret)
        _put(out, "architectures", self.architectures)
        if self.arch_map is not None:
            out["archMap"] = [e.to_dict() for e in self.arch_map]
        _put(out, "flags", self.flags)
        _put(out, "listenerPath", self.listener_path)
        _put(out, "listenerMetadata", self.listener_metadata)
        if self.syscalls is not None:
            out["syscalls"] = [r.to_dict() for r in self.syscalls]
        out.update(self.extra)
        return out

    def rules(self) -> list[Rule]:
        return list(self.syscalls or [])

    def oci_architectures(self, ctx: Context | None = None) -> list[str]:
        """The OCI architectures for this host: explicit ones, else the archMap entry of the native arch
        with its sub-architectures (x86_64 brings x86 and x32, as Docker does)."""
        if self.architectures:
            return list(self.architectures)
        native = native_arch()[0]
        for entry in self.arch_map or []:
            if entry.architecture == native:
                return [native] + list(entry.sub_architectures or [])
        return []

    def resolve(self, ctx: Context | None = None) -> dict:
        """OCI LinuxSeccomp for a container with `ctx` (capabilities, arch, kernel): conditions applied,
        rules with the same action and arguments merged, duplicate names dropped."""
        ctx = ctx or Context()
        out: dict = {"defaultAction": self.default_action}
        _put(out, "defaultErrnoRet", self.default_errno_ret)
        arches = self.oci_architectures(ctx)
        if arches:
            out["architectures"] = arches
        _put(out, "flags", self.flags)
        _put(out, "listenerPath", self.listener_path)
        _put(out, "listenerMetadata", self.listener_metadata)
        merged: dict[str, dict] = {}
        for rule in self.rules():
            if not rule.applies(ctx):
                continue
            args = [a.to_dict() for a in rule.args or []]
            key = json.dumps([rule.action, rule.errno_ret, args], sort_keys=True)
            entry = merged.setdefault(key, {"names": [], "action": rule.action})
            if rule.errno_ret is not None:
                entry["errnoRet"] = rule.errno_ret
            if args:
                entry["args"] = args
            for name in rule.all_names():
                if name not in entry["names"]:
                    entry["names"].append(name)
        out["syscalls"] = list(merged.values())
        return out

    def verdict(self, name: str, ctx: Context | None = None) -> tuple[str, int | None, bool]:
        """(action, errno, conditional) the profile gives `name` in `ctx`; conditional means argument
        checks decide (the action shown is then the one for matching arguments)."""
        ctx = ctx or Context()
        conditional: tuple[str, int | None, bool] | None = None
        for rule in self.rules():
            if name not in rule.all_names() or not rule.applies(ctx):
                continue
            if not rule.args:
                return rule.action, rule.errno_ret, False
            conditional = conditional or (rule.action, rule.errno_ret, True)
        if conditional:
            return conditional
        return self.default_action, self.default_errno_ret, False

    def names(self) -> set[str]:
        return {n for r in self.rules() for n in r.all_names()}


def _check_arch(arch: object, where: str) -> None:
    if arch not in ARCHITECTURES:
        raise SpecError(
            f"unknown architecture {arch!r}", where=where, hint="one of " + ", ".join(ARCHITECTURES)
        )


def is_allow(action: str) -> bool:
    return action in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")


# ---------------------------------------------------------------------------------------------
# the profile


@dataclass
class Profile:
    name: str
    version: str = "1"
    description: str = ""
    seccomp: Seccomp | None = None
    bpf_policy: dict | str | None = None  # the BPF layer's policy, or the name of one (its schema)
    recorded: dict | None = None  # recordings this profile was generated from (commands, syscall counts)
    source: str = ""  # where it was loaded from (not serialised)
    extra: dict = field(default_factory=dict)

    KEYS = ("kind", "name", "version", "description", "seccomp", "bpf", "recorded")

    @property
    def unconfined(self) -> bool:
        return self.seccomp is None

    @classmethod
    def from_dict(cls, d: dict, where: str, source: str = "") -> Profile:
        name = _take(d, "name", str, where)
        if not name:
            raise SpecError("profile has no name", where=f"{where}.name")
        version = d.get("version", "1")
        if not isinstance(version, str | int):
            raise SpecError("version must be a string", where=f"{where}.version")
        sec = d.get("seccomp")
        bpf = d.get("bpf")
        if bpf is not None and not isinstance(bpf, dict | str):
            raise SpecError("bpf policy must be an object or a policy name", where=f"{where}.bpf")
        recorded = d.get("recorded")
        if recorded is not None and not isinstance(recorded, dict):
            raise SpecError("recorded must be an object", where=f"{where}.recorded")
        return cls(
            name=name,
            version=str(version),
            description=_take(d, "description", str, where) or "",
            seccomp=None if sec is None else Seccomp.from_dict(sec, f"{where}.seccomp"),
            bpf_policy=bpf,
            recorded=recorded,
            source=source,
            extra={k: v for k, v in d.items() if k not in cls.KEYS},
        )

    def to_dict(self) -> dict:
        out: dict = {"kind": KIND, "name": self.name, "version": self.version}
        if self.description:
            out["description"] = self.description
        out["seccomp"] = None if self.seccomp is None else self.seccomp.to_dict()
        out["bpf"] = self.bpf_policy
        if self.recorded is not None:
            out["recorded"] = self.recorded
        out.update(self.extra)
        return out
