"""cgroup v2 driver, written directly over the cgroup2 interface files.

Also used by the v1 driver for the container's directory in the hybrid host's unified tree
(/sys/fs/cgroup/unified), which carries no resource controllers there but gives the cgroup id
that BPF programs key on, plus cgroup.freeze/cgroup.kill.

Mapping from OCI (runc's conversions):
  memory.limit -> memory.max, reservation -> memory.low, swap (memory+swap) -> memory.swap.max = swap - limit
  cpu.shares -> cpu.weight = 1 + (shares - 2) * 9999 / 262142, quota/period -> cpu.max,
  burst -> cpu.max.burst, idle -> cpu.idle, cpus/mems -> cpuset.cpus/mems, pids.limit -> pids.max,
  blockIO.weight -> io.bfq.weight (as is) or io.weight = 1 + (weight - 10) * 9999 / 990,
  blockIO.throttle{Read,Write}{Bps,IOPS}Device -> io.max "maj:min rbps=|wbps=|riops=|wiops=" (0 -> max),
  hugepageLimits -> hugetlb.<size>.max (+ .rsvd.max), unified -> the named files.
Device rules: v2 has no devices.allow; rules are accepted and exposed as `Cgroup.device_rules` with
`devices_enforced = False`: the caller must attach the cgroup-device BPF program (bpf/) to
`unified_path()` before any container process runs, or refuse to start.
Controllers are enabled in each ancestor's cgroup.subtree_control as needed and never disabled
(pre-existing ancestors may have other users; the dirs we create are removed with the container).
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` imports enum (bench/README.md, start-path costs)
import os

from ..errors import ContainerError, SpecError
from ..resources import UNLIMITED, DeviceRule, Resources, effective_device_rules
from . import common

_STAT_CONTROLLERS = ("memory", "pids")  # enabled when available so stats() has numbers
_HUGEPAGE_DIR = "/sys/kernel/mm/hugepages"


def needed_controllers(res: Resources | None, where: str = "linux.resources") -> set[str]:
    """Controllers the resources need on cgroup v2; refuses what v2 cannot express."""
    if res is None:
        return set()
    need: set[str] = set()
    m = res.memory
    if m is not None:
        for name, present in (
            ("swappiness", m.swappiness is not None),
            ("disableOOMKiller", bool(m.disable_oom_killer)),
            ("useHierarchy", m.use_hierarchy is False),
        ):
            if present:
                common.refuse(
                    f"{name} is not supported on cgroup v2",
                    f"{where}.memory.{name}",
                    "remove it (cgroup v2 has no such knob)",
                )
        if (m.limit, m.reservation, m.swap) != (None, None, None):
            need.add("memory")
    c = res.cpu
    if c is not None:
        if c.realtime_runtime is not None or c.realtime_period is not None:
            common.refuse(
                "realtime CPU limits are not supported on cgroup v2",
                f"{where}.cpu",
                "remove realtimeRuntime/realtimePeriod",
            )
        if (c.shares, c.quota, c.period, c.burst, c.idle) != (None,) * 5:
            need.add("cpu")
        if c.cpus or c.mems:
            need.add("cpuset")
    if res.pids_limit is not None:
        need.add("pids")
    if res.block_io is not None:
        common.refuse_unsupported_block_io(res.block_io, where)
        if res.block_io.weight is not None or res.block_io.has_throttle():
            need.add("io")
    if res.hugepage_limits:
        need.add("hugetlb")
    for key in res.unified:
        prefix = key.split(".")[0]
        if prefix != "cgroup":
            need.add(prefix)
    if res.network is not None and res.network.requested():
        common.refuse(
            "network classID/priorities need net_cls/net_prio, which cgroup v2 lacks",
            f"{where}.network",
            "remove linux.resources.network (use BPF/nftables policy)",
        )
    if res.rdma:
        common.refuse("rdma limits are not implemented", f"{where}.rdma", "remove linux.resources.rdma")
    return need


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares [2, 262144] -> v2 cpu.weight [1, 10000] (runc's linear mapping)."""
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_to_io_weight(weight: int) -> int:
    """blkio.weight [10, 1000] -> io.weight [1, 10000] (runc's linear mapping)."""
    return 1 + ((weight - 10) * 9999) // 990


