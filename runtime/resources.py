"""OCI `linux.resources` as plain data: parsed and validated here, enforced by runtime.cgroups.

No kernel access. Values keep OCI units (bytes, microseconds, cgroup v1 shares/weights); the
cgroup drivers convert them for cgroup v2. Every bad type or value raises SpecError naming the
field. Fields nobody can enforce on any host (rdma, network classID/priorities) are still parsed
so the driver refuses them with NotSupported instead of dropping them in silence.

OCI "0 means unset" convention (as runc): memory limit/reservation/swap 0, cpu shares/quota/period 0
and pids limit 0 are treated as "not set"; -1 means unlimited where OCI allows it.
"""

from __future__ import annotations

from ._lite.dataclasses import dataclass, field
from .errors import SpecError
from .linux import DEVICE_RULE_TYPES

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    from typing import Any

UNLIMITED = -1
DEFAULT_CPU_PERIOD = 100_000  # microseconds, the kernel's default CFS period
MIN_CPU_QUOTA = 1_000  # the kernel refuses a CFS quota below 1 ms
INT64_MAX = 2**63 - 1

# Patterns, matched through _match: re is imported only when a spec has resources to check.
_SIZE_RE = r"(?i)^(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)$"
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_CPU_LIST_RE = r"^\d+(-\d+)?(,\d+(-\d+)?)*$"
_PAGE_SIZE_RE = r"^\d+(KB|MB|GB)$"
_UNIFIED_KEY_RE = r"^[a-z0-9_]+\.[a-z0-9_.]+$"


def _match(pattern: str, text: str) -> Any:  # a re.Match or None
    import re  # with enum, a slow import: not on the path of a container without linux.resources

    return re.match(pattern, text)


def parse_size(text: str, where: str) -> int:
    """'256M', '1G', '512k', '1048576', '1.5G', 'max' -> bytes (binary units); 'max' -> -1."""
    if not isinstance(text, str):
        raise SpecError(f"size must be a string, got {type(text).__name__}", where=where)
    value = text.strip()
    if value.lower() == "max":
        return UNLIMITED
    m = _match(_SIZE_RE, value)
    if not m or m.group(3).lower() == "i" and not m.group(2):
        raise SpecError(
            f"invalid size {text!r}",
            where=where,
            hint="use a byte count with an optional k/M/G/T suffix, e.g. 256M, or 'max'",
        )
    size = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if size != int(size) or size > INT64_MAX:
        raise SpecError(f"size {text!r} is not a whole number of bytes within int64", where=where)
    return int(size)


def parse_cpus(text: str, where: str) -> tuple[int, int]:
    """'0.5' -> (50000, 100000): a CFS quota and period in microseconds for that many CPUs."""
    try:
        cpus = float(str(text).strip())
    except ValueError:
        raise SpecError(
            f"invalid CPU count {text!r}",
            where=where,
            hint="use a positive decimal number of CPUs, e.g. 0.5 or 2",
        ) from None
    if not cpus > 0 or cpus == float("inf"):
        raise SpecError(
            f"CPU count must be positive, got {text!r}",
            where=where,
            hint="use a positive decimal number of CPUs, e.g. 0.5 or 2",
        )
    quota = round(cpus * DEFAULT_CPU_PERIOD)
    if quota < MIN_CPU_QUOTA:
        raise SpecError(
            f"CPU count {text!r} is below the kernel minimum",
            where=where,
            hint="use at least 0.01 CPUs (a 1 ms quota per 100 ms period)",
        )
    return quota, DEFAULT_CPU_PERIOD


@dataclass
class Memory:
    limit: int | None = None  # bytes; -1 unlimited
    reservation: int | None = None  # soft limit (v1 soft_limit_in_bytes, v2 memory.low)
    swap: int | None = None  # OCI: memory+swap limit, bytes; -1 unlimited
    kernel: int | None = None  # deprecated in OCI; ignored and reported (spec.ignored_fields)
    kernel_tcp: int | None = None  # deprecated in OCI; ignored and reported (spec.ignored_fields)
    swappiness: int | None = None  # v1 only
    disable_oom_killer: bool | None = None  # v1 only
    use_hierarchy: bool | None = None  # v1: always hierarchical on current kernels
    check_before_update: bool = False  # refuse an update that sets the limit below current usage


@dataclass
class Cpu:
    shares: int | None = None  # v1 shares (2..262144); v2 converted to cpu.weight
    quota: int | None = None  # microseconds per period; -1 unlimited
    period: int | None = None  # microseconds
    burst: int | None = None  # microseconds
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str | None = None  # cpuset list "0-3,5"
    mems: str | None = None
    idle: int | None = None  # 0 or 1


