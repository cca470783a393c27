"""runtime.resources + runtime.cgroups against the real kernel.

Drivers under test:
  v1  - the hybrid/legacy driver at /sys/fs/cgroup (skipped on a pure cgroup v2 host: not applicable there).
  v2  - the cgroup2 driver. Core features (freeze, kill, destroy, ids) need no controller and run on
        this hybrid host against /sys/fs/cgroup/unified; resource limits need the v2 controllers and run
        in the QEMU lab (marked `lab`, skipped here via tests/kernel.py:require, failing in CI).
Every cgroup and process a test makes is removed by the `scratch` fixture's finalizer, even on failure.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from kernel import require
from stockade.runtime import cgroups
from stockade.runtime.cgroups import v2 as v2mod
from stockade.runtime.errors import NotSupported, SpecError, StockadeError
from stockade.runtime.resources import DEFAULT_DEVICE_RULES, DeviceRule, Resources, parse_cpus, parse_size

ROOT = "/sys/fs/cgroup"
MiB = 1 << 20


def _v2_root() -> str | None:
    for root in (ROOT, f"{ROOT}/unified"):
        if cgroups.is_cgroup2(root):
            return root
    return None


def _open(kind: str):
    if kind == "v1":
        if cgroups.is_cgroup2(ROOT):  # host shape, not a gap: such a host runs the v2 tests instead
            pytest.skip("pure cgroup v2 host: the v1 driver does not apply")
        return cgroups.open_driver(ROOT)
    root = _v2_root()
    require(root is not None, "no cgroup2 hierarchy mounted")
    return v2mod.Driver(root)


def _need(driver, *controllers: str) -> None:
    """v2 resource tests need the controllers (present in the QEMU lab, absent on hybrid hosts)."""
    have = set(driver.controllers())
    missing = [c for c in controllers if c not in have]
    if driver.name == "v1":
        if missing:  # host shape: which v1 hierarchies a host mounts is its choice (v2 is the lab's)
            pytest.skip(f"v1 controller(s) {missing} not mounted")
        return
    require(not missing, f"cgroup v2 controller(s) {missing} not available (runs in the QEMU lab)")


def _find(name: str) -> list[str]:
    out = subprocess.run(["find", ROOT, "-name", name], capture_output=True, text=True).stdout
    return out.split()


def _join(files: list[str]):
    def preexec() -> None:
        for f in files:
            with open(f, "w") as fh:
                fh.write("0")

    return preexec


class Scratch:
    """Makes cgroups and processes; cleanup() removes all of them."""

    def __init__(self) -> None:
        self.cgroups: list = []
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []

    def path(self) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.names.append(name)
        return cgroups.resolve_path(None, name)

    def create(self, driver, resources: dict | Resources | None = None, path: str | None = None):
        res = Resources.from_oci(resources) if isinstance(resources, dict) else resources
        cg = driver.create(path or self.path(), res)
        self.cgroups.append(cg)
        return cg

    def spawn(self, cg, code: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, "-c", code],
            preexec_fn=_join(cg.procs_files()),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for cg in self.cgroups:
            try:
                cg.destroy()
            except Exception:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for name in self.names:  # a bug must not leave dirs behind: remove leftovers deepest first
            for d in sorted(_find(name), key=len, reverse=True):
                subprocess.run(["find", d, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])


@pytest.fixture
def scratch():
    scratch = Scratch()
    yield scratch
    scratch.cleanup()


@pytest.fixture(params=["v1", "v2"])
def driver(request):
    """Core features: run for both drivers on this host."""
    return _open(request.param)


@pytest.fixture(params=["v1", pytest.param("v2", marks=pytest.mark.lab)])
def rdriver(request):
    """Resource limits: v2 needs the controllers of a pure cgroup v2 host (QEMU lab)."""
    return _open(request.param)


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _file(cg, v1_controller: str, v1_name: str, v2_name: str) -> str:
    if isinstance(cg, v2mod.Cgroup):
        return _read(os.path.join(cg.dir, v2_name))
    return _read(os.path.join(cg.dirs[v1_controller], v1_name))


# -- parsing (no kernel) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("256M", 256 * MiB),
        ("1G", 1 << 30),
        ("512k", 512 * 1024),
        ("1048576", 1048576),
        ("max", -1),
        ("1.5G", 3 << 29),
        ("64MiB", 64 * MiB),
        ("2gb", 2 << 30),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text, "--memory") == expected


@pytest.mark.parametrize("text", ["12Q", "", "-1", "abc", "1.5", "M", "12i"])
def test_parse_size_rejects(text):
    with pytest.raises(SpecError) as e:
        parse_size(text, "--memory")
    assert "--memory" in str(e.value)


def test_parse_cpus():
    assert parse_cpus("0.5", "--cpus") == (50000, 100000)
    assert parse_cpus("2", "--cpus") == (200000, 100000)
    for bad in ("abc", "0", "-1", "0.001", "nan", "inf"):
        with pytest.raises(SpecError):
            parse_cpus(bad, "--cpus")


def test_from_oci_full():
    r = Resources.from_oci(
        {
            "memory": {
                "limit": 64 * MiB,
                "reservation": 32 * MiB,
                "swap": 128 * MiB,
                "disableOOMKiller": False,
            },
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0", "idle": 0},
            "pids": {"limit": 32},
            "blockIO": {"weight": 500},
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}],
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rw"},
            ],
            "unified": {"memory.high": "50M"},
        }
    )
    assert r.memory.limit == 64 * MiB and r.memory.swap == 128 * MiB
    assert (r.cpu.shares, r.cpu.quota, r.cpu.period, r.cpu.cpus) == (512, 50000, 100000, "0-1")
    assert r.pids_limit == 32 and r.block_io.weight == 500
    assert r.devices[1] == DeviceRule(True, "c", 10, 200, "rw")
    assert r.devices[1].v1_line() == "c 10:200 rw"
    assert Resources.from_oci(None).is_empty() and Resources.from_oci({}).is_empty()


@pytest.mark.parametrize(
    "spec,field",
    [
        ({"memory": {"limit": "1G"}}, "memory.limit"),
        ({"memory": {"limit": -5}}, "memory.limit"),
        ({"memory": {"limit": 64 * MiB, "swap": MiB}}, "memory.swap"),
        ({"memory": {"swap": 64 * MiB}}, "memory.swap"),
        ({"cpu": {"shares": 1}}, "cpu.shares"),
        ({"cpu": {"quota": -7}}, "cpu.quota"),
        ({"cpu": {"cpus": "0-a"}}, "cpu.cpus"),
        ({"cpu": {"cpus": "3-1"}}, "cpu.cpus"),
        ({"pids": {"limit": -2}}, "pids.limit"),
        ({"pids": {"limit": True}}, "pids.limit"),
        ({"blockIO": {"weight": 5}}, "blockIO.weight"),
        ({"devices": [{"allow": True, "access": "rwx"}]}, "devices[0].access"),
        ({"devices": [{"type": "c"}]}, "devices[0].allow"),
        ({"hugepageLimits": [{"pageSize": "2M", "limit": 1}]}, "hugepageLimits[0].pageSize"),
        ({"unified": {"cgroup.procs": "1"}}, "unified"),
        ({"memroy": {}}, "linux.resources"),
        ({"memory": []}, "memory"),
    ],
)
def test_from_oci_rejects(spec, field):
    with pytest.raises(SpecError) as e:
        Resources.from_oci(spec)
    assert field in e.value.where


def test_resolve_path():
    assert cgroups.resolve_path(None, "abc") == "stockade/abc"
    assert cgroups.resolve_path("", "abc") == "stockade/abc"
    assert cgroups.resolve_path("/tenants/t1/abc", "abc") == "tenants/t1/abc"
    assert cgroups.resolve_path("tenants//abc/", "abc") == "tenants/abc"
    for bad in ("/a/../../etc", "..", "/", "a/.."):
        with pytest.raises(SpecError):
            cgroups.resolve_path(bad, "abc")
    # containerd's form for a ".slice" parent with the cgroupfs driver: one directory, as with runc
    assert cgroups.resolve_path("test.slice:cri-containerd:abc", "abc") == "test.slice:cri-containerd:abc"
    with pytest.raises(SpecError):
        cgroups.resolve_path(None, "../x")


def test_describe_host():
    info = cgroups.describe_host()
    assert info["mode"] in ("v1", "hybrid", "v2") and info["driver"] in ("v1", "v2")
    assert info["driver"] == cgroups.open_driver().name


# -- resource limits (real kernel) ---------------------------------------------------------------

ALLOC = "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))\n"


def test_memory_limit_oom_kills(rdriver, scratch):
    _need(rdriver, "memory")
    cg = scratch.create(rdriver, {"memory": {"limit": 48 * MiB, "swap": 48 * MiB}})
    p = scratch.spawn(cg, ALLOC)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert cg.oom_kills() >= 1
    stats = cg.stats()
    assert stats["memory_limit"] == 48 * MiB and stats["oom_kills"] >= 1
    assert stats["memory_peak"] > 32 * MiB


FORK_LOOP = """
import os, time
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print(e.errno, n, flush=True)
time.sleep(60)
"""


def test_pids_limit_stops_fork(rdriver, scratch):
    _need(rdriver, "pids")
    cg = scratch.create(rdriver, {"pids": {"limit": 8}})
    p = scratch.spawn(cg, FORK_LOOP)
    err, forked = map(int, p.stdout.readline().split())
    assert err == errno.EAGAIN
    assert forked == 7  # the parent counts as one of the 8
    assert cg.stats()["pids_current"] <= 8
    assert len(cg.pids()) == 8
    cg.update(Resources.from_oci({"pids": {"limit": 20}}))
    assert cg.stats()["pids_limit"] == 20


def test_cpu_quota_shares_cpuset_written(rdriver, scratch):
    _need(rdriver, "cpu", "cpuset")
    cg = scratch.create(
        rdriver, {"cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0", "mems": "0"}}
    )
    if rdriver.name == "v1":
        assert _file(cg, "cpu", "cpu.shares", "") == "512"
        assert _file(cg, "cpu", "cpu.cfs_quota_us", "") == "50000"
        assert _file(cg, "cpu", "cpu.cfs_period_us", "") == "100000"
    else:
        assert _read(os.path.join(cg.dir, "cpu.weight")) == str(v2mod.shares_to_weight(512))
        assert _read(os.path.join(cg.dir, "cpu.max")) == "50000 100000"
    assert _file(cg, "cpuset", "cpuset.cpus", "cpuset.cpus") == "0"
    assert _file(cg, "cpuset", "cpuset.mems", "cpuset.mems") == "0"
    # a process in it runs on CPU 0 only
    p = scratch.spawn(cg, "import os; print(sorted(os.sched_getaffinity(0)), flush=True)")
    assert p.stdout.readline().strip() == "[0]"
    cg.update(Resources.from_oci({"cpu": {"quota": -1}}))
    if rdriver.name == "v1":
        assert _file(cg, "cpu", "cpu.cfs_quota_us", "") == "-1"
    else:
        assert _read(os.path.join(cg.dir, "cpu.max")) == "max 100000"


def test_shares_and_weight_conversions():
    assert v2mod.shares_to_weight(2) == 1 and v2mod.shares_to_weight(262144) == 10000
    assert v2mod.shares_to_weight(1024) == 39
    assert v2mod.blkio_to_io_weight(10) == 1 and v2mod.blkio_to_io_weight(1000) == 10000
    assert v2mod.swap_to_v2(128 * MiB, 64 * MiB) == 64 * MiB
    assert v2mod.swap_to_v2(None, -1) == -1 and v2mod.swap_to_v2(-1, 64 * MiB) == -1
    assert v2mod.swap_to_v2(None, 64 * MiB) is None


def test_v1_devices_enforced(scratch):
    driver = _open("v1")
    cg = scratch.create(driver, {"devices": [{"allow": False, "access": "rwm"}]})
    if driver.unified_root is None:  # pure v1: the devices hierarchy enforces the rules
        assert cg.devices_enforced
        listed = _read(os.path.join(cg.dirs["devices"], "devices.list")).splitlines()
        assert listed == [r.v1_line() for r in DEFAULT_DEVICE_RULES]
    else:  # hybrid: no devices membership; the rules become the unified cgroup's BPF device program
        from stockade.bpf.device_filter import attach_device_filter

        assert not cg.devices_enforced and "devices" not in cg.dirs
        assert cg.device_rules[0] == DeviceRule(False, "a")
        assert cg.device_rules[-len(DEFAULT_DEVICE_RULES):] == DEFAULT_DEVICE_RULES
        attach_device_filter(cg.unified_path(), cg.device_rules, replace=False)
    code = """