def swap_to_v2(swap: int | None, limit: int | None) -> int | None:
    """OCI memory+swap total -> memory.swap.max; None = leave as is, -1 = max."""
    if limit == UNLIMITED and swap is None:
        return UNLIMITED  # "unlimited memory" also lifts swap, as on v1
    if swap is None or swap == UNLIMITED:
        return swap
    if limit is None or limit == UNLIMITED:
        raise SpecError("a swap limit needs a memory limit", where="linux.resources.memory.swap")
    if swap < limit:
        raise SpecError("swap (memory+swap) is below the memory limit", where="linux.resources.memory.swap")
    return swap - limit


def _max(v: int) -> str:
    return "max" if v == UNLIMITED else str(v)


def _hugepage_sizes() -> set[str]:
    """Kernel page sizes as hugetlb file names: hugepages-2048kB -> 2MB."""
    sizes = set()
    try:
        entries = os.listdir(_HUGEPAGE_DIR)
    except FileNotFoundError:
        return sizes
    for entry in entries:
        kb = int(entry.removeprefix("hugepages-").removesuffix("kB"))
        for unit, div in (("GB", 1 << 20), ("MB", 1 << 10), ("KB", 1)):
            if kb % div == 0:
                sizes.add(f"{kb // div}{unit}")
                break
    return sizes


class Driver:
    name = "v2"

    def __init__(self, root: str = "/sys/fs/cgroup") -> None:
        self.root = root

    def controllers(self) -> list[str]:
        return common.read(os.path.join(self.root, "cgroup.controllers")).split()

    def create(self, path: str, resources: Resources | None) -> Cgroup:
        needed_controllers(resources)  # refuse before touching the kernel
        created = common.makedirs(self.root, path)
        try:
            cg = Cgroup(self.root, path, created=created)
            cg.enable(set(_STAT_CONTROLLERS) & set(self.controllers()), required=False)
            if resources is not None:
                cg.update(resources)
            cg.device_rules = effective_device_rules(resources.devices if resources else [])
            return cg
        except BaseException:
            for d in reversed(created):
                common.remove_tree(d)
            raise

    def open(self, path: str) -> Cgroup:
        cg = Cgroup(self.root, path)
        if not os.path.isdir(cg.dir):
            raise ContainerError(
                f"cgroup {cg.dir} does not exist",
                where="cgroups",
                hint="the container was deleted or its cgroup removed by someone else",
            )
        return cg


