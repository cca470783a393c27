"""Exec, attach and port-forward over a client's streams, whichever transport carried them
(cri/spdy_session.Stream and cri/ws_session.Channel have the same read/write/close/reset).

- exec: `stockade-oci exec` (a tty through a console socket, as runc's callers do), its output
  copied out, the client's stdin and terminal sizes in, the exit code in the status at the end;
  a client that goes away kills that process and nothing else.
- attach: conmon's attach socket (packets tagged 2 stdout, 3 stderr; stdin written raw, its end
  a shutdown) and its control FIFO for sizes ("1 <rows> <cols>"); the stream ends when the
  container does.
- port-forward: a TCP connection to 127.0.0.1:<port> in the pod's network namespace per stream
  pair, copied both ways.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import threading
from dataclasses import dataclass

from stockade.runtime import console

TTY_ACCEPT_SECONDS = 10.0
DRAIN_SECONDS = 2.0
CONMON_PACKET = 8193  # conmon's 8192-byte buffer and its pipe byte
STDOUT_PIPE, STDERR_PIPE = 2, 3


@dataclass
class Io:
    """One exec or attach session's streams (None: not asked for) and how to report its end."""

    stdin: object | None
    stdout: object | None
    stderr: object | None
    error: object
    resize: object | None
    json_status: bool  # v4 and later: a Status object; earlier: the message, on failure only
    closed: threading.Event  # set when the client is gone


