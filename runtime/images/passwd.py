"""Users and groups by name, from an image's own /etc/passwd and /etc/group.

An image's config says `"User": "app"` or `"app:staff"` or `"1000:1000"`; the runtime needs
numbers. The files are read under the image's root with openat2(RESOLVE_IN_ROOT), so a symlinked
/etc/passwd in a hostile image resolves inside the image, never to the host's.
"""

from __future__ import annotations

import os
import stat

from .._lite.dataclasses import dataclass, field
from ..errors import SpecError
from ..syscalls import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

MAX_FILE = 1 << 20  # an /etc/passwd larger than this is not read


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    home: str = "/"
    name: str = ""


def resolve(rootfs: str, spec: str, where: str = "User") -> User:
    """SPEC ("user", "uid", "user:group", "uid:gid", ...) as numbers, as podman resolves it: a
    name must exist in the image; a bare uid not in /etc/passwd gets gid 0; a user's groups in
    /etc/group become its supplementary groups unless a group was named."""
    user_text, _, group_text = (spec or "0").partition(":")
    users = _table(rootfs, "etc/passwd")
    entry = _find(users, user_text)
    if entry is None and not user_text.isdigit():
        raise SpecError(f"user {user_text!r} is not in the image's /etc/passwd", where=where,
                        hint="use a numeric UID, or an image that defines the user")
    uid = int(entry[2]) if entry else int(user_text)
    gid = _number(entry[3], where) if entry else 0
    home = entry[5] if entry and len(entry) > 5 and entry[5] else "/"
    name = entry[0] if entry else ""
    groups = _table(rootfs, "etc/group")
    extra: list[int] = []
    if group_text:
        found = _find(groups, group_text)
        if found is None and not group_text.isdigit():
            raise SpecError(f"group {group_text!r} is not in the image's /etc/group", where=where,
                            hint="use a numeric GID, or an image that defines the group")
        gid = int(found[2]) if found else int(group_text)
    elif name:
        extra = sorted({_number(g[2], where) for g in groups if len(g) > 3 and name in g[3].split(",")}
                       - {gid})
    return User(uid=uid, gid=gid, additional_gids=extra, home=home, name=name)


def _table(rootfs: str, path: str) -> list[list[str]]:
    try:
        root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpecError(f"cannot open the root filesystem: {exc.strerror}", where=rootfs) from None
    try:
        fd = openat2(root, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY,
                     RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    except OSError:
        return []  # no such file: names cannot be resolved, numbers still can
    finally:
        os.close(root)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
            return []
        data = os.read(fd, MAX_FILE)
    finally:
        os.close(fd)
    return [line.split(":") for line in data.decode(errors="replace").splitlines()
            if line and not line.startswith("#")]


def _find(table: list[list[str]], key: str) -> list[str] | None:
    for entry in table:
        if len(entry) > 3 and (entry[0] == key or (key.isdigit() and entry[2] == key)):
            return entry
    return None


def _number(text: str, where: str) -> int:
    if not text.isdigit():
        raise SpecError(f"the image's /etc/passwd or /etc/group has a bad id {text!r}", where=where)
    return int(text)