class Cgroup:
    devices_enforced = False  # see module docstring: the caller attaches the cgroup-device BPF program

    def __init__(self, root: str, path: str, created: list[str] | None = None) -> None:
        self.root, self.path = root, path
        self.dir = os.path.join(root, path)
        self._created = set(created or [])
        self.device_rules: list[DeviceRule] = []

    def _file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    # -- controllers --------------------------------------------------------------------------
    def enable(self, controllers: set[str], required: bool = True) -> None:
        """Enable controllers in every ancestor's subtree_control down to this cgroup's parent."""
        if not controllers:
            return
        available = set(common.read(os.path.join(self.root, "cgroup.controllers")).split())
        missing = controllers - available
        if missing and required:
            names = ", ".join(sorted(missing))
            common.refuse(
                f"cgroup v2 controller(s) {names} not available at {self.root}",
                "cgroups",
                "enable them on the host, or remove the resources that need them",
            )
        for rel in common.ancestors(self.path):
            parent = os.path.join(self.root, rel)
            enabled = set(common.read(os.path.join(parent, "cgroup.subtree_control")).split())
            for c in sorted((controllers & available) - enabled):
                try:
                    common.write(os.path.join(parent, "cgroup.subtree_control"), f"+{c}")
                except Exception:
                    if required:
                        raise

    # -- limits -------------------------------------------------------------------------------
    def update(self, resources: Resources) -> None:
        self.enable(needed_controllers(resources))
        if resources.memory is not None:
            self._memory(resources)
        if resources.cpu is not None:
            self._cpu(resources)
        if resources.pids_limit is not None:
            common.write(self._file("pids.max"), _max(resources.pids_limit))
        if resources.block_io is not None:
            self._io(resources)
        self._hugetlb(resources)
        for key, value in resources.unified.items():
            if not os.path.exists(self._file(key)):
                common.refuse(
                    f"cgroup v2 file {key} does not exist",
                    f"linux.resources.unified.{key}",
                    "check the name and that the kernel supports it",
                )
            common.write(self._file(key), value)
        if resources.devices:
            self.device_rules = effective_device_rules(resources.devices)

    def _io(self, res: Resources) -> None:
        b = res.block_io
        assert b is not None
        for _, key, entries in b.throttles():
            for e in entries:  # one "maj:min key=value" line per write; rate 0 lifts the limit
                common.write(self._file("io.max"), f"{e.major}:{e.minor} {key}={e.rate or 'max'}")
        if b.weight is not None:
            w = b.weight
            if os.path.exists(self._file("io.bfq.weight")):
                common.write(self._file("io.bfq.weight"), w)
            elif os.path.exists(self._file("io.weight")):
                common.write(self._file("io.weight"), f"default {blkio_to_io_weight(w)}")
            else:
                common.refuse(
                    "blockIO.weight needs io.bfq.weight or io.weight (iocost), absent here",
                    "linux.resources.blockIO.weight",
                    "remove blockIO.weight",
                )

    def _memory(self, res: Resources) -> None:
        m = res.memory
        assert m is not None
        if m.check_before_update and m.limit not in (None, UNLIMITED):
            current = common.read_int_or_max(self._file("memory.current")) or 0
            if m.limit < current:
                raise SpecError(
                    f"memory limit {m.limit} is below current usage {current}",
                    where="linux.resources.memory.limit",
                    hint="checkBeforeUpdate is set",
                )
        swap = swap_to_v2(m.swap, m.limit)
        swap_file = self._file("memory.swap.max")
        if swap not in (None, 0) and not os.path.exists(swap_file):
            common.refuse(
                "swap limits need memory.swap.max (swap accounting is off)",
                "linux.resources.memory.swap",
                "boot with swapaccount=1 or remove memory.swap",
            )
        if m.limit is not None:
            common.write(self._file("memory.max"), _max(m.limit))
        if swap is not None and os.path.exists(swap_file):
            common.write(swap_file, _max(swap))
        if m.reservation is not None:
            common.write(self._file("memory.low"), _max(m.reservation))

    def _cpu(self, res: Resources) -> None:
        c = res.cpu
        assert c is not None
        if c.shares is not None:
            common.write(self._file("cpu.weight"), shares_to_weight(c.shares))
        if c.quota is not None or c.period is not None:
            quota = "max" if c.quota in (None, UNLIMITED) else str(c.quota)
            period = c.period or int(common.read(self._file("cpu.max")).split()[1])
            common.write(self._file("cpu.max"), f"{quota} {period}")
        if c.burst is not None:
            common.write(self._file("cpu.max.burst"), c.burst)
        if c.idle is not None:
            common.write(self._file("cpu.idle"), c.idle)
        if c.cpus:
            common.write(self._file("cpuset.cpus"), c.cpus)
        if c.mems:
            common.write(self._file("cpuset.mems"), c.mems)

    def _hugetlb(self, res: Resources) -> None:
        sizes = _hugepage_sizes() if res.hugepage_limits else set()
        for i, h in enumerate(res.hugepage_limits):
            if h.page_size not in sizes:
                common.refuse(
                    f"huge page size {h.page_size} not supported by this kernel",
                    f"linux.resources.hugepageLimits[{i}].pageSize",
                    f"available: {', '.join(sorted(sizes)) or 'none'}",
                )
            common.write(self._file(f"hugetlb.{h.page_size}.max"), h.limit)
            rsvd = self._file(f"hugetlb.{h.page_size}.rsvd.max")
            if os.path.exists(rsvd):
                common.write(rsvd, h.limit)

    # -- membership ---------------------------------------------------------------------------
    def procs_files(self) -> list[str]:
        return [self._file("cgroup.procs")]

    def hierarchy_dirs(self) -> dict[str, str]:
        """"" (the one hierarchy, mounted as is) -> this container's directory."""
        return {"": self.dir}

    def add(self, pid: int) -> None:
        common.write(self._file("cgroup.procs"), pid)

    def pids(self) -> list[int]:
        return sorted(common.procs_recursive(self.dir))

    def populated(self) -> bool:
        try:
            return common.read_keyed(self._file("cgroup.events")).get("populated", 0) == 1
        except FileNotFoundError:
            return False

    # -- freezer and signals ------------------------------------------------------------------
    def freeze(self) -> None:
        common.write(self._file("cgroup.freeze"), 1)
        try:
            common.wait_until(self.frozen, f"{self.dir} to freeze")
        except BaseException:
            common.write(self._file("cgroup.freeze"), 0)  # never leave it half-frozen
            raise

    def thaw(self) -> None:
        common.write(self._file("cgroup.freeze"), 0)
        common.wait_until(lambda: not self.frozen(), f"{self.dir} to thaw")

    def frozen(self) -> bool:
        return common.read_keyed(self._file("cgroup.events")).get("frozen", 0) == 1

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if sig == signal.SIGKILL and os.path.exists(self._file("cgroup.kill")):
            common.write(self._file("cgroup.kill"), 1)  # atomic: also catches processes forking right now
            return
        common.signal_while_frozen(self, sig)

    # -- accounting ---------------------------------------------------------------------------
    def stats(self) -> dict:
        def num(name: str) -> int | None:
            return common.read_int_or_max(self._file(name))

        cpu = common.read_keyed(self._file("cpu.stat"))
        return {
            "memory_current": num("memory.current"),
            "memory_peak": num("memory.peak"),
            "memory_limit": num("memory.max"),
            "cpu_usage_usec": cpu.get("usage_usec"),
            "cpu_user_usec": cpu.get("user_usec"),
            "cpu_system_usec": cpu.get("system_usec"),
            "pids_current": num("pids.current"),
            "pids_limit": num("pids.max"),
            "oom_kills": self.oom_kills(),
        }

    def oom_kills(self) -> int:
        try:
            return common.read_keyed(self._file("memory.events")).get("oom_kill", 0)
        except FileNotFoundError:  # memory controller not enabled: nothing could be OOM-killed by it
            return 0

    def unified_id(self) -> int:
        return os.stat(self.dir).st_ino

    def unified_path(self) -> str:
        return self.dir

    # -- teardown -----------------------------------------------------------------------------
    def destroy(self) -> None:
        if os.path.isdir(self.dir):
            if self.frozen():
                common.write(self._file("cgroup.freeze"), 0)
            if self.populated() or self.pids():
                self.kill(signal.SIGKILL)
                common.wait_until(lambda: not self.populated(), f"{self.dir} to empty")
            common.remove_tree(self.dir)
        common.remove_empty_parents(self.root, self.path, self._owned)

    def _owned(self, path: str) -> bool:
        """Parents we may remove when empty: ones this object created, or the shared "stockade" dirs."""
        return path in self._created or common.under_stockade(self.root, path)
