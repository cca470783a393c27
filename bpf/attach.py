"""Loading, attaching and pinning Stockade's BPF programs, as a library: what `stockade agent`
does once per boot, and what the CRI server does in its own process.

What it leaves in the kernel outlives the caller: maps and programs pinned under the pin
directory, cgroup programs attached (BPF_F_ALLOW_MULTI) to the Stockade parent cgroup (the
egress programs only pinned: the runtime attaches them per container, maps.attach_egress), BPF-LSM
links pinned as link_lsm_<hook>. A later setup finds the pins and re-uses them; `teardown`
undoes everything. Never attaches to the root cgroup.
"""

from __future__ import annotations

import os

from stockade.bpf import bpfsys, loader, maps, probe
from stockade.runtime.errors import NotSupported

BPFFS = "/sys/fs/bpf"
KEEPER = "stockade-agent"  # child cgroup of the parent; never holds processes


# -- host facts ------------------------------------------------------------------------------

def unified_mount() -> str:
    """Where the cgroup2 hierarchy is mounted (hybrid hosts: /sys/fs/cgroup/unified)."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    points = [m[1] for m in mounts if m[2] == "cgroup2"]
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in points:
            return preferred
    if points:
        return points[0]
    raise NotSupported("no cgroup2 hierarchy is mounted", hint="mount -t cgroup2 none /sys/fs/cgroup/unified")


def default_cgroup_root() -> str:
    return os.environ.get("STOCKADE_BPF_CGROUP_ROOT") or os.path.join(unified_mount(), "stockade")


def cgroup_id(path: str) -> int:
    """A cgroup2 directory's id is its kernfs inode number (64-bit kernels)."""
    return os.stat(path).st_ino


def cgroup_level(path: str) -> int:
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(unified_mount()))
    if rel == "." or rel.startswith(".."):
        raise NotSupported("the Stockade parent cgroup must be below the cgroup2 root", where=path,
                           hint="Stockade never attaches programs to the root cgroup")
    return len(rel.split(os.sep))


BPFFS_SOURCE = "stockade-bpffs"  # the name a bpffs the agent mounted itself carries
# What every bpffs instance holds from the start (the kernel's preloaded iterators).
_BPFFS_OWN_ENTRIES = {"maps.debug", "progs.debug"}


def _bpffs_source() -> str | None:
    """The source of the bpffs mounted at BPFFS, or None when there is none."""
    with open("/proc/self/mounts") as f:
        for line in f:
            source, target, fstype = line.split()[:3]
            if target == BPFFS and fstype == "bpf":
                return source
    return None


def ensure_bpffs() -> None:
    if _bpffs_source() is not None:
        return
    if os.system(f"mount -t bpf {BPFFS_SOURCE} {BPFFS}") != 0:  # noqa: S605 - fixed arguments
        raise NotSupported(f"bpffs is not mounted at {BPFFS} and mounting it failed",
                           hint=f"mount -t bpf bpf {BPFFS}")


# -- load / attach / pin ---------------------------------------------------------------------

def _pinned_prog_fd(pin_dir: str, name: str) -> int | None:
    try:
        return bpfsys.obj_get(maps.pin_path(f"prog_{name}", pin_dir))
    except OSError:
        return None


def _attached_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    try:
        return bpfsys.prog_query(cgroup_fd, attach_type)
    except OSError:
        return []


