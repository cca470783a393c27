"""A streaming client for the tests, speaking what kubectl and crictl speak to the URLs Exec,
Attach and PortForward return: SPDY/3.1 (with the codec under test, cri/spdy.py, whose bytes
test_spdy.py checks on their own) and WebSocket (wsproto, a client of its own)."""

from __future__ import annotations

import json
import queue
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

from stockade.cri import spdy
from stockade.cri.nspin import socket_in
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, RejectConnection, Request


def connect(url: str, tls: ssl.SSLContext | None = None, netns: str | None = None) -> socket.socket:
    """A connection to URL's host; TLS: for https; NETNS: from that network namespace."""
    parts = urlsplit(url)
    if netns is None:
        sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    else:
        sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect((parts.hostname, parts.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's clients
    return tls.wrap_socket(sock, server_hostname=parts.hostname) if tls is not None else sock


def http_head(url: str, headers: list[tuple[str, str]], method: str = "POST", *,
              tls: ssl.SSLContext | None = None, netns: str | None = None
              ) -> tuple[socket.socket, int, dict, bytes]:
    """Send an upgrade request; (socket, status, response headers, bytes after the head)."""
    parts = urlsplit(url)
    sock = connect(url, tls, netns)
    lines = [f"{method} {parts.path} HTTP/1.1", f"Host: {parts.netloc}", *(f"{k}: {v}" for k, v in headers)]
    lines += ["", ""]
    sock.sendall("\r\n".join(lines).encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    first, *fields = head.decode("latin-1").split("\r\n")
    code = int(first.split(" ")[1]) if first.startswith("HTTP/1.1 ") else 0
    got: dict[str, list[str]] = {}
    for line in fields:
        k, _, v = line.partition(":")
        got.setdefault(k.strip().lower(), []).append(v.strip())
    return sock, code, got, rest


def drain(q: queue.Queue, timeout: float) -> bytes:
    """Everything queued until its end (None, put back for the next reader)."""
    out = b""
    while (chunk := q.get(timeout=timeout)) is not None:
        out += chunk
    q.put(None)
    return out


def hang_up(sock: socket.socket) -> None:
    """Shut down first: a close alone leaves the connection up while the reader's recv holds it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Spdy:
    """One SPDY connection: streams opened by us, their data collected by a reader thread."""

    def __init__(self, url: str, protocols: tuple[str, ...] = ("v4.channel.k8s.io",),
                 tls: ssl.SSLContext | None = None, netns: str | None = None) -> None:
        headers = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")]
        headers += [("X-Stream-Protocol-Version", p) for p in protocols]
        self.sock, self.code, self.headers, rest = http_head(url, headers, tls=tls, netns=netns)
        self.codec = spdy.Codec()
        self.next_id = 1
        self.data: dict[int, queue.Queue] = {}
        self.replied: dict[int, threading.Event] = {}
        self.reset: dict[int, int] = {}
        self.goaway: spdy.GoAway | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        if self.code == 101:
            threading.Thread(target=self._read, args=(rest,), daemon=True).start()

    def _read(self, rest: bytes) -> None:
        try:
            data = rest
            while True:
                for frame in self.codec.feed(data):
                    self._frame(frame)
                data = self.sock.recv(65536)
                if not data:
                    break
        except (OSError, spdy.ProtocolError):
            pass
        finally:
            for q in self.data.values():
                q.put(None)
            self.done.set()

    def _frame(self, frame: spdy.Frame) -> None:
        if isinstance(frame, spdy.SynReply):
            self.replied[frame.stream_id].set()
        elif isinstance(frame, spdy.Data):
            if frame.data:
                self.data[frame.stream_id].put(frame.data)
            if frame.fin:
                self.data[frame.stream_id].put(None)
        elif isinstance(frame, spdy.RstStream):
            self.reset[frame.stream_id] = frame.status
            self.data[frame.stream_id].put(None)
        elif isinstance(frame, spdy.GoAway):
            self.goaway = frame

    def send(self, frame: spdy.Frame) -> None:
        with self.lock:
            self.sock.sendall(self.codec.encode(frame))

    def open(self, **headers: str) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.data[sid], self.replied[sid] = queue.Queue(), threading.Event()
        self.send(spdy.SynStream(sid, {k.lower(): [v] for k, v in headers.items()}))
        return sid

    def write(self, sid: int, data: bytes, fin: bool = False) -> None:
        self.send(spdy.Data(sid, data, fin))

    def read_all(self, sid: int, timeout: float = 30) -> bytes:
        return drain(self.data[sid], timeout)

    def close(self) -> None:
        hang_up(self.sock)


def spdy_exec(url: str, stdin: bytes | None = None, *, stdout: bool = True, stderr: bool = True,
              tty: bool = False, sizes: list[tuple[int, int]] = (), protocol: str = "v4.channel.k8s.io",
              tls: ssl.SSLContext | None = None, netns: str | None = None
              ) -> tuple[bytes, bytes, dict | bytes]:
    """(stdout, stderr, the error stream: a Status for v4, the raw bytes before) of one session."""
    c = Spdy(url, (protocol,), tls, netns)
    assert c.code == 101, c.code
    try:
        error = c.open(streamType="error")
        sids = {}
        if stdin is not None:
            sids["stdin"] = c.open(streamType="stdin")
        if stdout:
            sids["stdout"] = c.open(streamType="stdout")
        if stderr and not tty:
            sids["stderr"] = c.open(streamType="stderr")
        if tty and protocol in ("v3.channel.k8s.io", "v4.channel.k8s.io"):
            sids["resize"] = c.open(streamType="resize")
        for sid in [error, *sids.values()]:
            assert c.replied[sid].wait(30), f"no SYN_REPLY for stream {sid}"
        try:  # a session that ended at once (a failed exec) has closed the connection already
            for rows, cols in sizes:
                c.write(sids["resize"], json.dumps({"Width": cols, "Height": rows}).encode() + b"\n")
            if sizes:
                time.sleep(0.3)  # a user types after the terminal got its size (both go their own ways)
            if stdin is not None:
                c.write(sids["stdin"], stdin, fin=not tty)
        except OSError:
            pass
        out = c.read_all(sids["stdout"]) if stdout else b""
        err = c.read_all(sids["stderr"]) if "stderr" in sids else b""
        status = c.read_all(error)
        return out, err, json.loads(status) if protocol == "v4.channel.k8s.io" and status else status
    finally:
        c.close()


class Ws:
    """One WebSocket connection: messages by channel, collected by a reader thread."""

    def __init__(self, url: str, protocols: list[str], channels: int = 5) -> None:
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
        self.conn = WSConnection(ConnectionType.CLIENT)
        request = Request(host=parts.netloc, target=parts.path, subprotocols=protocols)
        self.sock.sendall(self.conn.send(request))
        self.protocol: str | None = None
        self.rejected = 0
        self.channels = [queue.Queue() for _ in range(channels)]
        self.messages: list[bytes] = []
        self.close_code: int | None = None
        self.accepted = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self.accepted.wait(30)

    def _read(self) -> None:
        parts: list[bytes] = []
        try:
            while data := self.sock.recv(65536):
                self.conn.receive_data(data)
                for event in self.conn.events():
                    if isinstance(event, AcceptConnection):
                        self.protocol = event.subprotocol or ""
                        self.accepted.set()
                    elif isinstance(event, RejectConnection):
                        self.rejected = event.status_code
                        self.accepted.set()
                    elif isinstance(event, CloseConnection):
                        self.close_code = event.code
                        return
                    elif isinstance(event, BytesMessage):
                        parts.append(event.data)
                        if event.message_finished:
                            self._message(b"".join(parts))
                            parts = []
        except OSError:
            pass
        finally:
            self.accepted.set()
            for q in self.channels:
                q.put(None)

    def _message(self, message: bytes) -> None:
        self.messages.append(message)
        if message and message[0] < len(self.channels):
            self.channels[message[0]].put(message[1:])

    def write(self, channel: int, data: bytes) -> None:
        self.send_raw(bytes([channel]) + data)

    def send_raw(self, message: bytes) -> None:
        with self.lock:
            self.sock.sendall(self.conn.send(Message(data=message)))

    def read_all(self, channel: int, timeout: float = 30) -> bytes:
        return drain(self.channels[channel], timeout)

    def close(self) -> None:
        hang_up(self.sock)