@dataclass
class DeviceRule:
    allow: bool
    type: str = "a"  # a (all), c (char), b (block)
    major: int | None = None  # None = any
    minor: int | None = None
    access: str = "rwm"

    def v1_line(self) -> str:
        """The line written to v1 devices.allow / devices.deny."""

        def num(v: int | None) -> str:
            return "*" if v is None else str(v)

        return f"{self.type} {num(self.major)}:{num(self.minor)} {self.access}"

    def to_oci(self) -> dict:
        """The OCI linux.resources.devices entry."""
        d: dict = {"allow": self.allow, "type": self.type, "access": self.access}
        if self.major is not None:
            d["major"] = self.major
        if self.minor is not None:
            d["minor"] = self.minor
        return d


@dataclass
class DeviceRate:  # blockIO throttle*Device entry
    major: int
    minor: int
    rate: int


@dataclass
class DeviceWeight:  # blockIO weightDevice entry
    major: int
    minor: int
    weight: int | None = None
    leaf_weight: int | None = None


@dataclass
class BlockIO:
    weight: int | None = None  # 10..1000
    leaf_weight: int | None = None
    weight_device: list[DeviceWeight] = field(default_factory=list)
    throttle_read_bps: list[DeviceRate] = field(default_factory=list)
    throttle_write_bps: list[DeviceRate] = field(default_factory=list)
    throttle_read_iops: list[DeviceRate] = field(default_factory=list)
    throttle_write_iops: list[DeviceRate] = field(default_factory=list)

    def unsupported_fields(self) -> list[str]:
        """Fields set that no driver implements yet (weight and throttle* are enforced)."""
        names = {"leafWeight": self.leaf_weight is not None, "weightDevice": bool(self.weight_device)}
        return [name for name, present in names.items() if present]

    def throttles(self) -> list[tuple[str, str, list[DeviceRate]]]:
        """(v1 file suffix, v2 io.max key, entries) for each throttle list."""
        return [
            ("read_bps_device", "rbps", self.throttle_read_bps),
            ("write_bps_device", "wbps", self.throttle_write_bps),
            ("read_iops_device", "riops", self.throttle_read_iops),
            ("write_iops_device", "wiops", self.throttle_write_iops),
        ]

    def has_throttle(self) -> bool:
        return any(entries for _, _, entries in self.throttles())


@dataclass
class HugepageLimit:
    page_size: str  # "2MB", "1GB" (the kernel's hugetlb file naming)
    limit: int  # bytes


@dataclass
class Network:
    class_id: int | None = None
    priorities: list[tuple[str, int]] = field(default_factory=list)

    def requested(self) -> bool:
        return self.class_id is not None or bool(self.priorities)


@dataclass
class Resources:
    """Parsed OCI linux.resources. `None`/empty means "leave the kernel default"."""

    memory: Memory | None = None
    cpu: Cpu | None = None
    pids_limit: int | None = None  # -1 unlimited
    block_io: BlockIO | None = None
    hugepage_limits: list[HugepageLimit] = field(default_factory=list)
    devices: list[DeviceRule] = field(default_factory=list)
    unified: dict[str, str] = field(default_factory=dict)
    network: Network | None = None
    rdma: dict[str, Any] = field(default_factory=dict)  # always refused by the drivers

    @classmethod
    def from_oci(cls, d: dict | None, where: str = "linux.resources") -> Resources:
        if d is None:
            return cls()
        r = _Reader(
            d,
            where,
            {"memory", "cpu", "pids", "blockIO", "hugepageLimits", "devices", "unified", "network", "rdma"},
        )
        res = cls()
        if (m := r.obj("memory")) is not None:
            res.memory = _memory(m, f"{where}.memory")
        if (c := r.obj("cpu")) is not None:
            res.cpu = _cpu(c, f"{where}.cpu")
        if (p := r.obj("pids")) is not None:
            pr = _Reader(p, f"{where}.pids", {"limit"})
            limit = pr.integer("limit", minimum=-1)
            res.pids_limit = None if limit == 0 else limit
        if (b := r.obj("blockIO")) is not None:
            res.block_io = _block_io(b, f"{where}.blockIO")
        for i, h in enumerate(r.array("hugepageLimits")):
            res.hugepage_limits.append(_hugepage(h, f"{where}.hugepageLimits[{i}]"))
        for i, dev in enumerate(r.array("devices")):
            res.devices.append(_device(dev, f"{where}.devices[{i}]"))
        res.unified = _unified(r.obj("unified") or {}, f"{where}.unified")
        if (n := r.obj("network")) is not None:
            res.network = _network(n, f"{where}.network")
        res.rdma = r.obj("rdma") or {}
        return res

    def is_empty(self) -> bool:
        return self == Resources()


