"""cgroup v1 (legacy or hybrid) driver on top of cgroupspy.

One directory per mounted v1 hierarchy (memory, cpu, cpuacct, cpuset, pids, blkio, devices,
freezer, hugetlb; co-mounted hierarchies once), plus the same relative path in the cgroup2 tree
(hybrid hosts: /sys/fs/cgroup/unified) so every container process also has a cgroup2 id for BPF.

Every read and write of a v1 interface file (limits, devices, cgroup.procs, the freezer, cpuset
inheritance) goes one way: `_write`/`_read`, cgroupspy's `Controller.set_property`/`get_property`
on exactly one directory (a `_Dir` with the `full_path` its controllers use: no `trees.Tree()`
walk, and no import of cgroupspy.nodes, which pulls in logging). cgroupspy is imported only when a
v1 file is touched, never by importing this module.

OCI -> v1 files: memory limit/reservation/swap(memory+swap)/swappiness/disableOOMKiller ->
memory.limit_in_bytes/soft_limit_in_bytes/memsw.limit_in_bytes/swappiness/oom_control; cpu shares/quota/
period/burst/idle/realtime* -> cpu.shares/cfs_quota_us/cfs_period_us/cfs_burst_us/idle/rt_*; cpus/mems ->
cpuset.cpus/mems (new cpuset dirs first get the parent's values, or joining fails); pids.limit -> pids.max;
blockIO.weight -> blkio.weight, or blkio.bfq.weight when a block device really uses bfq (else refused);
throttle*Device -> blkio.throttle.{read,write}_{bps,iops}_device;
devices -> devices.deny "a", then each rule in order, then the OCI default devices (resources.py).
hugepageLimits and unified keys go to the cgroup2 dir when its hierarchy has the controller (this host's
unified tree offers hugetlb), else they are refused.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` imports enum (bench/README.md, start-path costs)
import os

from .. import mountinfo
from ..errors import ContainerError, SpecError
from ..resources import UNLIMITED, DeviceRule, Resources, effective_device_rules
from . import common, v2

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    pass

KNOWN = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer", "hugetlb")
_UNLIMITED_V1 = 1 << 62  # the kernel prints "unlimited" as PAGE_COUNTER_MAX * PAGE_SIZE (about 2^63)


def mounts(root: str = "/sys/fs/cgroup") -> tuple[dict[str, str], str | None]:
    """(v1 controller -> mount point, cgroup2 mount point or None) for hierarchies mounted under root."""
    v1: dict[str, str] = {}
    unified = None
    for m in mountinfo.read():
        if m.root != "/" or (os.path.dirname(m.point) != root.rstrip("/") and m.point != root):
            continue
        if m.fstype == "cgroup2":
            unified = m.point
        elif m.fstype == "cgroup":
            for opt in m.super_options.split(","):
                if opt in KNOWN:
                    v1[opt] = m.point
    return v1, unified


class Driver:
    name = "v1"

    def __init__(self, root: str = "/sys/fs/cgroup") -> None:
        self.root = root
        self.mounts, self.unified_root = mounts(root)
        if not self.mounts:
            common.refuse(
                f"no cgroup v1 hierarchy mounted under {root}",
                "cgroups",
                "mount the cgroup controllers (or use a cgroup v2 host)",
            )

    def controllers(self) -> list[str]:
        return sorted(self.mounts)

    def unified_controllers(self) -> set[str]:
        if self.unified_root is None:
            return set()
        return set(common.read(os.path.join(self.unified_root, "cgroup.controllers")).split())

    def create(self, path: str, resources: Resources | None) -> Cgroup:
        self.check(resources)  # refuse before touching the kernel
        cg = Cgroup(self, path, self.members(resources))
        try:
            for mount in cg.mount_points():
                cg.created += common.makedirs(mount, path)
            if "cpuset" in self.mounts:
                _inherit_cpuset(self.mounts["cpuset"], cg.created)
            if self.unified_root is not None:
                cg.unified = v2.Driver(self.unified_root).create(path, None)
            cg.apply(resources or Resources(), create=True)
            return cg
        except BaseException:
            cg.undo_create()
            raise

    def members(self, res: Resources | None) -> set[str]:
        """The v1 hierarchies a new container joins.

        Pure v1: all of them (devices and freezer are how it is confined and paused). Hybrid: only
        those whose limits `res` asks for, as systemd does for units. Device control is then the
        cgroup-device BPF program and pause/kill the cgroup2 core files (cgroup.freeze,
        cgroup.kill) on the unified cgroup, which the container is born in; each v1 membership is a
        migration that waits for an RCU grace period (see syscalls.fork_into_cgroup)."""
        if self.unified_root is None:
            return set(self.mounts)
        return needed_controllers(res) & set(self.mounts)

    def open(self, path: str) -> Cgroup:
        members = {c for c, m in self.mounts.items() if os.path.isdir(os.path.join(m, path))}
        cg = Cgroup(self, path, members)
        unified = self.unified_root is not None and os.path.isdir(os.path.join(self.unified_root, path))
        if not members and not unified:
            raise ContainerError(
                f"cgroup {path} does not exist in any v1 hierarchy",
                where="cgroups",
                hint="the container was deleted or its cgroup removed by someone else",
            )
        if unified:
            cg.unified = v2.Cgroup(self.unified_root, path)
            cg.devices_enforced = "devices" in members
        return cg

    def check(self, res: Resources | None, where: str = "linux.resources") -> None:
        """NotSupported for every requested resource this host's hierarchies cannot enforce."""
        for controller in ("devices", "freezer"):  # device isolation and pause/kill are never optional
            if controller not in self.mounts and self.unified_root is None:
                common.refuse(
                    f"the cgroup v1 {controller} controller is not mounted",
                    "cgroups",
                    f"mount it under {self.root}/{controller}",
                )
        if res is None:
            return

        def need(controller: str, field: str) -> None:
            if controller not in self.mounts:
                common.refuse(
                    f"the cgroup v1 {controller} controller is not mounted",
                    f"{where}.{field}",
                    f"mount it under {self.root}/{controller} or remove {field}",
                )

        m = res.memory
        if m is not None:
            if m.use_hierarchy is False:
                common.refuse(
                    "memory.useHierarchy false is not supported (gone from current kernels)",
                    f"{where}.memory.useHierarchy",
                    "remove it",
                )
            need("memory", "memory")
        c = res.cpu
        if c is not None:
            if (c.shares, c.quota, c.period, c.burst, c.idle, c.realtime_runtime, c.realtime_period) != (
                None,
            ) * 7:
                need("cpu", "cpu")
            if c.cpus or c.mems:
                need("cpuset", "cpu.cpus")
        if res.pids_limit is not None:
            need("pids", "pids")
        if res.block_io is not None:
            common.refuse_unsupported_block_io(res.block_io, where)
            if res.block_io.weight is not None or res.block_io.has_throttle():
                need("blkio", "blockIO")
        hugetlb = "hugetlb" in self.mounts or "hugetlb" in self.unified_controllers()
        if res.hugepage_limits and not hugetlb:
            common.refuse(
                "hugepageLimits need the hugetlb controller (v1 or in the cgroup2 tree)",
                f"{where}.hugepageLimits",
                "mount hugetlb or remove hugepageLimits",
            )
        for key in res.unified:
            prefix = key.split(".")[0]
            if prefix != "cgroup" and prefix not in self.unified_controllers():
                common.refuse(
                    f"unified key {key} needs the {prefix} controller in the cgroup2 tree, "
                    "which this hybrid host does not offer",
                    f"{where}.unified.{key}",
                    "remove it or use the v1 equivalent field",
                )
        if res.unified and self.unified_root is None:
            common.refuse(
                "unified keys need a cgroup2 tree", f"{where}.unified", "remove linux.resources.unified"
            )
        if res.network is not None and res.network.requested():
            common.refuse(
                "network classID/priorities need net_cls/net_prio, which Stockade does not manage",
                f"{where}.network",
                "remove linux.resources.network (use BPF/nftables policy)",
            )
        if res.rdma:
            common.refuse("rdma limits are not implemented", f"{where}.rdma", "remove linux.resources.rdma")


