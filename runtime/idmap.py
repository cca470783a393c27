"""User namespace ID maps, written by the runtime (root on the host may map any range)."""

from __future__ import annotations

from .errors import StockadeError
from .spec import IDMapping


def render(maps: list[IDMapping]) -> str:
    return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)


def write_maps(pid: int, uid_maps: list[IDMapping], gid_maps: list[IDMapping]) -> None:
    """Write /proc/<pid>/{uid_map,gid_map} exactly as linux.uidMappings/gidMappings say.

    setgroups stays "allow": the writer is privileged in the parent namespace, so the kernel
    does not require "deny", and the container may need setgroups(2) for additionalGids.
    """
    for name, maps in (("uid_map", uid_maps), ("gid_map", gid_maps)):
        try:
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(render(maps))
        except OSError as exc:
            key = "uidMappings" if name == "uid_map" else "gidMappings"
            raise StockadeError(
                f"cannot write {name}: {exc.strerror}",
                where=f"linux.{key}",
                hint="mappings must not overlap and host IDs must exist",
            ) from None


def is_mapped(ident: int, maps: list[IDMapping]) -> bool:
    return any(m.container_id <= ident < m.container_id + m.size for m in maps)
