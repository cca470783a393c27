"""Helpers shared by the v1 and v2 drivers: file I/O with useful errors, dir creation/removal, waits."""

from __future__ import annotations

import _signal as signal  # the C module: `signal` imports enum (bench/README.md, start-path costs)
import errno
import os
import time

from ..errors import NotSupported, StockadeError

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

WAIT_TIMEOUT = 5.0  # seconds to wait for a freeze or for a cgroup to empty


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def write(path: str, value: str | int) -> None:
    """Write one value to a cgroup file; a refusal says which file and which value."""
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as e:
        write_failed(path, value, e)


def write_failed(path: str, value: object, e: OSError) -> None:
    raise StockadeError(
        f"cannot write {str(value)!r} to {path}: {os.strerror(e.errno or 0)}", where="cgroups", hint=_hint(e)
    ) from e


def _hint(e: OSError) -> str:
    if e.errno == errno.EINVAL:
        return "the kernel rejected the value (out of range, or outside the parent's limits)"
    if e.errno == errno.EBUSY:
        return "the cgroup is busy (a controller cannot change while processes or children are in it)"
    if e.errno == errno.ENOENT:
        return "the interface file is missing: the controller is not enabled or the kernel lacks the feature"
    return ""


def read_keyed(path: str) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, cgroup.events, oom_control) -> dict."""
    out = {}
    for line in read(path).splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def read_int_or_max(path: str) -> int | None:
    """An integer file; "max" -> -1; missing -> None."""
    try:
        text = read(path)
    except FileNotFoundError:
        return None
    return -1 if text == "max" else int(text)


def makedirs(root: str, rel: str) -> list[str]:
    """mkdir -p root/rel; returns the dirs it created (shallowest first). The leaf must be new."""
    created: list[str] = []
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        path = os.path.join(root, *parts[:i])
        leaf = i == len(parts)
        for _ in range(10):  # a concurrent destroy may remove an empty parent between our mkdirs
            try:
                os.mkdir(path, 0o755)
                created.append(path)
                break
            except FileExistsError:
                if leaf:
                    raise StockadeError(
                        f"cgroup {path} already exists",
                        where="cgroups",
                        hint="another container uses this cgroupsPath, or a leftover "
                        "of a crashed one: delete it first",
                    ) from None
                break
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as e:
                raise StockadeError(
                    f"cannot create cgroup {path}: {os.strerror(e.errno or 0)}", where="cgroups"
                ) from e
    return created


def remove_tree(path: str) -> None:
    """rmdir a cgroup dir and its child cgroups (deepest first); missing is fine (idempotent)."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for name in dirnames:
            _rmdir(os.path.join(dirpath, name))
    _rmdir(path)


def _rmdir(path: str) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            # EBUSY right after the last process exited: the kernel releases the css lazily
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise StockadeError(
                    f"cannot remove cgroup {path}: {os.strerror(e.errno or 0)}",
                    where="cgroups",
                    hint="processes are still inside it",
                ) from e
            time.sleep(0.01)


def under_stockade(root: str, path: str) -> bool:
    """Directories below a top-level "stockade*" cgroup (tenant slices included) are ours."""
    return os.path.relpath(path, root).split("/")[0].startswith("stockade")


def remove_empty_parents(root: str, rel: str, owned: Callable[[str], bool]) -> None:
    """After the leaf is gone, rmdir empty ancestors inside `rel` that `owned(path)` accepts."""
    parts = rel.split("/")[:-1]
    while parts:
        path = os.path.join(root, *parts)
        if not owned(path):
            return
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:  # ENOTEMPTY/EBUSY: another container still lives under it
            return
        parts.pop()


def procs_recursive(path: str, name: str = "cgroup.procs") -> set[int]:
    """Every pid listed in `name` in path and all its descendants."""
    pids: set[int] = set()
    for dirpath, _, files in os.walk(path):
        if name in files:
            try:
                pids.update(int(x) for x in read(os.path.join(dirpath, name)).split())
            except FileNotFoundError:  # a child cgroup removed while walking
                pass
    return pids


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not check():
        if time.monotonic() > deadline:
            raise StockadeError(f"timed out after {timeout:.0f}s waiting for {what}", where="cgroups")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def signal_while_frozen(cgroup: Any, sig: int) -> None:
    """Freeze so nothing forks past us, signal every process, thaw so the signals get handled
    (a frozen cgroup the caller froze itself stays frozen, unless the signal is SIGKILL)."""
    was_frozen = cgroup.frozen()
    if not was_frozen:
        cgroup.freeze()
    try:
        signal_all(cgroup.pids(), sig)
    finally:
        if not was_frozen or sig == signal.SIGKILL:
            cgroup.thaw()


def signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def refuse_unsupported_block_io(block_io: Any, where: str) -> None:
    """blockIO fields neither driver implements are refused, whatever the hierarchy."""
    if unsupported := block_io.unsupported_fields():
        refuse(
            f"blockIO {', '.join(unsupported)} not implemented",
            f"{where}.blockIO",
            "only blockIO.weight and throttle*Device are enforced; remove the others",
        )


def refuse(what: str, where: str, hint: str = "") -> None:
    raise NotSupported(what, where=where, hint=hint)


def ancestors(rel: str) -> list[str]:
    """'a/b/c' -> ['', 'a', 'a/b']: the relative parents, root first."""
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(len(parts))]