class _Dir:
    """What cgroupspy's controllers use of a node: the directory's full path."""

    def __init__(self, path: str) -> None:
        self.full_path = path.encode()


def _write(directory: str, filename: str, value: str | int) -> None:
    """The one way a v1 interface file is written; a refusal names the file and the value."""
    from cgroupspy.controllers import Controller

    try:
        Controller(_Dir(directory)).set_property(filename.encode(), value)
    except OSError as e:
        common.write_failed(os.path.join(directory, filename), value, e)


def _read(directory: str, filename: str) -> str:
    from cgroupspy.controllers import Controller

    return Controller(_Dir(directory)).get_property(filename.encode())


def _inherit_cpuset(mount: str, created: list[str]) -> None:
    """New cpuset dirs start with empty cpus/mems, where no task may join: copy the parent's."""
    for d in created:  # shallowest first, so each parent is already filled
        if not d.startswith(mount + "/"):
            continue
        for name in ("cpuset.cpus", "cpuset.mems"):
            _write(d, name, _read(os.path.dirname(d), name))


def needed_controllers(res: Resources | None) -> set[str]:
    """The v1 controllers that enforce what `res` asks for."""
    if res is None:
        return set()
    out = set()
    m, c = res.memory, res.cpu
    if m is not None and any(v is not None for v in vars(m).values()):
        out.add("memory")
    if c is not None:
        if any(v is not None for k, v in vars(c).items() if k not in ("cpus", "mems")):
            out.add("cpu")
        if c.cpus or c.mems:
            out.add("cpuset")
    if res.pids_limit is not None:
        out.add("pids")
    if res.block_io is not None:
        out.add("blkio")
    if res.hugepage_limits:
        out.add("hugetlb")
    return out