class _Reader:
    """Typed field access over one JSON object; unknown keys are refused (typos must not be ignored)."""

    def __init__(self, d: Any, where: str, known: set[str]) -> None:
        if not isinstance(d, dict):
            raise SpecError(f"must be an object, got {type(d).__name__}", where=where)
        unknown = sorted(set(d) - known)
        if unknown:
            raise SpecError(
                f"unknown field(s) {', '.join(unknown)}",
                where=where,
                hint=f"known fields: {', '.join(sorted(known))}",
            )
        self.d, self.where = d, where

    def _at(self, key: str) -> str:
        return f"{self.where}.{key}"

    def obj(self, key: str) -> dict | None:
        v = self.d.get(key)
        if v is not None and not isinstance(v, dict):
            raise SpecError(f"must be an object, got {type(v).__name__}", where=self._at(key))
        return v

    def array(self, key: str) -> list:
        v = self.d.get(key)
        if v is None:
            return []
        if not isinstance(v, list):
            raise SpecError(f"must be an array, got {type(v).__name__}", where=self._at(key))
        return v

    def boolean(self, key: str) -> bool | None:
        v = self.d.get(key)
        if v is not None and not isinstance(v, bool):
            raise SpecError(f"must be true or false, got {v!r}", where=self._at(key))
        return v

    def string(self, key: str) -> str | None:
        v = self.d.get(key)
        if v is not None and not isinstance(v, str):
            raise SpecError(f"must be a string, got {type(v).__name__}", where=self._at(key))
        return v

    def integer(self, key: str, minimum: int = 0, maximum: int = INT64_MAX) -> int | None:
        v = self.d.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"must be an integer, got {v!r}", where=self._at(key))
        if not minimum <= v <= maximum:
            hint = "use -1 for unlimited" if minimum == -1 else ""
            raise SpecError(f"{v} is out of range [{minimum}, {maximum}]", where=self._at(key), hint=hint)
        return v


def _unset_zero(v: int | None) -> int | None:
    return None if v == 0 else v


def _memory(d: dict, where: str) -> Memory:
    r = _Reader(
        d,
        where,
        {
            "limit",
            "reservation",
            "swap",
            "kernel",
            "kernelTCP",
            "swappiness",
            "disableOOMKiller",
            "useHierarchy",
            "checkBeforeUpdate",
        },
    )
    m = Memory(
        limit=_unset_zero(r.integer("limit", minimum=-1)),
        reservation=_unset_zero(r.integer("reservation", minimum=-1)),
        swap=_unset_zero(r.integer("swap", minimum=-1)),
        kernel=r.integer("kernel", minimum=-1),
        kernel_tcp=r.integer("kernelTCP", minimum=-1),
        swappiness=r.integer("swappiness", maximum=100),
        disable_oom_killer=r.boolean("disableOOMKiller"),
        use_hierarchy=r.boolean("useHierarchy"),
        check_before_update=bool(r.boolean("checkBeforeUpdate")),
    )
    if m.swap not in (None, UNLIMITED) and m.limit not in (None, UNLIMITED) and m.swap < m.limit:
        raise SpecError(
            f"swap ({m.swap}) is below limit ({m.limit})",
            where=f"{where}.swap",
            hint="OCI swap is the memory+swap total: use a value >= limit, or -1",
        )
    if m.swap not in (None, UNLIMITED) and m.limit in (None, UNLIMITED):
        raise SpecError(
            "a swap limit needs a memory limit",
            where=f"{where}.swap",
            hint="set memory.limit too, or use -1 for unlimited swap",
        )
    return m


def _cpu_list(r: _Reader, key: str) -> str | None:
    v = r.string(key)
    if v is None or v.strip() == "":
        return None
    v = v.strip()
    if not _match(_CPU_LIST_RE, v) or any(
        int(a) > int(b) for a, _, b in (part.partition("-") for part in v.split(",")) if b
    ):
        raise SpecError(
            f"invalid list {v!r}", where=r._at(key), hint='use the kernel list format, e.g. "0-3,5"'
        )
    return v


