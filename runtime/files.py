"""Atomic file writes: the one way Stockade replaces a file (state, caches, profiles, pins' notes).

The data goes to a temporary file beside the target (a unique name, so threads of one daemon and
concurrent commands never share it), then a rename puts it in place: readers see the old file or
the new one, never half of either. `durable` adds an fsync for files that outlive a reboot; the
runtime's state lives on tmpfs and skips it.
"""

from __future__ import annotations

import os


def write_atomic(
    path: str | os.PathLike, data: str | bytes, mode: int = 0o600, durable: bool = False
) -> None:
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data.encode() if isinstance(data, str) else data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