class Cgroup:
    def __init__(self, driver: Driver, path: str, members: set[str]) -> None:
        self.driver, self.path = driver, path
        self.dirs = {c: os.path.join(m, path) for c, m in driver.mounts.items() if c in members}
        # devices.deny/allow written by this driver when it joins the devices hierarchy; else the
        # caller attaches the cgroup-device BPF program to the unified cgroup.
        self.devices_enforced = "devices" in members
        self.unified: v2.Cgroup | None = None
        self.created: list[str] = []
        self.device_rules: list[DeviceRule] = []

    def mount_points(self) -> list[str]:
        return sorted({self.driver.mounts[c] for c in self.dirs})

    def hierarchy_dirs(self) -> dict[str, str]:
        """Hierarchy name (mount point's base name) -> this container's directory in it."""
        out = {os.path.basename(m): os.path.join(m, self.path) for m in self.mount_points()}
        if self.unified is not None:
            out[os.path.basename(self.driver.unified_root or "unified")] = self.unified.unified_path()
        return out

    def _dirs(self) -> list[str]:
        return sorted({os.path.join(m, self.path) for m in self.mount_points()})

    # -- limits -------------------------------------------------------------------------------
    def update(self, resources: Resources) -> None:
        self.driver.check(resources)
        missing = needed_controllers(resources) & set(self.driver.mounts) - set(self.dirs)
        if missing:
            self._join_running(missing)
        self.apply(resources, create=False)

    def _join_running(self, controllers: set[str]) -> None:
        """A limit first set by `update` (hybrid): make the hierarchy's directory and move every
        process in, with the unified cgroup frozen so none forks past the move."""
        for c in sorted(controllers):
            self.dirs[c] = os.path.join(self.driver.mounts[c], self.path)
        for mount in sorted({self.driver.mounts[c] for c in controllers}):
            made = common.makedirs(mount, self.path)
            if mount == self.driver.mounts.get("cpuset"):
                _inherit_cpuset(mount, made)
            self.created += made
        unified = self.unified
        if unified is None:
            return
        was_frozen = unified.frozen()
        unified.freeze()
        try:
            for pid in unified.pids():
                for mount in sorted({self.driver.mounts[c] for c in controllers}):
                    try:
                        _write(os.path.join(mount, self.path), "cgroup.procs", pid)
                    except ContainerError:
                        if os.path.exists(f"/proc/{pid}"):
                            raise
        finally:
            if not was_frozen:
                unified.thaw()

    def apply(self, res: Resources, create: bool) -> None:
        if res.memory is not None:
            self._memory(res)
        if res.cpu is not None:
            self._cpu(res)
        if res.pids_limit is not None:
            self._write("pids", "pids.max", _max(res.pids_limit))
        if res.block_io is not None:
            for suffix, _, entries in res.block_io.throttles():
                for e in entries:  # one "maj:min rate" line per write; rate 0 removes the rule
                    self._write("blkio", f"blkio.throttle.{suffix}", f"{e.major}:{e.minor} {e.rate}")
            if res.block_io.weight is not None:
                self._blkio_weight(res.block_io.weight)
        if create or res.devices:
            rules = effective_device_rules(res.devices)
            if self.devices_enforced:
                self._devices(rules)
            else:
                self.device_rules = rules
        self._unified_part(res)

    def _write(self, controller: str, filename: str, value: str | int) -> None:
        _write(self.dirs[controller], filename, value)

    def _read_int(self, controller: str, filename: str) -> int:
        return int(_read(self.dirs[controller], filename))

    def _memory(self, res: Resources) -> None:
        m = res.memory
        assert m is not None
        has_memsw = os.path.exists(os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes"))
        if m.swap is not None and not has_memsw:
            common.refuse(
                "swap limits need memory.memsw.limit_in_bytes (swap accounting is off)",
                "linux.resources.memory.swap",
                "boot with swapaccount=1 or remove memory.swap",
            )
        if m.check_before_update and m.limit not in (None, UNLIMITED):
            usage = self._read_int("memory", "memory.usage_in_bytes")
            if m.limit < usage:
                raise SpecError(
                    f"memory limit {m.limit} is below current usage {usage}",
                    where="linux.resources.memory.limit",
                    hint="checkBeforeUpdate is set",
                )
        swap = m.swap
        if m.limit == UNLIMITED and swap is None and has_memsw:
            swap = UNLIMITED  # as runc: unlimited memory with swap unset lifts memsw too
        # memory.limit_in_bytes <= memsw.limit_in_bytes at every step: raise memsw first when it grows
        current_memsw = self._read_int("memory", "memory.memsw.limit_in_bytes") if has_memsw else None
        swap_first = swap is not None and (
            swap == UNLIMITED or current_memsw is not None and current_memsw < swap
        )
        if swap is not None and swap_first:
            self._write("memory", "memory.memsw.limit_in_bytes", swap)
        if m.limit is not None:
            self._write("memory", "memory.limit_in_bytes", m.limit)
        if swap is not None and not swap_first:
            self._write("memory", "memory.memsw.limit_in_bytes", swap)
        if m.reservation is not None:
            self._write("memory", "memory.soft_limit_in_bytes", m.reservation)
        if m.swappiness is not None:
            self._write("memory", "memory.swappiness", m.swappiness)
        if m.disable_oom_killer is not None:
            self._write("memory", "memory.oom_control", int(m.disable_oom_killer))

    def _cpu(self, res: Resources) -> None:
        c = res.cpu
        assert c is not None
        if "cpu" in self.dirs:
            for filename, value in (
                ("cpu.shares", c.shares),
                ("cpu.cfs_period_us", c.period),
                ("cpu.cfs_quota_us", c.quota),
                ("cpu.cfs_burst_us", c.burst),
                ("cpu.idle", c.idle),
                ("cpu.rt_period_us", c.realtime_period),
                ("cpu.rt_runtime_us", c.realtime_runtime),
            ):
                if value is not None:
                    self._write("cpu", filename, value)
        if c.cpus:
            self._write("cpuset", "cpuset.cpus", c.cpus)
        if c.mems:
            self._write("cpuset", "cpuset.mems", c.mems)

    def _blkio_weight(self, weight: int) -> None:
        blkio = self.dirs["blkio"]
        if os.path.exists(os.path.join(blkio, "blkio.weight")):
            self._write("blkio", "blkio.weight", weight)
        elif os.path.exists(os.path.join(blkio, "blkio.bfq.weight")) and _bfq_in_use():
            self._write("blkio", "blkio.bfq.weight", weight)
        else:
            common.refuse(
                "blockIO.weight needs blkio.weight (CFQ) or a block device using the bfq scheduler",
                "linux.resources.blockIO.weight",
                "select bfq in /sys/block/<dev>/queue/scheduler, or remove blockIO.weight",
            )

    def _devices(self, rules: list[DeviceRule]) -> None:
        for rule in rules:
            self._write("devices", "devices.allow" if rule.allow else "devices.deny", rule.v1_line())
        self.device_rules = list(rules)

    def _unified_part(self, res: Resources) -> None:
        """hugetlb (when not a v1 hierarchy) and unified keys live in the cgroup2 directory."""
        hugepages = res.hugepage_limits
        if hugepages and "hugetlb" in self.dirs:
            for h in hugepages:
                self._write("hugetlb", f"hugetlb.{h.page_size}.limit_in_bytes", h.limit)
            hugepages = []
        if (hugepages or res.unified) and self.unified is not None:
            self.unified.update(Resources(hugepage_limits=hugepages, unified=res.unified))

    # -- membership ---------------------------------------------------------------------------
    def procs_files(self) -> list[str]:
        files = [os.path.join(d, "cgroup.procs") for d in self._dirs()]
        if self.unified is not None:
            files += self.unified.procs_files()
        return files

    def add(self, pid: int) -> None:
        for d in self._dirs():
            _write(d, "cgroup.procs", pid)
        if self.unified is not None:
            self.unified.add(pid)

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self._dirs():
            found |= common.procs_recursive(d)
        if self.unified is not None:
            found |= set(self.unified.pids())
        return sorted(found)

    # -- freezer and signals ------------------------------------------------------------------
    def _freezer_state(self) -> str:
        return _read(self.dirs["freezer"], "freezer.state")

    def freeze(self) -> None:
        if "freezer" not in self.dirs:
            return self._unified_or_refuse().freeze()
        self._write("freezer", "freezer.state", "FROZEN")
        try:
            common.wait_until(lambda: self._freezer_state() == "FROZEN", f"{self.path} to freeze")
        except BaseException:
            self._write("freezer", "freezer.state", "THAWED")  # never leave it half-frozen
            raise

    def thaw(self) -> None:
        if "freezer" not in self.dirs:
            return self._unified_or_refuse().thaw()
        self._write("freezer", "freezer.state", "THAWED")
        common.wait_until(lambda: self._freezer_state() == "THAWED", f"{self.path} to thaw")

    def frozen(self) -> bool:
        if "freezer" not in self.dirs:
            return self._unified_or_refuse().frozen()
        return self._freezer_state() == "FROZEN"

    def _exists(self, controller: str) -> bool:
        """Whether the directory that serves `controller` (the unified one when not joined) exists."""
        if controller in self.dirs:
            return os.path.isdir(self.dirs[controller])
        return self.unified is not None and os.path.isdir(self.unified.unified_path())

    def _unified_or_refuse(self) -> v2.Cgroup:
        if self.unified is None:
            common.refuse(f"cgroup {self.path} has no freezer", "cgroups", "mount the v1 freezer controller")
        assert self.unified is not None
        return self.unified

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.unified is not None and sig == signal.SIGKILL:
            return self.unified.kill(sig)  # every container process is in its unified cgroup
        common.signal_while_frozen(self, sig)

    # -- accounting ---------------------------------------------------------------------------
    def stats(self) -> dict:
        out: dict[str, int | None] = dict.fromkeys(
            (
                "memory_current",
                "memory_peak",
                "memory_limit",
                "memory_swap_limit",
                "cpu_usage_usec",
                "pids_current",
                "pids_limit",
            )
        )
        if "memory" in self.dirs:
            out["memory_current"] = self._read_int("memory", "memory.usage_in_bytes")
            out["memory_peak"] = self._read_int("memory", "memory.max_usage_in_bytes")
            out["memory_limit"] = _unlimited(self._read_int("memory", "memory.limit_in_bytes"))
            if os.path.exists(os.path.join(self.dirs["memory"], "memory.memsw.limit_in_bytes")):
                out["memory_swap_limit"] = _unlimited(self._read_int("memory", "memory.memsw.limit_in_bytes"))
        if "cpuacct" in self.dirs:
            out["cpu_usage_usec"] = self._read_int("cpuacct", "cpuacct.usage") // 1000
        elif self.unified is not None:
            usage = common.read_keyed(os.path.join(self.unified.unified_path(), "cpu.stat"))
            out["cpu_usage_usec"] = usage.get("usage_usec")
        if "pids" in self.dirs:
            out["pids_current"] = common.read_int_or_max(os.path.join(self.dirs["pids"], "pids.current"))
            out["pids_limit"] = common.read_int_or_max(os.path.join(self.dirs["pids"], "pids.max"))
        elif self.unified is not None:
            out["pids_current"] = len(self.unified.pids())
        out["oom_kills"] = self.oom_kills()
        return out

    def oom_kills(self) -> int:
        if "memory" not in self.dirs:
            return 0
        path = os.path.join(self.dirs["memory"], "memory.oom_control")
        return common.read_keyed(path).get("oom_kill", 0)

    def unified_id(self) -> int:
        return os.stat(self.unified_path()).st_ino

    def unified_path(self) -> str:
        if self.unified is None:
            common.refuse(
                "this host has no cgroup2 tree: no cgroup id for BPF",
                "cgroups",
                "mount cgroup2 at /sys/fs/cgroup/unified (hybrid) or boot with cgroup v2",
            )
        assert self.unified is not None
        return self.unified.unified_path()

    # -- teardown -----------------------------------------------------------------------------
    def destroy(self) -> None:
        if self._exists("freezer") and self.frozen():
            self.thaw()
        if self.pids():
            self.kill(signal.SIGKILL)
            common.wait_until(lambda: not self.pids(), f"{self.path} to empty")
        self.remove_dirs()

    def remove_dirs(self) -> None:
        created = set(self.created)
        for mount in self.mount_points():
            common.remove_tree(os.path.join(mount, self.path))
            common.remove_empty_parents(
                mount, self.path, lambda p, m=mount: p in created or common.under_stockade(m, p)
            )
        if self.unified is not None:
            self.unified.destroy()
        elif self.driver.unified_root is not None and os.path.isdir(
            os.path.join(self.driver.unified_root, self.path)
        ):
            v2.Cgroup(self.driver.unified_root, self.path).destroy()

    def undo_create(self) -> None:
        """A failed create(): remove only the dirs it made (a pre-existing leaf belongs to someone else)."""
        if self.unified is not None:
            self.unified.destroy()
        for d in reversed(self.created):
            common.remove_tree(d)


def _max(v: int) -> str:
    return "max" if v == UNLIMITED else str(v)


def _unlimited(v: int | None) -> int | None:
    return UNLIMITED if v is None or v >= _UNLIMITED_V1 else v


def _bfq_in_use() -> bool:
    import glob  # only for a blockIO weight

    for path in glob.glob("/sys/block/*/queue/scheduler"):
        try:
            if "[bfq]" in common.read(path):
                return True
        except OSError:
            continue
    return False