def _cpu(d: dict, where: str) -> Cpu:
    r = _Reader(
        d,
        where,
        {"shares", "quota", "burst", "period", "realtimeRuntime", "realtimePeriod", "cpus", "mems", "idle"},
    )
    c = Cpu(
        shares=_unset_zero(r.integer("shares", maximum=262_144)),
        quota=_unset_zero(r.integer("quota", minimum=-1)),
        period=_unset_zero(r.integer("period", maximum=1_000_000)),
        burst=r.integer("burst"),
        realtime_runtime=r.integer("realtimeRuntime", minimum=-1),
        realtime_period=r.integer("realtimePeriod"),
        cpus=_cpu_list(r, "cpus"),
        mems=_cpu_list(r, "mems"),
        idle=r.integer("idle", maximum=1),
    )
    if c.shares is not None and c.shares < 2:
        raise SpecError(f"shares {c.shares} is below the kernel minimum 2", where=f"{where}.shares")
    if c.quota is not None and 0 < c.quota < MIN_CPU_QUOTA:
        raise SpecError(
            f"quota {c.quota} is below the kernel minimum {MIN_CPU_QUOTA}",
            where=f"{where}.quota",
            hint="the quota is in microseconds; use -1 for unlimited",
        )
    if c.period is not None and c.period < 1000:
        raise SpecError(f"period {c.period} is below the kernel minimum 1000", where=f"{where}.period")
    return c


def _rates(r: _Reader, key: str) -> list[DeviceRate]:
    out = []
    for i, e in enumerate(r.array(key)):
        er = _Reader(e, f"{r.where}.{key}[{i}]", {"major", "minor", "rate"})
        major, minor, rate = er.integer("major"), er.integer("minor"), er.integer("rate")
        if major is None or minor is None or rate is None:
            raise SpecError("major, minor and rate are required", where=er.where)
        out.append(DeviceRate(major, minor, rate))
    return out


def _block_io(d: dict, where: str) -> BlockIO:
    r = _Reader(
        d,
        where,
        {
            "weight",
            "leafWeight",
            "weightDevice",
            "throttleReadBpsDevice",
            "throttleWriteBpsDevice",
            "throttleReadIOPSDevice",
            "throttleWriteIOPSDevice",
        },
    )
    b = BlockIO(weight=r.integer("weight", maximum=1000), leaf_weight=r.integer("leafWeight", maximum=1000))
    if b.weight == 0:
        b.weight = None
    if b.weight is not None and b.weight < 10:
        raise SpecError(f"weight {b.weight} is out of range [10, 1000]", where=f"{where}.weight")
    for i, e in enumerate(r.array("weightDevice")):
        er = _Reader(e, f"{where}.weightDevice[{i}]", {"major", "minor", "weight", "leafWeight"})
        major, minor = er.integer("major"), er.integer("minor")
        if major is None or minor is None:
            raise SpecError("major and minor are required", where=er.where)
        b.weight_device.append(
            DeviceWeight(
                major, minor, er.integer("weight", maximum=1000), er.integer("leafWeight", maximum=1000)
            )
        )
    b.throttle_read_bps = _rates(r, "throttleReadBpsDevice")
    b.throttle_write_bps = _rates(r, "throttleWriteBpsDevice")
    b.throttle_read_iops = _rates(r, "throttleReadIOPSDevice")
    b.throttle_write_iops = _rates(r, "throttleWriteIOPSDevice")
    return b


def _hugepage(d: dict, where: str) -> HugepageLimit:
    r = _Reader(d, where, {"pageSize", "limit"})
    size, limit = r.string("pageSize"), r.integer("limit")
    if size is None or limit is None:
        raise SpecError("pageSize and limit are required", where=where)
    if not _match(_PAGE_SIZE_RE, size):
        raise SpecError(
            f"invalid pageSize {size!r}",
            where=f"{where}.pageSize",
            hint='use the kernel naming, e.g. "2MB" or "1GB"',
        )
    return HugepageLimit(size, limit)


def _device(d: dict, where: str) -> DeviceRule:
    r = _Reader(d, where, {"allow", "type", "major", "minor", "access"})
    allow = r.boolean("allow")
    if allow is None:
        raise SpecError("allow is required", where=f"{where}.allow")
    dev_type = r.string("type") or "a"
    if dev_type not in DEVICE_RULE_TYPES:
        raise SpecError(f"invalid type {dev_type!r}", where=f"{where}.type", hint='use "a", "b" or "c"')
    access = r.string("access") or "rwm"
    if not access or set(access) - set("rwm") or len(set(access)) != len(access):
        raise SpecError(
            f"invalid access {access!r}",
            where=f"{where}.access",
            hint='use a combination of "r", "w" and "m"',
        )
    major, minor = r.integer("major", minimum=-1), r.integer("minor", minimum=-1)
    rule = DeviceRule(
        allow,
        dev_type,
        None if major == -1 else major,
        None if minor == -1 else minor,
        "".join(c for c in "rwm" if c in access),
    )
    if dev_type == "a":  # "all devices" has no numbers; the kernel ignores them
        rule.major = rule.minor = None
    return rule


