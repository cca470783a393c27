"""A single-threaded helper process that forks the children pods need (nspin's namespace
makers), so that a pod does not pay for a fresh Python: the server has gRPC's threads, and a
fork of a multithreaded process may not unshare a user namespace.

The server sends a request (JSON) and the two pipe ends the child talks through (SCM_RIGHTS);
the forker forks, the child runs nspin's steps on those pipes, the forker answers the child's
pid and lets the kernel reap it (SIGCHLD ignored).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

from stockade.runtime._lite import json
from stockade.runtime.errors import StockadeError


class Forker:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen(python("stockade.cri.forker", str(theirs.fileno())), env=python_env(),
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours

    def spawn(self, request: dict, fds: list[int]) -> int:
        """The pid of a child running nspin's steps for REQUEST on FDS (ready, go)."""
        with self.lock:
            for attempt in (1, 2):
                try:
                    socket.send_fds(self.sock, [json.dumps(request).encode()], fds)
                    reply = self.sock.recv(64)
                    if reply:
                        break
                except OSError:
                    reply = b""
                if attempt == 1:  # the forker died: a new one, once
                    self.close()
                    self._start()
            if not reply.isdigit():
                reason = reply.decode(errors="replace") or "it is gone"
                raise StockadeError(f"the pod helper could not fork: {reason}", where="pod")
            return int(reply)

    def close(self) -> None:
        self.sock.close()  # it exits on EOF
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def python(module: str, *args: str) -> list[str]:
    """The command line of a helper: this interpreter without `site` (as the launchers run)."""
    return [sys.executable, "-S", "-m", module, *args]


def python_env() -> dict[str, str]:
    """The environment of a helper: this process's import path, since `site` does not run."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def serve(fd: int) -> None:
    from . import nspin

    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    while True:
        message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        if not message:
            return
        try:
            request = json.loads(message)
            pid = os.fork()
        except (OSError, ValueError) as exc:
            for descriptor in fds:
                os.close(descriptor)
            sock.send(str(exc).encode()[:200] or b"error")
            continue
        if pid == 0:  # pragma: no cover - the child
            sock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            nspin.run_child(request, fds[0], fds[1])
        for descriptor in fds:
            os.close(descriptor)
        sock.send(str(pid).encode())


if __name__ == "__main__":
    serve(int(sys.argv[1]))
