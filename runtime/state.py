"""Container state under the runtime root (default /run/stockade).

Layout, one directory per container: <root>/<id>/state.json (written atomically), exec.fifo
while the container is `created`, config.json (the spec as created, for `exec`), and the
directory itself is the per-container lock (flock), so concurrent commands are safe.
Creating the directory with mkdir is what claims an ID: a duplicate fails atomically.
"""

from __future__ import annotations

import fcntl
import os

from ._lite import json as jsonlite
from ._lite.contextlib import suppress
from ._lite.dataclasses import asdict, dataclass, field
from .errors import ContainerError
from .files import write_atomic

DEFAULT_ROOT = "/run/stockade"
MAX_ID_LENGTH = 128
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-+")


def validate_id(container_id: str) -> str:
    """Refuse IDs that could escape the root directory or confuse other tools."""
    hint = f"use 1-{MAX_ID_LENGTH} characters from [A-Za-z0-9_.+-], not starting with '.' or '-'"
    if not container_id or len(container_id) > MAX_ID_LENGTH:
        raise ContainerError(f"invalid container ID {container_id[:40]!r}: length", hint=hint)
    if set(container_id) - _ID_CHARS or container_id[0] in ".-" or ".." in container_id:
        raise ContainerError(f"invalid container ID {container_id!r}", hint=hint)
    return container_id


@dataclass
class State:
    """What the runtime remembers about one container (beyond the OCI state it reports)."""

    id: str
    bundle: str
    rootfs: str
    pid: int = 0
    pid_start: int = 0  # /proc/<pid>/stat starttime: detects PID reuse after the init dies
    created: str = ""
    owner: str = ""
    cgroup_path: str = ""
    cgroup_driver: str = ""
    cgroup_id: int = 0
    annotations: dict[str, str] = field(default_factory=dict)
    seccomp_digest: str = ""  # cache key of the compiled filter, reused by `exec`
    bpf_policy: str = ""  # name of the installed BPF policy, "" when none
    degraded: list[str] = field(default_factory=list)  # layers run without, by explicit opt-in
    # Who refuses the policy's egress denials: "cgroup" (the egress programs on the container's
    # cgroup), "network" (the namespace's own network already does), "" (no egress rules)
    egress: str = ""
    started: bool = False
    # Lifecycle hooks in the spec that run after create ("poststart", "poststop"); None in states
    # written before this field: then the saved config is read to find out.
    later_hooks: list[str] | None = None


class StateStore:
    """The runtime root: claims, locks, reads and writes per-container state."""

    # Paths are plain strings: pathlib is a slow import on the start path (bench/README.md).
    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT) -> None:
        self.root = os.fspath(root)

    def dir(self, container_id: str) -> str:
        return os.path.join(self.root, validate_id(container_id))

    def claim(self, container_id: str) -> str:
        """Create the container's directory; fails if the ID is taken."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        path = self.dir(container_id)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise ContainerError(
                f"container {container_id!r} already exists",
                where=str(self.root),
                hint="pick another ID or delete the old container first",
            ) from None
        return path

    def exists(self, container_id: str) -> bool:
        return os.path.exists(os.path.join(self.dir(container_id), "state.json"))

    def lock(self, container_id: str) -> _Lock:
        """Hold the container's lock (flock on its directory) for one command: `with store.lock(id)
        as state_dir:`."""
        path = self.dir(container_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._unknown(container_id) from None
        return _Lock(fd, path)

    def load(self, container_id: str) -> State:
        try:
            with open(os.path.join(self.dir(container_id), "state.json")) as f:
                data = jsonlite.loads(f.read())
        except FileNotFoundError:
            raise self._unknown(container_id) from None
        return State(**data)

    def _unknown(self, container_id: str) -> ContainerError:
        return ContainerError(
            f"container {container_id!r} does not exist", where=str(self.root), hint="see `stockade-oci list`"
        )

    def save(self, state: State) -> None:
        write_atomic(os.path.join(self.dir(state.id), "state.json"), jsonlite.dumps(asdict(state)))

    def remove(self, container_id: str) -> None:
        remove_tree(self.dir(container_id))
        with suppress(OSError):
            os.rmdir(self.root)  # only when empty: leave nothing behind after the last container

    def ids(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = os.listdir(self.root)
        return sorted(n for n in names if os.path.exists(os.path.join(self.root, n, "state.json")))


class _Lock:
    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    def __enter__(self) -> str:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self.fd)
            raise
        return self.path

    def __exit__(self, *exc: object) -> None:
        # Unlock explicitly: a process forked meanwhile (the container init) shares this open
        # file description, and closing our fd alone would leave the lock held by it.
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def remove_tree(path: str) -> None:
    """rm -rf of a state directory (a few flat files and a fifo); shutil would cost every delete
    its import of the compression modules."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_tree(entry.path)
        else:
            with suppress(FileNotFoundError):
                os.unlink(entry.path)
    with suppress(FileNotFoundError):
        os.rmdir(path)


def _stat_fields(pid: int) -> list[bytes]:
    """Fields of /proc/<pid>/stat after the command name; [] when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    # The command name may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(b")") + 2 :].split()


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); 0 when the process is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else 0


def process_alive(pid: int, start_time: int) -> bool:
    """True while `pid` is the process we started and has not exited (a zombie counts as dead)."""
    if pid <= 0:
        return False
    fields = _stat_fields(pid)
    return bool(fields) and int(fields[19]) == start_time and fields[0] not in (b"Z", b"X")