def _unified(d: dict, where: str) -> dict[str, str]:
    out = {}
    for key, value in d.items():
        if (
            not isinstance(key, str)
            or not _match(_UNIFIED_KEY_RE, key)
            or key.startswith("cgroup.procs")
            or key in ("cgroup.threads", "cgroup.subtree_control", "cgroup.kill", "cgroup.freeze")
        ):
            raise SpecError(
                f"invalid or reserved cgroup v2 file name {key!r}",
                where=where,
                hint='use an interface file name such as "memory.high"; membership, '
                "freezing and controllers are managed by the runtime",
            )
        if not isinstance(value, str):
            raise SpecError(f"value must be a string, got {type(value).__name__}", where=f"{where}.{key}")
        out[key] = value
    return out


def _network(d: dict, where: str) -> Network:
    r = _Reader(d, where, {"classID", "priorities"})
    n = Network(class_id=r.integer("classID", maximum=2**32 - 1))
    for i, p in enumerate(r.array("priorities")):
        pr = _Reader(p, f"{where}.priorities[{i}]", {"name", "priority"})
        name, prio = pr.string("name"), pr.integer("priority", maximum=2**32 - 1)
        if name is None or prio is None:
            raise SpecError("name and priority are required", where=pr.where)
        n.priorities.append((name, prio))
    return n


# Devices every OCI container gets (runtime-spec "Default Devices") plus /dev/pts, as runc allows them;
# runc's blanket "c *:* m" / "b *:* m" mknod rules are left out on purpose (untrusted tenants).
DEFAULT_DEVICE_RULES = [
    DeviceRule(True, "c", 1, 3, "rwm"),  # /dev/null
    DeviceRule(True, "c", 1, 5, "rwm"),  # /dev/zero
    DeviceRule(True, "c", 1, 7, "rwm"),  # /dev/full
    DeviceRule(True, "c", 1, 8, "rwm"),  # /dev/random
    DeviceRule(True, "c", 1, 9, "rwm"),  # /dev/urandom
    DeviceRule(True, "c", 5, 0, "rwm"),  # /dev/tty
    DeviceRule(True, "c", 5, 2, "rwm"),  # /dev/ptmx
    DeviceRule(True, "c", 136, None, "rwm"),  # /dev/pts/*
]


def allowing_mknod(res: Resources | None, devices: list) -> Resources | None:
    """RES plus mknod (and only mknod) of exactly the DEVICES (spec.Device) the init creates: the
    device filter is in place before the init runs, which runc's later filter never has to be."""
    made = [DeviceRule(True, "b" if d.type == "b" else "c", d.major, d.minor, "m")
            for d in devices if d.type != "p"]
    if not made:
        return res
    res = res or Resources()
    return Resources(**{**vars(res), "devices": [*res.devices, *made]})


def effective_device_rules(rules: list[DeviceRule]) -> list[DeviceRule]:
    """What the kernel enforces: deny everything, then the spec's rules in order, then the defaults."""
    return [DeviceRule(False, "a"), *rules, *DEFAULT_DEVICE_RULES]


# `update`'s runc-style flags: flag -> (linux.resources section, key, value kind)
UPDATE_FLAGS = {
    # flag: (OCI section, OCI key, parser)
    "memory": ("memory", "limit", "size"),
    "memory-reservation": ("memory", "reservation", "size"),
    "memory-swap": ("memory", "swap", "size"),
    "cpu-shares": ("cpu", "shares", "int"),
    "cpu-quota": ("cpu", "quota", "int"),
    "cpu-period": ("cpu", "period", "int"),
    "cpuset-cpus": ("cpu", "cpus", "str"),
    "cpuset-mems": ("cpu", "mems", "str"),
    "pids-limit": ("pids", "limit", "int"),
    "blkio-weight": ("blockIO", "weight", "int"),
}


def update_from_flags(resources: dict, flags: dict[str, str | None]) -> dict:
    """linux.resources for `update`: RESOURCES (from --resources) with the flags given laid over."""
    for flag, value in flags.items():
        if value is None:
            continue
        section, key, kind = UPDATE_FLAGS[flag]
        where = f"--{flag}"
        if kind == "size":
            parsed: object = parse_size(value, where)
        elif kind == "int":
            try:
                parsed = int(value)
            except ValueError:
                raise SpecError(f"not a whole number: {value!r}", where=where) from None
        else:
            parsed = value
        resources.setdefault(section, {})[key] = parsed
    if not resources:
        raise SpecError("nothing to update", hint="pass --resources FILE or flags like --memory 256M")
    return resources
