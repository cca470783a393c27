"""The runtime and a child it forked (a container init, an exec'd process), over two pipes.

Messages are framed: a tag byte, a little-endian 4-byte length, the payload. The child asks
(MAP: write my ID maps; PID: here is the init's pid; HOOKS: run the runtime's hooks; MOVED: are my
v1 cgroup moves done) and the runtime answers OK; READY ends the conversation. Any failure in the
child travels back as ERROR with a StockadeError, so `create` reports it and nothing is left.
"""

from __future__ import annotations

import os

from .errors import ContainerError, NotSupported, SpecError, StockadeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

# child -> runtime
MAP, PID, HOOKS, MOVED, READY, ERROR = b"M", b"P", b"H", b"V", b"R", b"E"
OK = b"K"  # runtime -> child
_ERRORS = {"SpecError": SpecError, "NotSupported": NotSupported, "ContainerError": ContainerError}


class Channel:
    """One end: write to `wfd`, read from `rfd`."""

    def __init__(self, wfd: int, rfd: int) -> None:
        self.wfd, self.rfd = wfd, rfd

    def send(self, tag: bytes, payload: bytes = b"") -> None:
        os.write(self.wfd, tag + len(payload).to_bytes(4, "little") + payload)

    def recv(self) -> tuple[bytes, bytes]:
        """(tag, payload); (b"", b"") at end of file."""
        head = _read_exact(self.rfd, 5)
        if len(head) < 5:
            return b"", b""
        return head[:1], _read_exact(self.rfd, int.from_bytes(head[1:], "little"))

    def ask(self, tag: bytes, payload: bytes = b"") -> bytes:
        """Child side: a request and the runtime's answer. Anything but OK means the runtime gave
        up (and kills us anyway): exit at once."""
        self.send(tag, payload)
        return self.answer()

    def answer(self) -> bytes:
        """Child side: the runtime's OK (and its payload), or exit at once."""
        reply, payload = self.recv()
        if reply != OK:
            os._exit(1)
        return payload

    def fds(self) -> tuple[int, int]:
        return self.wfd, self.rfd

    def close(self) -> None:
        os.close(self.wfd)
        os.close(self.rfd)


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return data
        data += chunk
    return data


def encode_error(exc: BaseException) -> bytes:
    from ._lite import json as jsonlite

    if isinstance(exc, StockadeError):
        d = {"type": type(exc).__name__, "what": exc.what, "where": exc.where, "hint": exc.hint}
    elif isinstance(exc, OSError):
        what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
        d = {"type": "StockadeError", "what": what, "where": "container init"}
    else:
        d = {
            "type": "StockadeError",
            "what": f"internal error: {type(exc).__name__}: {exc}",
            "where": "container init",
        }
    return jsonlite.dumps(d).encode()


def decode_error(payload: bytes) -> StockadeError:
    from ._lite import json as jsonlite

    d = jsonlite.loads(payload)
    cls = _ERRORS.get(d.get("type"), StockadeError)
    return cls(d.get("what", "unknown error"), where=d.get("where", ""), hint=d.get("hint", ""))


class Reported(Exception):
    """A failure after READY: already written to the container's stderr; exit with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code


def child_main(body: Callable[[], None], channel: Channel) -> None:
    """Run `body` in a forked child and never return to the caller's code: a failure goes to the
    runtime over the channel (or to stderr once nobody listens) and the child exits."""
    code = 1
    try:
        body()
        code = 0
    except Reported as exc:
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the runtime
        try:
            channel.send(ERROR, encode_error(exc))
        except OSError:
            stderr(f"stockade: {exc}")
    finally:
        os._exit(code)


def stderr(text: str) -> None:
    try:
        os.write(2, (text + "\n").encode(errors="replace"))
    except OSError:
        pass