def setup(pin_dir: str, cgroup_root: str, *, with_lsm: bool = True, use_cache: bool = True) -> dict:
    """Make the pins and attachments exist; idempotent. Returns what it found and did."""
    level = cgroup_level(cgroup_root)  # refuses the root cgroup before anything is made
    ensure_bpffs()
    os.makedirs(pin_dir, exist_ok=True)
    created_cgroup = not os.path.isdir(cgroup_root)
    os.makedirs(cgroup_root, exist_ok=True)
    # an empty child keeps the parent from being rmdir'ed when its last container goes (the
    # runtime prunes empty "stockade" parents); removing it would drop the attached programs
    os.makedirs(os.path.join(cgroup_root, KEEPER), exist_ok=True)
    if maps.create_maps(pin_dir):
        # a new map layout: programs pinned by an older version still point at the old maps
        _unpin_programs(cgroup_root, pin_dir)
    maps.write_config(cgroup_id(cgroup_root), level, pin_dir)
    report = {"pin_dir": pin_dir, "cgroup_root": cgroup_root, "cgroup_id": cgroup_id(cgroup_root),
              "created_cgroup": created_cgroup, "cgroup_programs": "pinned"}
    existing = {s.name: _pinned_prog_fd(pin_dir, s.name) for s in loader.CGROUP_PROGS}
    try:
        if any(fd is None for fd in existing.values()):
            _drop_partial(cgroup_root, pin_dir, existing)
            existing, how = loader.load_cgroup_programs(pin_dir, use_cache)
            report["cgroup_programs"] = how
            for name, fd in existing.items():
                bpfsys.obj_pin(fd, maps.pin_path(f"prog_{name}", pin_dir))
        _attach_cgroup_programs(cgroup_root, existing)
        _detach_ours(cgroup_root, egress_only=True)  # an older agent attached them at the parent
    finally:
        for fd in existing.values():
            if fd is not None:
                os.close(fd)
    if with_lsm:
        report["lsm"], report["lsm_programs"], report["lsm_reason"] = _setup_lsm(pin_dir, use_cache)
    else:
        report["lsm"], report["lsm_programs"], report["lsm_reason"] = False, "", "not requested (--no-lsm)"
    return report


def _detach_ours(cgroup_root: str, *, egress_only: bool = False) -> list[str]:
    """Detach every Stockade cgroup program attached at the parent, found by name (pinned or not)."""
    done = []
    cg = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for spec in loader.CGROUP_PROGS:
            if egress_only and spec.name not in maps.EGRESS_PROGRAMS:
                continue
            for prog_id in _attached_ids(cg, spec.attach_type):
                try:
                    fd = bpfsys.prog_fd_by_id(prog_id)
                except OSError:
                    continue
                try:
                    if bpfsys.prog_info(fd)["name"] == spec.name[:15]:
                        bpfsys.prog_detach(cg, fd, spec.attach_type)
                        done.append(f"detached {spec.name}")
                finally:
                    os.close(fd)
    finally:
        os.close(cg)
    return done


def _unpin_programs(cgroup_root: str, pin_dir: str) -> None:
    """Detach and unpin every program (cgroup and LSM) so that setup loads them afresh."""
    pinned = {spec.name: _pinned_prog_fd(pin_dir, spec.name) for spec in loader.CGROUP_PROGS}
    _drop_partial(cgroup_root, pin_dir, pinned)
    _unpin_lsm(pin_dir)


def _drop_partial(cgroup_root: str, pin_dir: str, fds: dict[str, int | None]) -> None:
    """An incomplete set of pinned programs (an interrupted start): detach and unpin it."""
    _detach_ours(cgroup_root)
    for spec in loader.CGROUP_PROGS:
        fd = fds.get(spec.name)
        if fd is not None:
            os.close(fd)
            os.unlink(maps.pin_path(f"prog_{spec.name}", pin_dir))


