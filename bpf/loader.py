"""Compile bpf/*.bpf.c with bcc, or load them from the bytecode cache without bcc.

bcc rewrites map references only in the file it is given, not in included headers, so a
program's text is its .bpf.c with `#include "stockade.h"` replaced by the header itself.

Cache: after a bcc compile, each cgroup program's instructions are stored with the positions of
its map references (ld_imm64 with BPF_PSEUDO_MAP_FD); a later load opens the pinned maps and
patches their fds in. The cache key covers the sources, the pin directory, the kernel and bcc,
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

from stockade.bpf import bpfsys, maps

BPF_DIR = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("STOCKADE_BPF_CACHE", "/var/cache/stockade/bpf"))
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
    from bcc import BPF  # lazy: only the agent compiles

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


def load_cgroup_programs(pin_dir: str, use_cache: bool = True) -> tuple[dict[str, int], str]:
    """Load the cgroup programs; returns ({name: prog fd}, "cache" | "bcc")."""
    key = cache_key("cgroup.bpf.c", pin_dir)
    cache_file = CACHE_DIR / f"cgroup-{key}.json"
    if use_cache and cache_file.exists():
        try:
            return _load_cached(json.loads(cache_file.read_text()), pin_dir), "cache"
        except (OSError, ValueError, KeyError):
            pass  # a stale or broken cache entry: fall back to compiling
    fds, entry = _compile_cgroup(pin_dir)
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(cache_file)
    except OSError:
        pass  # a read-only cache only costs a recompile next time
    return fds, "bcc"


def _compile_cgroup(pin_dir: str) -> tuple[dict[str, int], dict]:
    b = compile_with_bcc("cgroup.bpf.c", pin_dir)
    fd_to_map = {b.get_table(n).map_fd: n for n in maps.MAPS}
    fds: dict[str, int] = {}
    entry: dict = {"programs": {}}
    for spec in CGROUP_PROGS:
        fn = b.load_func(spec.name, spec.prog_type, attach_type=spec.attach_type)
        insns = b.dump_func(spec.name)
        entry["programs"][spec.name] = {"insns": insns.hex(), "relocs": _relocations(insns, fd_to_map)}
        fds[spec.name] = os.dup(fn.fd)
    b.cleanup()
    return fds, entry


def _load_cached(entry: dict, pin_dir: str) -> dict[str, int]:
    map_fds: dict[str, int] = {}
    fds: dict[str, int] = {}
    try:
        for spec in CGROUP_PROGS:
            prog = entry["programs"][spec.name]
            insns = bytearray(bytes.fromhex(prog["insns"]))
            for index, map_name in prog["relocs"]:
                if map_name not in map_fds:
                    map_fds[map_name] = maps.open_map(map_name, pin_dir)
                struct.pack_into("=i", insns, index * 8 + 4, map_fds[map_name])
            fds[spec.name] = bpfsys.prog_load(spec.prog_type, bytes(insns), name=spec.name,
                                        expected_attach_type=spec.attach_type)
    except Exception:
        for fd in fds.values():
            os.close(fd)
        raise
    finally:
        for fd in map_fds.values():
            os.close(fd)
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
    """BTF ids of bpf_lsm_<hook> in vmlinux BTF (what an LSM program attaches to)."""
    from stockade.runtime.doctor import btf_func_id

    ids = {}
    for hook in hooks:
        found = btf_func_id(f"bpf_lsm_{hook}")
        if found is None:
            raise KeyError(f"bpf_lsm_{hook}")
        ids[hook] = found
    return ids


def load_lsm_links(pin_dir: str, use_cache: bool = True) -> tuple[dict[str, int], str]:
    """Load and link every LSM hook; returns ({hook: link fd}, "cache" | "bcc").

    bcc loads and links LSM_PROBEs while it constructs the module; the cache path loads the
    stored instructions with plain bpf(2), attached by BTF id. Raises on any refusal.
    """
    hooks = lsm_hooks()
    cache_file = CACHE_DIR / f"lsm-{cache_key('lsm.bpf.c', pin_dir)}.json"
    if use_cache and cache_file.exists():
        try:
            return _load_lsm_cached(json.loads(cache_file.read_text()), hooks, pin_dir), "cache"
        except (OSError, ValueError, KeyError, ImportError):
            pass  # fall back to bcc, which reports the real reason if it fails as well
    b = compile_with_bcc("lsm.bpf.c", pin_dir)
    try:
        fd_to_map = {b.get_table(n).map_fd: n for n in maps.MAPS}
        entry: dict = {"programs": {}}
        links = {}
        for hook in hooks:
            key = f"lsm__{hook}".encode()
            if key not in b.lsm_fds:
                b.attach_lsm(hook)
            insns = b.dump_func(key)
            entry["programs"][hook] = {"insns": insns.hex(), "relocs": _relocations(insns, fd_to_map)}
            links[hook] = os.dup(b.lsm_fds[key])
    finally:
        b.cleanup()
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(cache_file)
    except OSError:
        pass
    return links, "bcc"


def _load_lsm_cached(entry: dict, hooks: list[str], pin_dir: str) -> dict[str, int]:
    btf_ids = _btf_ids(hooks)
    map_fds: dict[str, int] = {}
    links: dict[str, int] = {}
    try:
        for hook in hooks:
            prog = entry["programs"][hook]
            insns = bytearray(bytes.fromhex(prog["insns"]))
            for index, map_name in prog["relocs"]:
                if map_name not in map_fds:
                    map_fds[map_name] = maps.open_map(map_name, pin_dir)
                struct.pack_into("=i", insns, index * 8 + 4, map_fds[map_name])
            prog_fd = bpfsys.prog_load(bpfsys.PROG_LSM, bytes(insns), name=f"lsm__{hook}",
                                 expected_attach_type=bpfsys.LSM_MAC, attach_btf_id=btf_ids[hook])
            try:
                links[hook] = bpfsys.raw_tracepoint_open(prog_fd)
            finally:
                os.close(prog_fd)
    except Exception:
        for fd in links.values():
            os.close(fd)
        raise
    finally:
        for fd in map_fds.values():
            os.close(fd)
    return links
