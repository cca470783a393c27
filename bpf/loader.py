"""Compile bpf/*.bpf.c with bcc, or load them from the bytecode cache without bcc.

bcc rewrites map references only in the file it is given, not in included headers, so a
program's text is its .bpf.c with `#include "stockade.h"` replaced by the header itself.

Cache (bpf.cache): after a bcc compile, each program's instructions are stored with the
positions of its map references (ld_imm64 with BPF_PSEUDO_MAP_FD); a later load opens the
pinned maps and patches their fds in, and links an LSM program by the BTF id of its hook
(bpf.btf), which bcc looked up by itself. The cache key covers the sources, the kernel and bcc,
so any change recompiles; the pin directory is not part of it (maps are relocated by name).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

from stockade.bpf import bpfsys, btf, cache, maps
from stockade.runtime.errors import NotSupported

BPF_DIR = Path(__file__).resolve().parent
_PSEUDO_MAP_FD = 1


@dataclass(frozen=True)
class ProgSpec:
    name: str
    prog_type: int
    attach_type: int


CGROUP_PROGS = (
    ProgSpec("stk_sock_create", bpfsys.PROG_CGROUP_SOCK, bpfsys.CGROUP_INET_SOCK_CREATE),
    ProgSpec("stk_connect4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET4_CONNECT),
    ProgSpec("stk_connect6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_INET6_CONNECT),
    ProgSpec("stk_sendmsg4", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP4_SENDMSG),
    ProgSpec("stk_sendmsg6", bpfsys.PROG_CGROUP_SOCK_ADDR, bpfsys.CGROUP_UDP6_SENDMSG),
    ProgSpec("stk_sysctl", bpfsys.PROG_CGROUP_SYSCTL, bpfsys.CGROUP_SYSCTL),
)
assert tuple(p.name for p in CGROUP_PROGS) == maps.CGROUP_PROGRAMS
assert all(maps.EGRESS_PROGRAMS[p.name] == p.attach_type
           for p in CGROUP_PROGS if p.name in maps.EGRESS_PROGRAMS)
# attached at the parents; the egress programs go on container cgroups (maps.attach_egress)
PARENT_PROGS = tuple(p for p in CGROUP_PROGS if p.name not in maps.EGRESS_PROGRAMS)


def source_text(file_name: str) -> str:
    header = (BPF_DIR / "stockade.h").read_text()
    return (BPF_DIR / file_name).read_text().replace('#include "stockade.h"', header)


def cflags(pin_dir: str) -> list[str]:
    return [f"-I{BPF_DIR}", f'-DSTK_PIN_DIR="{pin_dir}"']


def cache_key(file_name: str, pin_dir: str) -> str:
    # the pin directory is left out on purpose: map references are relocated by name at load
    del pin_dir
    h = hashlib.sha256()
    h.update(source_text(file_name).encode())
    h.update(platform.release().encode())
    try:
        h.update(Path("/proc/version").read_bytes())
    except OSError:
        pass
    try:
        import importlib.metadata as md
        h.update(md.version("bcc").encode())
    except Exception:  # noqa: BLE001 - Debian's bcc has no dist-info; the kernel key still holds
        pass
    return h.hexdigest()[:32]


def compile_with_bcc(file_name: str, pin_dir: str):
    """The bcc module for one source (maps must already be pinned; bcc re-uses them)."""
    try:
        from bcc import BPF  # lazy: only the agent compiles, and only without a cache entry
    except ImportError as e:  # Debian's python3-bpfcc, reached through the venv's system packages
        raise NotSupported("bcc (python3-bpfcc) is not installed; the agent compiles its programs with it",
                           hint="apt-get install python3-bpfcc (scripts/setup does)") from e

    return BPF(text=source_text(file_name), cflags=cflags(pin_dir))


def _relocations(insns: bytes, fd_to_map: dict[int, str]) -> list[list]:
    relocs = []
    for i in range(0, len(insns) // 8):
        code, regs, _off, imm = struct.unpack_from("=BBhi", insns, i * 8)
        if code == 0x18 and (regs >> 4) == _PSEUDO_MAP_FD:
            if imm not in fd_to_map:
                raise RuntimeError(f"map fd {imm} in program is not a Stockade map")
            relocs.append([i, fd_to_map[imm]])
    return relocs


def _cached(kind: str, file_name: str, pin_dir: str, use_cache: bool) -> tuple[str, dict | None]:
    """(cache file name, its entry if there is a usable one) for the programs of FILE_NAME."""
    name = f"{kind}-{cache_key(file_name, pin_dir)}.json"
    if not use_cache:
        return name, None
    try:
        return name, json.loads(cache.read(name))
    except (OSError, ValueError):
        return name, None


def _entry(b, names: list[tuple[str, str | bytes]]) -> dict:
    """The cache entry for programs bcc loaded: {programs: {name: {insns, relocs}}}.

    NAMES: (entry name, bcc function name) pairs."""
    fd_to_map = {b.get_table(n).map_fd: n for n in maps.MAPS}
    programs = {}
    for name, func in names:
        insns = b.dump_func(func)
        programs[name] = {"insns": insns.hex(), "relocs": _relocations(insns, fd_to_map)}
    return {"programs": programs}


def _relocated(prog: dict, map_fds: dict[str, int], pin_dir: str) -> bytes:
    """A cached program's instructions with the pinned maps' fds patched in (opened as needed)."""
    insns = bytearray(bytes.fromhex(prog["insns"]))
    for index, map_name in prog["relocs"]:
        if map_name not in map_fds:
            map_fds[map_name] = maps.open_map(map_name, pin_dir)
        struct.pack_into("=i", insns, index * 8 + 4, map_fds[map_name])
    return bytes(insns)


def load_cgroup_programs(pin_dir: str, use_cache: bool = True) -> tuple[dict[str, int], str]:
    """Load the cgroup programs; returns ({name: prog fd}, "cache" | "bcc")."""
    cache_file, entry = _cached("cgroup", "cgroup.bpf.c", pin_dir, use_cache)
    if entry is not None:
        try:
            return _load_cached(entry, pin_dir), "cache"
        except (OSError, ValueError, KeyError):
            pass  # a stale or broken cache entry: fall back to compiling
    b = compile_with_bcc("cgroup.bpf.c", pin_dir)
    fds: dict[str, int] = {}
    for spec in CGROUP_PROGS:
        fn = b.load_func(spec.name, spec.prog_type, attach_type=spec.attach_type)
        fds[spec.name] = os.dup(fn.fd)
    entry = _entry(b, [(spec.name, spec.name) for spec in CGROUP_PROGS])
    b.cleanup()
    cache.write(cache_file, json.dumps(entry))
    return fds, "bcc"


def _load_cached(entry: dict, pin_dir: str) -> dict[str, int]:
    map_fds: dict[str, int] = {}
    fds: dict[str, int] = {}
    try:
        for spec in CGROUP_PROGS:
            insns = _relocated(entry["programs"][spec.name], map_fds, pin_dir)
            fds[spec.name] = bpfsys.prog_load(spec.prog_type, insns, name=spec.name,
                                              expected_attach_type=spec.attach_type)
    except Exception:
        maps.close_all(fds)
        raise
    finally:
        maps.close_all(map_fds)
    return fds


# -- BPF-LSM ---------------------------------------------------------------------------------

def lsm_hooks() -> list[str]:
    """Hook names of the LSM_PROBEs in lsm.bpf.c, in file order."""
    hooks = []
    for line in (BPF_DIR / "lsm.bpf.c").read_text().splitlines():
        if line.startswith("LSM_PROBE("):
            hooks.append(line[len("LSM_PROBE("):].split(",")[0].split(")")[0].strip())
    return hooks


def _btf_ids(hooks: list[str]) -> dict[str, int]:
    """BTF ids of bpf_lsm_<hook> in vmlinux BTF (what an LSM program attaches to); KeyError
    names a hook this kernel does not have."""
    found = btf.func_ids([f"bpf_lsm_{hook}" for hook in hooks])
    return {hook: found[f"bpf_lsm_{hook}"] for hook in hooks}


def load_lsm_links(pin_dir: str, use_cache: bool = True) -> tuple[dict[str, int], str]:
    """Load and link every LSM hook; returns ({hook: link fd}, "cache" | "bcc").

    bcc loads and links LSM_PROBEs while it constructs the module; the cache path loads the
    stored instructions with plain bpf(2), attached by BTF id. Raises on any refusal.
    """
    hooks = lsm_hooks()
    cache_file, entry = _cached("lsm", "lsm.bpf.c", pin_dir, use_cache)
    if entry is not None:
        try:
            return _load_lsm_cached(entry, hooks, pin_dir), "cache"
        except (OSError, ValueError, KeyError):
            pass  # fall back to bcc, which reports the real reason if it fails as well
    b = compile_with_bcc("lsm.bpf.c", pin_dir)
    try:
        links = {}
        for hook in hooks:
            key = f"lsm__{hook}".encode()
            if key not in b.lsm_fds:
                b.attach_lsm(hook)
            links[hook] = os.dup(b.lsm_fds[key])
        entry = _entry(b, [(hook, f"lsm__{hook}".encode()) for hook in hooks])
    finally:
        b.cleanup()
    cache.write(cache_file, json.dumps(entry))
    return links, "bcc"


def _load_lsm_cached(entry: dict, hooks: list[str], pin_dir: str) -> dict[str, int]:
    btf_ids = _btf_ids(hooks)
    map_fds: dict[str, int] = {}
    links: dict[str, int] = {}
    try:
        for hook in hooks:
            insns = _relocated(entry["programs"][hook], map_fds, pin_dir)
            prog_fd = bpfsys.prog_load(bpfsys.PROG_LSM, insns, name=f"lsm__{hook}",
                                       expected_attach_type=bpfsys.LSM_MAC, attach_btf_id=btf_ids[hook])
            try:
                links[hook] = bpfsys.raw_tracepoint_open(prog_fd)
            finally:
                os.close(prog_fd)
    except Exception:
        maps.close_all(links)
        raise
    finally:
        maps.close_all(map_fds)
    return links