import errno
open('/dev/null', 'w').close()
try:
    open('/dev/kmsg').close()
    print('open')
except OSError as e:
    print(errno.errorcode[e.errno])
"""
    p = scratch.spawn(cg, code)
    assert p.stdout.read().strip() == "EPERM"
    assert p.wait() == 0


def test_v2_exposes_device_rules(scratch):
    driver = _open("v2")
    rules = [{"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rw"}]
    cg = scratch.create(driver, {"devices": rules})
    assert not cg.devices_enforced
    assert cg.device_rules[0] == DeviceRule(False, "a")
    assert cg.device_rules[1] == DeviceRule(True, "c", 10, 200, "rw")
    assert cg.device_rules[2:] == DEFAULT_DEVICE_RULES
    assert cg.device_rules[0].to_oci() == {"allow": False, "type": "a", "access": "rwm"}
    assert cg.device_rules[1].to_oci() == rules[0]


def test_v2_refuses_v1_only_knobs(scratch):
    driver = _open("v2")
    path = scratch.path()
    with pytest.raises(NotSupported) as e:
        driver.create(path, Resources.from_oci({"memory": {"disableOOMKiller": True}}))
    assert "disableOOMKiller" in e.value.where
    assert _find(path.split("/")[-1]) == []


def test_v1_refuses_network_and_rdma(scratch):
    driver = _open("v1")
    path = scratch.path()
    with pytest.raises(NotSupported, match="net_cls"):
        driver.create(path, Resources.from_oci({"network": {"classID": 1}}))
    with pytest.raises(NotSupported, match="rdma"):
        driver.create(path, Resources.from_oci({"rdma": {"mlx5_0": {"hcaHandles": 1}}}))
    with pytest.raises(NotSupported, match="weightDevice"):
        driver.create(
            path, Resources.from_oci({"blockIO": {"weightDevice": [{"major": 8, "minor": 0, "weight": 100}]}})
        )
    assert _find(path.split("/")[-1]) == []


def test_v1_hugetlb_through_unified_tree(scratch):
    driver = _open("v1")
    if "hugetlb" in driver.mounts:  # host shape: then the v1 hierarchy serves it, as tested above
        pytest.skip("hugetlb is a v1 hierarchy here")
    require("hugetlb" in driver.unified_controllers(), "hugetlb controller in the cgroup2 tree")
    root_ctl = os.path.join(driver.unified_root, "cgroup.subtree_control")
    enabled_before = "hugetlb" in _read(root_ctl).split()
    # a private parent, so enabling hugetlb never lands in the shared "stockade" dir other tests use
    parent = f"stockade-hugetlb-{uuid.uuid4().hex[:8]}"
    scratch.names.append(parent)
    try:
        cg = scratch.create(
            driver, {"hugepageLimits": [{"pageSize": "2MB", "limit": 4 * MiB}]}, path=f"{parent}/c"
        )
        assert _read(os.path.join(cg.unified_path(), "hugetlb.2MB.max")) == str(4 * MiB)
        with pytest.raises(NotSupported, match="3MB"):
            cg.update(Resources.from_oci({"hugepageLimits": [{"pageSize": "3MB", "limit": 0}]}))
        cg.destroy()
        assert _find(parent) == []  # the parent it created went with it
    finally:
        scratch.cleanup()
        scratch.cgroups.clear()
        if not enabled_before:  # leave the host's unified root as we found it (best effort: EBUSY if
            try:  # someone else enabled hugetlb below the root meanwhile)
                with open(root_ctl, "w") as f:
                    f.write("-hugetlb")
            except OSError:
                pass


# -- lifecycle (real kernel, both drivers) -------------------------------------------------------


def test_freeze_thaw_stops_busy_process(driver, scratch):
    cg = scratch.create(driver)
    p = scratch.spawn(cg, "while True: pass")
    time.sleep(0.2)
    assert p.pid in cg.pids()
    cg.freeze()
    assert cg.frozen()
    t1 = _cpu_ticks(p.pid)
    time.sleep(0.5)
    assert _cpu_ticks(p.pid) == t1
    cg.thaw()
    assert not cg.frozen()
    _eventually(lambda: _cpu_ticks(p.pid) > t1 + 5)  # it runs again (slowly on a loaded 2-core host)


def test_kill_empties_cgroup(driver, scratch):
    cg = scratch.create(driver)
    procs = [scratch.spawn(cg, "import os, time\nos.fork()\ntime.sleep(60)") for _ in range(3)]
    deadline = time.monotonic() + 5
    while len(cg.pids()) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(cg.pids()) == 6
    cg.kill()
    for p in procs:
        assert p.wait(timeout=5) == -signal.SIGKILL
    deadline = time.monotonic() + 5
    while cg.pids() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cg.pids() == []


def test_kill_with_other_signal(driver, scratch):
    cg = scratch.create(driver)
    p = scratch.spawn(cg, "import time; print('up', flush=True); time.sleep(60)")
    assert p.stdout.readline().strip() == "up"
    cg.kill(signal.SIGTERM)
    assert p.wait(timeout=5) == -signal.SIGTERM
    assert not cg.frozen()


def test_destroy_leaves_nothing(driver, scratch):
    cg = scratch.create(driver)
    name = cg.path.split("/")[-1]
    p = scratch.spawn(cg, "import time; time.sleep(60)")
    assert _find(name)
    cg.freeze()
    cg.destroy()  # kills a frozen process, removes every hierarchy's dir
    assert p.wait(timeout=5) == -signal.SIGKILL
    assert _find(name) == []
    cg.destroy()  # idempotent
    with pytest.raises(StockadeError):
        driver.open(cg.path)


def test_destroy_keeps_shared_parent_in_use(driver, scratch):
    a, b = scratch.create(driver), scratch.create(driver)
    a.destroy()
    assert _find(b.path.split("/")[-1])  # "stockade" parent still holds b
    b.destroy()
    assert _find(a.path.split("/")[-1]) == [] and _find(b.path.split("/")[-1]) == []


def test_unified_id_is_inode(driver, scratch):
    cg = scratch.create(driver)
    assert cg.unified_id() == os.stat(cg.unified_path()).st_ino
    assert cg.unified_path().startswith(_v2_root() + "/")
    # the process really is in that cgroup2 dir
    p = scratch.spawn(cg, "print(open('/proc/self/cgroup').read(), flush=True)")
    lines = p.stdout.read().splitlines()
    rel = cg.unified_path()[len(_v2_root()) :]
    assert f"0::{rel}" in lines


def test_open_existing_and_stats(driver, scratch):
    # A memory limit: on a hybrid host that is what puts the container in the v1 memory hierarchy.
    cg = scratch.create(driver, {"memory": {"limit": 512 * MiB}} if driver.name == "v1" else None)
    p = scratch.spawn(cg, "x = b'y' * (8 << 20)\nprint('up', flush=True)\nwhile True: pass")
    assert p.stdout.readline().strip() == "up"
    again = driver.open(cg.path)
    assert again.pids() == [p.pid]
    stats = again.stats()
    keys = {"memory_current", "memory_peak", "memory_limit", "cpu_usage_usec", "pids_current", "oom_kills"}
    assert set(stats) >= keys
    _eventually(lambda: again.stats()["cpu_usage_usec"] > 50_000)  # cpu.stat is core in cgroup2 too
    if driver.name == "v1":
        assert stats["memory_current"] > 8 * MiB
        assert stats["pids_current"] == 1 and stats["memory_limit"] == 512 * MiB


def test_hybrid_joins_only_the_hierarchies_its_limits_need(scratch):
    """Hybrid host: a limit-free container is in its unified cgroup only (born there: no
    migration); `update` with a first limit joins that hierarchy with every process."""
    driver = _open("v1")
    if driver.unified_root is None:  # host shape: without a cgroup2 tree there is nothing to skip
        pytest.skip("pure v1 host: every hierarchy is joined")
    cg = scratch.create(driver)
    assert cg.dirs == {} and not cg.devices_enforced
    p = scratch.spawn(cg, "print('up', flush=True)\nwhile True: pass")
    assert p.stdout.readline().strip() == "up"
    cg.freeze()
    assert cg.frozen()
    cg.thaw()
    stats = driver.open(cg.path).stats()
    assert stats["pids_current"] == 1 and stats["memory_current"] is None
    cg.update(Resources.from_oci({"pids": {"limit": 7}}))
    assert set(cg.dirs) == {"pids"}
    assert _read(os.path.join(cg.dirs["pids"], "cgroup.procs")).split() == [str(p.pid)]
    assert _read(os.path.join(cg.dirs["pids"], "pids.max")) == "7"
    assert not cg.frozen()


def test_open_missing_refused(driver, scratch):
    with pytest.raises(StockadeError):
        driver.open(scratch.path())


def test_create_failing_halfway_leaves_nothing(driver, scratch):
    path = scratch.path()
    name = path.split("/")[-1]
    if driver.name == "v1":
        bad = {"pids": {"limit": 5}, "cpu": {"cpus": "63"}}  # dirs made, pids written, cpuset refused
    else:
        bad = {"unified": {"cgroup.max.descendants": "bogus"}}  # dir made, then the write fails
    with pytest.raises(StockadeError):
        scratch.create(driver, bad, path=path)
    assert _find(name) == []


def test_create_refuses_existing_leaf(driver, scratch):
    cg = scratch.create(driver)
    p = scratch.spawn(cg, "import time; time.sleep(60)")
    with pytest.raises(StockadeError, match="already exists"):
        driver.create(cg.path, None)
    assert p.poll() is None and cg.pids() == [p.pid]  # the other container is untouched
    assert os.path.isdir(cg.unified_path())


def test_v1_memory_update_keeps_memsw_order(scratch):
    driver = _open("v1")
    _need(driver, "memory")
    cg = scratch.create(driver, {"memory": {"limit": 64 * MiB, "swap": 64 * MiB, "reservation": 32 * MiB}})
    mem = cg.dirs["memory"]
    require(os.path.exists(os.path.join(mem, "memory.memsw.limit_in_bytes")),
            "no swap accounting (memory.memsw.*: the kernel's swapaccount)")
    for limit in (128 * MiB, 32 * MiB):  # raising needs memsw first, lowering needs limit first
        cg.update(Resources.from_oci({"memory": {"limit": limit, "swap": limit}}))
        assert _read(os.path.join(mem, "memory.limit_in_bytes")) == str(limit)
        assert _read(os.path.join(mem, "memory.memsw.limit_in_bytes")) == str(limit)
    assert _read(os.path.join(mem, "memory.soft_limit_in_bytes")) == str(32 * MiB)
    cg.update(Resources.from_oci({"memory": {"limit": -1}}))
    assert cg.stats()["memory_limit"] == -1 and cg.stats()["memory_swap_limit"] == -1
    p = scratch.spawn(cg, "x = b'y' * (16 << 20)\nprint('ok', flush=True)\nimport time; time.sleep(60)")
    assert p.stdout.readline().strip() == "ok"
    with pytest.raises(SpecError, match="below current usage"):
        cg.update(Resources.from_oci({"memory": {"limit": 4 * MiB, "checkBeforeUpdate": True}}))


@pytest.mark.lab
def test_v2_full_lifecycle_with_controllers(scratch):
    """Pure cgroup v2: every controller-backed file, then freeze/kill/destroy with controllers enabled."""
    driver = _open("v2")
    _need(driver, "memory", "pids", "cpu", "cpuset")
    cg = scratch.create(
        driver,
        {
            "memory": {"limit": 96 * MiB, "reservation": 16 * MiB, "swap": 128 * MiB},
            "cpu": {"shares": 1024, "quota": 20000, "period": 100000, "cpus": "0"},
            "pids": {"limit": 16},
            "unified": {"memory.high": str(80 * MiB)},
        },
    )
    f = lambda name: _read(os.path.join(cg.dir, name))  # noqa: E731
    assert f("memory.max") == str(96 * MiB) and f("memory.low") == str(16 * MiB)
    if os.path.exists(os.path.join(cg.dir, "memory.swap.max")):
        assert f("memory.swap.max") == str(32 * MiB)  # OCI memory+swap minus memory
    assert f("memory.high") == str(80 * MiB) and f("pids.max") == "16"
    assert f("cpu.weight") == str(v2mod.shares_to_weight(1024)) and f("cpu.max") == "20000 100000"
    p = scratch.spawn(cg, "while True: pass")
    time.sleep(0.3)
    usage0, t0 = cg.stats()["cpu_usage_usec"], time.monotonic()
    time.sleep(1.0)
    used = cg.stats()["cpu_usage_usec"] - usage0
    wall = (time.monotonic() - t0) * 1e6
    assert 0.05 * wall < used < 0.35 * wall  # a busy loop held to its 20% quota
    cg.freeze()
    t1 = _cpu_ticks(p.pid)
    time.sleep(0.3)
    assert _cpu_ticks(p.pid) == t1
    cg.update(Resources.from_oci({"memory": {"limit": -1}, "pids": {"limit": -1}}))
    assert f("memory.max") == "max" and f("pids.max") == "max"
    name = cg.path.split("/")[-1]
    cg.destroy()  # frozen + running: cgroup.kill, wait for populated 0, rmdir
    assert p.wait(timeout=5) == -signal.SIGKILL
    assert _find(name) == []


@pytest.fixture
def loopdev(tmp_path):
    """A loop device over a 16 MiB file, detached afterwards: (/dev path, major, minor)."""
    image = tmp_path / "stockade-loop.img"
    image.write_bytes(b"\0" * (16 << 20))
    attach = ["losetup", "--find", "--show", str(image)]
    out = subprocess.run(attach, capture_output=True, text=True)
    if out.returncode != 0 and not os.path.exists("/dev/loop-control"):  # e.g. the scratch: load the driver
        subprocess.run(["modprobe", "loop"], capture_output=True)
        out = subprocess.run(attach, capture_output=True, text=True)
    require(out.returncode == 0, f"cannot attach a loop device: {out.stderr.strip()}")
    dev = out.stdout.strip()
    try:
        major, minor = map(int, _read(f"/sys/block/{os.path.basename(dev)}/dev").split(":"))
        yield dev, major, minor
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


READ_DIRECT = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 16)
start = time.monotonic()
for i in range(16):  # 1 MiB in 64 KiB direct reads, past any cache
    os.preadv(fd, [buf], i << 16)
print(time.monotonic() - start, flush=True)
"""