def status(code: int, command: list[str], error: str = "") -> dict:
    """The Status kubelet's clients decode from the error stream."""
    if error:
        return {"metadata": {}, "status": "Failure", "reason": "InternalError", "code": 500,
                "message": f"Internal error occurred: error executing command in container: {error}",
                "details": {"causes": [{"message": error}]}}
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    return {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
            "message": f"command terminated with non-zero exit code: error executing command "
                       f"[{' '.join(command)}], exit code {code}",
            "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}


def finish(io: Io, result: dict) -> None:
    """Output streams closed, then the status on the error stream, then that closed too."""
    for stream in (io.stdout, io.stderr):
        if stream is not None:
            stream.close()
    try:
        if io.json_status:
            io.error.write(json.dumps(result, separators=(",", ":")).encode())
        elif result["status"] != "Success":
            io.error.write(result["message"].encode())
    except OSError:
        pass  # the client left first
    io.error.close()


def _sizes(stream: object, apply) -> None:  # noqa: ANN001 - apply(rows, cols)
    """Terminal sizes, {"Width": W, "Height": H} objects one after another, until the stream ends."""
    decoder, buf = json.JSONDecoder(), ""
    while chunk := stream.read():
        buf += chunk.decode(errors="replace")
        while buf.strip():
            try:
                size, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break  # an object not complete yet
            buf = buf.lstrip()[end:]
            if isinstance(size, dict):
                rows, cols = size.get("Height"), size.get("Width")
                if all(isinstance(n, int) and 0 <= n < 1 << 16 for n in (rows, cols)):
                    apply(rows, cols)
        if len(buf) > 4096:
            return  # not sizes: stop listening rather than buffer it


class _Discard:
    """Where output nobody asked for goes."""

    @staticmethod
    def write(_data: bytes) -> None:
        return None


_DISCARD = _Discard()


def background(target, *args) -> threading.Thread:  # noqa: ANN001, ANN002
    """TARGET(*ARGS) in a daemon thread of its own, started: every thread streaming runs."""
    t = threading.Thread(target=target, args=args, daemon=True, name="stockade-stream")
    t.start()
    return t


def _copy_out(fd: int, stream: object) -> None:
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:  # EIO: the pty's other side is gone
            return
        if not data:
            return
        try:
            stream.write(data)
        except OSError:
            return


def _copy_in(stream: object, fd: int, close: bool = True) -> None:
    try:
        while data := stream.read():
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        if close:
            os.close(fd)


# -- exec -------------------------------------------------------------------------------------

class Exec:
    """One `stockade-oci exec` of a streaming session."""

    def __init__(self, oci: list[str], cid: str, command: list[str], *, tty: bool, stdin: bool) -> None:
        self.command, self.tty = command, tty
        # 0700, and short: a console socket's path must fit in a socket address
        self.dir = tempfile.mkdtemp(prefix="stockade-exec-")
        self.pid_file = os.path.join(self.dir, "pid")
        argv = [*oci, "exec", "--pid-file", self.pid_file]
        listener = None
        if tty:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            listener.bind(os.path.join(self.dir, "console"))
            listener.listen(1)
            argv += ["--tty", "--console-socket", os.path.join(self.dir, "console")]
        try:
            self.proc = subprocess.Popen(
                [*argv, cid, *command], stdin=subprocess.PIPE if stdin and not tty else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if tty else subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError:
            if listener is not None:
                listener.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.master = -1
        if listener is not None:
            try:
                self.master = self._take_pty(listener)
            finally:
                listener.close()

    def _take_pty(self, listener: socket.socket) -> int:
        listener.settimeout(0.1)
        waited = 0.0
        while waited < TTY_ACCEPT_SECONDS:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                waited += 0.1
                if self.proc.poll() is not None:
                    return -1  # failed before it had a pty: its stderr says why
                continue
            with conn:
                return console.recv_master(conn)[1]
        return -1

    def resize(self, rows: int, cols: int) -> None:
        if self.master >= 0:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def kill(self) -> None:
        """The exec'd process (its host pid is in the pid file) with what it started, and the
        runtime waiting for it; nothing else of the container's."""
        try:
            with open(self.pid_file) as f:
                top = int(f.read().strip())
        except (OSError, ValueError):
            top = 0
        for pid in _tree(top) if top else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                f.close()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1
        shutil.rmtree(self.dir, ignore_errors=True)


def _tree(pid: int) -> list[int]:
    """PID and its descendants, found before any is killed (a killed parent's children move)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            except OSError:
                pass
    return found


def serve_exec(io: Io, run: Exec) -> None:
    watcher = background(_kill_when_gone, io.closed, run)
    pumps = []
    if run.tty:
        if run.master >= 0:
            pumps.append(background(_copy_tty_out, run, io.stdout))
            if io.stdin is not None:
                background(_copy_in, io.stdin, os.dup(run.master))
            if io.resize is not None:
                background(_sizes, io.resize, run.resize)
    else:  # both pipes read, asked for or not: a full one would stop the process
        pumps.append(background(_copy_out, run.proc.stdout.fileno(), io.stdout or _DISCARD))
        pumps.append(background(_copy_out, run.proc.stderr.fileno(), io.stderr or _DISCARD))
        if io.stdin is not None and run.proc.stdin is not None:
            background(_copy_in, io.stdin, os.dup(run.proc.stdin.fileno()))
            run.proc.stdin.close()
    code = run.proc.wait()
    for pump in pumps:
        pump.join(DRAIN_SECONDS if run.tty else None)
    error = ""
    if run.tty and run.master < 0:  # it failed before it had a terminal: its runtime says why
        error = run.proc.stderr.read().decode(errors="replace").strip() if run.proc.stderr else ""
    if not io.closed.is_set():
        finish(io, status(code, run.command, error))
    io.closed.set()  # the watcher's wait ends
    watcher.join()
    run.close()


def _copy_tty_out(run: Exec, stream: object) -> None:
    """The pty's output until every holder of its other side is gone, or for DRAIN_SECONDS after
    the process exited (a background child may keep it open)."""
    while True:
        ready, _, _ = select.select([run.master], [], [], 0.2)
        if ready:
            try:
                data = os.read(run.master, 1 << 16)
            except OSError:
                return
            if not data:
                return
            try:
                if stream is not None:
                    stream.write(data)
            except OSError:
                return
        elif run.proc.poll() is not None:
            return


def _kill_when_gone(closed: threading.Event, run: Exec) -> None:
    closed.wait()
    if run.proc.poll() is None:
        run.kill()


# -- attach -----------------------------------------------------------------------------------

def serve_attach(io: Io, attach_dir: str, ctl: str, tty: bool) -> None:
    """ATTACH_DIR: conmon's <socket-dir>/<id> (its attach socket inside), reached by an fd, as
    the whole path can be longer than a socket address holds."""
    dirfd = os.open(attach_dir, os.O_PATH | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{dirfd}/attach")
    except OSError as e:
        sock.close()
        finish(io, status(0, [], f"cannot attach: {e.strerror}"))
        return
    finally:
        os.close(dirfd)
    background(_gone_closes, io.closed, sock)
    if io.stdin is not None:
        background(_attach_in, io.stdin, sock)
    if io.resize is not None and tty:
        background(_sizes, io.resize, lambda rows, cols: _control(ctl, f"1 {rows} {cols}\n"))
    _attach_out(sock, io, tty)
    sock.close()
    if not io.closed.is_set():
        finish(io, status(0, []))
    io.closed.set()


def _attach_out(sock: socket.socket, io: Io, tty: bool) -> None:
    while True:
        try:
            packet = sock.recv(CONMON_PACKET)
        except OSError:
            return
        if not packet:
            return  # conmon closes its readers when the container exits
        pipe = STDOUT_PIPE if tty else packet[0]
        target = io.stdout if pipe == STDOUT_PIPE else io.stderr if pipe == STDERR_PIPE else None
        try:
            if target is not None:
                target.write(packet[1:])
        except OSError:
            return


def _attach_in(stream: object, sock: socket.socket) -> None:
    try:
        while data := stream.read():
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # conmon closes the container's stdin (unless told to keep it)
    except OSError:
        pass


def _gone_closes(closed: threading.Event, sock: socket.socket, done: threading.Event | None = None) -> None:
    """Shut SOCK down once the client is gone (CLOSED); give up once DONE is set: a forward's
    watcher ends with its forward, not with the session (kubectl's last hours, forwards many)."""
    while not closed.wait(None if done is None else 1.0):
        if done is not None and done.is_set():
            return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _control(ctl: str, line: str) -> None:
    try:
        fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, line.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


# -- port-forward -----------------------------------------------------------------------------

def forward(netns: str, port: int, pod_id: str, data: object, error: object, closed: threading.Event) -> None:
    """One forwarded connection: DATA to and from 127.0.0.1:PORT in the pod's namespace until
    either side ends it or the client is gone (CLOSED); a failure goes to ERROR, and both
    streams are reset."""
    try:
        conn = _connect(netns, port)
    except OSError as e:
        try:
            error.write(f"error forwarding port {port} to pod {pod_id}, uid : {e.strerror or e}".encode())
        except OSError:
            pass
        data.reset()
        error.reset()
        return
    done = threading.Event()
    background(_socket_in, data, conn)
    background(_gone_closes, closed, conn, done)
    while True:
        try:
            chunk = conn.recv(1 << 16)
        except OSError:
            break
        if not chunk:
            break
        try:
            data.write(chunk)
        except OSError:
            break
    # the pod's side is done: so is the connection (a client still writing finds it closed; the
    # thread copying its data ends with the client's stream, not waited for here)
    done.set()
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()
    error.close()
    data.close()


def _connect(netns: str, port: int) -> socket.socket:
    from .nspin import socket_in

    sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's connections are
    sock.settimeout(10)
    try:
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def _socket_in(stream: object, conn: socket.socket) -> None:
    try:
        while data := stream.read():
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
