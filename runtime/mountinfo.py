"""/proc/<pid>/mountinfo as plain data (proc(5)): one parser for every reader of the mount table."""

from __future__ import annotations

import os

from ._lite.dataclasses import dataclass


@dataclass
class Mount:
    mount_id: int
    parent_id: int
    root: str  # the path inside the filesystem that is mounted
    point: str  # where, relative to the reader's root
    tags: tuple[str, ...]  # optional fields: shared:N, master:N, propagate_from:N, unbindable
    fstype: str
    source: str
    super_options: str

    @property
    def shared(self) -> bool:
        return any(t.startswith("shared:") for t in self.tags)


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as \\ooo octal escapes."""
    if "\\" not in field:  # `re` stays off the start path: it costs milliseconds to import
        return field
    head, *rest = field.split("\\")
    return head + "".join(chr(int(p[:3], 8)) + p[3:] for p in rest)


def parse_line(line: str) -> Mount | None:
    left, sep, right = line.partition(" - ")
    fields, rfields = left.split(), right.split()
    if not sep or len(fields) < 6 or len(rfields) < 3:
        return None
    return Mount(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        root=_unescape(fields[3]),
        point=_unescape(fields[4]),
        tags=tuple(fields[6:]),
        fstype=rfields[0],
        source=_unescape(rfields[1]),
        super_options=rfields[2],
    )


def read(pid: str = "self") -> list[Mount]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return [m for m in map(parse_line, f) if m is not None]


def containing(path: str, table: list[Mount] | None = None) -> Mount:
    """The mount PATH lives on: the longest mount point above it, the topmost of stacked mounts."""
    path = os.path.realpath(path)
    best: Mount | None = None
    for m in read() if table is None else table:
        inside = path == m.point or path.startswith(m.point.rstrip("/") + "/")
        if inside and (best is None or len(m.point) >= len(best.point)):
            best = m
    if best is None:
        raise LookupError(f"no mount contains {path}")
    return best