def test_v1_blkio_throttle_slows_reads(scratch, loopdev):
    driver = _open("v1")
    _need(driver, "blkio")
    path, major, minor = loopdev
    cg = scratch.create(
        driver,
        {
            "blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 512 * 1024}]},
            "devices": [{"allow": True, "type": "b", "major": major, "minor": minor, "access": "r"}],
        },
    )
    limit = _read(os.path.join(cg.dirs["blkio"], "blkio.throttle.read_bps_device"))
    assert limit == f"{major}:{minor} {512 * 1024}"
    p = subprocess.Popen(
        [sys.executable, "-c", READ_DIRECT, path],
        preexec_fn=_join(cg.procs_files()),
        stdout=subprocess.PIPE,
        text=True,
    )
    scratch.procs.append(p)
    elapsed = float(p.stdout.readline())
    assert p.wait() == 0
    assert elapsed > 1.2  # 1 MiB at 512 KiB/s: about 2 s (unthrottled: milliseconds)
    cg.update(
        Resources.from_oci(
            {"blockIO": {"throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 0}]}}
        )
    )
    assert _read(os.path.join(cg.dirs["blkio"], "blkio.throttle.read_bps_device")) == ""


@pytest.mark.lab
def test_v2_io_max_written(scratch, loopdev):
    driver = _open("v2")
    _need(driver, "io")
    _, major, minor = loopdev
    cg = scratch.create(
        driver,
        {
            "blockIO": {
                "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1 << 20}],
                "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 100}],
            }
        },
    )
    line = _read(os.path.join(cg.dir, "io.max"))
    assert line == f"{major}:{minor} rbps={1 << 20} wbps=max riops=max wiops=100"


def test_v2_missing_controller_refused_not_skipped(scratch):
    """A limit whose controller the cgroup2 tree lacks is refused, never silently dropped."""
    driver = _open("v2")
    if "memory" in driver.controllers():  # host shape: only a hybrid host's cgroup2 tree lacks it
        pytest.skip("this cgroup2 tree has the memory controller (nothing to refuse)")
    path = scratch.path()
    with pytest.raises(NotSupported, match="memory"):
        driver.create(path, Resources.from_oci({"memory": {"limit": 64 * MiB}}))
    assert _find(path.split("/")[-1]) == []