def _attach_cgroup_programs(cgroup_root: str, fds: dict[str, int]) -> None:
    cg = os.open(cgroup_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for spec in loader.PARENT_PROGS:
            prog_id = bpfsys.prog_info(fds[spec.name])["id"]
            if prog_id not in _attached_ids(cg, spec.attach_type):
                bpfsys.prog_attach(cg, fds[spec.name], spec.attach_type, bpfsys.F_ALLOW_MULTI)
    finally:
        os.close(cg)


def _setup_lsm(pin_dir: str, use_cache: bool = True) -> tuple[bool, str, str]:
    """Load and link the BPF-LSM programs, pinning each link; (loaded, how, reason if not)."""
    hooks = loader.lsm_hooks()
    if all(os.path.exists(maps.pin_path(f"link_lsm_{h}", pin_dir)) for h in hooks):
        return True, "pinned", ""
    _unpin_lsm(pin_dir)  # a partial set from an older run: start over
    try:
        links, how = loader.load_lsm_links(pin_dir, use_cache)
    except Exception as e:  # noqa: BLE001 - bcc raises bare Exception
        ok, reason = probe.lsm()  # name the host's reason rather than bcc's wording
        return False, "", reason if not ok else f"loading lsm.bpf.c failed: {e}"
    try:
        for hook, fd in links.items():
            bpfsys.obj_pin(fd, maps.pin_path(f"link_lsm_{hook}", pin_dir))
    except OSError as e:
        _unpin_lsm(pin_dir)
        return False, "", f"pinning LSM links failed: {e}"
    finally:
        for fd in links.values():
            os.close(fd)
    return True, how, ""


def _unpin_lsm(pin_dir: str) -> None:
    for name in os.listdir(pin_dir):
        if name.startswith("link_lsm_"):
            os.unlink(os.path.join(pin_dir, name))


def add_parent(pin_dir: str, cgroup_dir: str) -> bool:
    """Govern containers below a second parent too: the cgroup kubelet puts its pods below
    (/kubepods), which the CRI server does not choose. Attaches the pinned cgroup programs there
    and names it in the config for the LSM; idempotent, True when something changed. Refused
    while another second parent that still exists is set."""
    level = cgroup_level(cgroup_dir)
    os.makedirs(cgroup_dir, exist_ok=True)
    cgid = cgroup_id(cgroup_dir)
    cfg = maps.read_config(pin_dir)
    if not cfg["root_cgid"]:
        raise NotSupported("the BPF programs are not set up", where=pin_dir, hint="start `stockade agent`")
    if cfg["alt_cgid"] == cgid:
        return False
    other = find_cgroup(cfg["alt_cgid"]) if cfg["alt_cgid"] else None
    if other:
        raise NotSupported(f"the BPF programs already govern a second parent cgroup, {other}",
                           where=cgroup_dir, hint="give every pod one cgroup root (kubelet's --cgroup-root)")
    fds = {spec.name: _pinned_prog_fd(pin_dir, spec.name) for spec in loader.PARENT_PROGS}
    try:
        if None in fds.values():
            raise NotSupported("the BPF cgroup programs are not pinned", where=pin_dir,
                               hint="start `stockade agent`")
        _attach_cgroup_programs(cgroup_dir, fds)
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    maps.write_config(cfg["root_cgid"], cfg["root_level"], pin_dir, alt=(cgid, level))
    return True


def find_cgroup(cgid: int, max_depth: int = 4) -> str | None:
    """The cgroup2 directory with id CGID, searched breadth-first near the top (parents live there)."""
    level = [unified_mount()]
    for _ in range(max_depth):
        below = []
        for top in level:
            try:
                entries = list(os.scandir(top))
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if entry.inode() == cgid:
                        return entry.path
                    below.append(entry.path)
        level = below
    return None


# -- stop ------------------------------------------------------------------------------------

def teardown(pin_dir: str, cgroup_root: str) -> list[str]:
    """Detach and unpin everything the agent made; returns what was removed."""
    removed = _detach_ours(cgroup_root) if os.path.isdir(cgroup_root) else []
    try:
        alt = maps.read_config(pin_dir)["alt_cgid"]
    except (NotSupported, OSError):
        alt = 0
    second = find_cgroup(alt) if alt else None
    if second:
        removed += [f"{line} at {second}" for line in _detach_ours(second)]
    for parent in (cgroup_root, second):
        removed += _detach_egress_below(parent, pin_dir) if parent and os.path.isdir(parent) else []
    try:
        os.rmdir(os.path.join(cgroup_root, KEEPER))
        removed.append(f"removed {KEEPER} cgroup")
    except OSError:
        pass
    if os.path.isdir(pin_dir):
        for name in sorted(os.listdir(pin_dir)):
            os.unlink(os.path.join(pin_dir, name))
            removed.append(f"unpinned {name}")
        os.rmdir(pin_dir)
    if _release_bpffs():
        removed.append(f"unmounted {BPFFS}")
    return removed


def _detach_egress_below(parent: str, pin_dir: str) -> list[str]:
    """Take the egress programs off the container cgroups below PARENT (maps.attach_egress put
    them there): a stopped agent leaves no program running on policies nobody can change."""
    done = []
    for top, dirs, _ in os.walk(parent):
        for name in dirs:
            path = os.path.join(top, name)
            try:
                if maps.egress_attached(path):
                    maps.detach_egress(path, pin_dir)
                    done.append(f"detached the egress programs at {path}")
            except OSError:
                continue  # gone meanwhile
    return done


def _release_bpffs() -> bool:
    """Unmount the bpffs ensure_bpffs mounted, once nothing is pinned in it any more: a bpffs
    someone else mounted (systemd does at boot), or one still holding pins, stays."""
    if _bpffs_source() != BPFFS_SOURCE or set(os.listdir(BPFFS)) - _BPFFS_OWN_ENTRIES:
        return False
    return os.system(f"umount {BPFFS}") == 0  # noqa: S605 - fixed arguments
