"""The streaming server: what the URLs Exec, Attach and PortForward return answer.

Exec/Attach/PortForward validate the request and store it under a random single-use token (one
minute, at most MAX_PENDING in flight, as kubelet's streaming library); the client then connects
to /exec/<token>, /attach/<token> or /portforward/<token> and upgrades the connection to
SPDY/3.1 (kubectl, crictl: cri/spdy_session.py) or to a WebSocket (cri/ws_session.py). The
request is the stored one; the URL's query is ignored. A thread per connection, at most
MAX_CONNECTIONS at once; a malformed or hostile connection is closed and hurts no other.
"""

from __future__ import annotations

import logging
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from . import remotecommand
from .errors import CRIError
from .spdy_session import Session
from .ws_session import Tunnel, WsSession

log = logging.getLogger("stockade.cri")

TOKEN_TTL = 60.0
MAX_PENDING = 1000
MAX_CONNECTIONS = 128
MAX_REQUEST = 16 << 10       # the HTTP request's head
HEAD_SECONDS = 10.0          # to send it
STREAMS_SECONDS = 30.0       # for a client to open the streams it asked for (kubelet's)
SPDY_EXEC = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
SPDY_PORTFORWARD = ("portforward.k8s.io",)
WS_EXEC = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io",
           "base64.channel.k8s.io")
WS_TUNNEL = "SPDY/3.1+portforward.k8s.io"
WS_PORTFORWARD = (WS_TUNNEL, "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io",
                  "base64.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE = "stdin", "stdout", "stderr", "error", "resize"
KINDS = ("exec", "attach", "portforward")


@dataclass
class Pending:
    """A validated request waiting for its client."""

    kind: str                          # exec | attach | portforward
    container_id: str = ""
    command: list[str] = field(default_factory=list)
    tty: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False
    pod_id: str = ""
    ports: list[int] = field(default_factory=list)
    expires: float = 0.0


class Tokens:
    def __init__(self, ttl: float = TOKEN_TTL, limit: int = MAX_PENDING) -> None:
        self.ttl, self.limit = ttl, limit
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}

    def issue(self, request: Pending) -> str:
        now = time.monotonic()
        with self._lock:
            for token in [t for t, p in self._pending.items() if p.expires <= now]:
                del self._pending[token]
            if len(self._pending) >= self.limit:
                raise CRIError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{self.limit} streaming requests are waiting for their clients",
                               hint="retry in a minute")
            request.expires = now + self.ttl
            token = secrets.token_urlsafe(6)  # 8 characters, as kubelet's
            self._pending[token] = request
            return token

    def take(self, token: str, kind: str) -> Pending | None:
        """The request, once: a token used, expired or of another kind is None."""
        with self._lock:
            request = self._pending.get(token)
            if request is None or request.kind != kind:
                return None
            del self._pending[token]
        return request if request.expires > time.monotonic() else None


@dataclass
class Backend:
    """What the sessions need from the rest of the server."""

    exec_process: Callable[[Pending], remotecommand.Exec]     # started; raises StockadeError
    attach_paths: Callable[[str], tuple[str, str]]            # container id -> (attach dir, ctl fifo)
    pod_netns: Callable[[str], str]                           # pod id -> its network namespace


class StreamServer:
    def __init__(self, address: str, port: int, backend: Backend, *, tls: tuple[str, str] | None = None,
                 idle_timeout: float = 4 * 3600) -> None:
        self.backend, self.idle_timeout, self.tokens = backend, idle_timeout, Tokens()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((address, port))
        self.listener.listen(64)
        self.tls = None
        if tls is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*tls)
        host, bound = self.listener.getsockname()[:2]
        scheme, shown = "https" if self.tls else "http", f"[{host}]" if family == socket.AF_INET6 else host
        self.base_url = f"{scheme}://{shown}:{bound}"
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopped = threading.Event()

    def start(self) -> None:
        remotecommand.background(self._accept)

    def stop(self) -> None:
        self._stopped.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

    def url(self, request: Pending) -> str:
        return f"{self.base_url}/{request.kind}/{self.tokens.issue(request)}"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                _reply(sock, 503, "too many streaming connections")
                sock.close()
                continue
            remotecommand.background(self._connection, sock)

    def _connection(self, sock: socket.socket) -> None:
        try:
            # frames leave whole: Nagle would hold each one's tail for the peer's delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(HEAD_SECONDS)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            head, rest = _read_head(sock)
            if head is None:
                _reply(sock, 431 if rest == b"large" else 400, "bad request")
                return
            self._route(sock, head, rest)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.debug("streaming connection: %s", e)
        except Exception:  # noqa: BLE001 - one connection's fault never takes the server down
            log.exception("streaming connection failed")
        finally:
            try:
                sock.close()
            except OSError:
                pass
            self._slots.release()

    def _route(self, sock: socket.socket, head: Request, rest: bytes) -> None:
        parts = head.path.split("?", 1)[0].strip("/").split("/")
        request = None
        if len(parts) == 2 and parts[0] in KINDS and head.method in ("GET", "POST"):
            request = self.tokens.take(parts[1], parts[0])
        if request is None:
            _reply(sock, 404, "404 page not found")
            return
        sock.settimeout(self.idle_timeout)
        upgrade = head.get("upgrade").lower()
        if "websocket" in upgrade:
            self._websocket(sock, head, request)
        elif "spdy/3.1" in upgrade and "upgrade" in head.get("connection").lower():
            self._spdy(sock, head, rest, request)
        else:
            _reply(sock, 400, "unable to upgrade: missing upgrade headers in request")

    # -- SPDY

    def _spdy(self, sock: socket.socket, head: Request, rest: bytes, request: Pending) -> None:
        offered = head.list("x-stream-protocol-version")
        supported = SPDY_PORTFORWARD if request.kind == "portforward" else SPDY_EXEC
        if not offered:
            _reply(sock, 400, "unable to upgrade: X-Stream-Protocol-Version is missing")
            return
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            _reply(sock, 403, f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                              f"server accepts {list(supported)}",
                   [("X-Accepted-Stream-Protocol-Versions", p) for p in supported])
            return
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                     b"X-Stream-Protocol-Version: " + chosen.encode() + b"\r\n\r\n")
        if request.kind == "portforward":
            session = Session(sock, _port_stream, pending=rest)
            _reader(session)
            self._spdy_port_forward(session, request)
            return
        wanted = _wanted(request, chosen in ("v3.channel.k8s.io", "v4.channel.k8s.io"))
        claimed: set[str] = set()

        def one_of_each(stream: object) -> bool:  # in the reader's thread: a type asked for, once
            kind = stream.header("streamtype")
            if kind not in wanted or kind in claimed:
                return False
            claimed.add(kind)
            return True

        session = Session(sock, one_of_each, pending=rest)
        _reader(session)
        deadline = time.monotonic() + STREAMS_SECONDS
        while not all(wanted.values()):
            try:
                stream = session.next_stream(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                log.warning("%s %s: the client did not open its streams in time", request.kind,
                            request.container_id[:12])
                session.close()
                return
            if stream is None:
                return
            wanted[stream.header("streamtype")] = stream
        io = remotecommand.Io(wanted.get(STDIN), wanted.get(STDOUT), wanted.get(STDERR), wanted[ERROR],
                              wanted.get(RESIZE), chosen == "v4.channel.k8s.io", session.closed)
        self._run(io, request)
        session.close()

    def _spdy_port_forward(self, session: Session, request: Pending) -> None:
        netns = self.backend.pod_netns(request.pod_id)
        pairs: dict[str, dict] = {}
        while (stream := session.next_stream()) is not None:
            kind = stream.header("streamtype")
            key = stream.header("requestid") or str(stream.id if kind == "error" else stream.id - 2)
            pair = pairs.setdefault(key, {})
            if kind in pair:
                stream.write(f"error processing stream for request {key}: {kind} stream already assigned"
                             .encode())
                stream.reset()
                continue
            pair[kind] = stream
            if len(pair) == 2:
                del pairs[key]
                port = int(pair["data"].header("port"))
                remotecommand.background(remotecommand.forward, netns, port, request.pod_id, pair["data"],
                                         pair["error"], session.closed)
        session.close()

    # -- WebSocket

    def _websocket(self, sock: socket.socket, head: Request, request: Pending) -> None:
        offered = head.list("sec-websocket-protocol")
        if head.method != "GET":
            _reply(sock, 405, "a WebSocket starts with GET")
            return
        if request.kind == "portforward":
            ports = request.ports
            session = WsSession.accept(sock, head.raw, offered, WS_PORTFORWARD, max(1, 2 * len(ports)))
            if session is None:
                return
            _reader(session)
            if session.tunnel:  # SPDY inside: the ports come in its streams' headers, as over SPDY
                inner = Session(Tunnel(session), _port_stream)
                _reader(inner)
                self._spdy_port_forward(inner, request)
            else:
                self._ws_port_forward(session, request)
            return
        session = WsSession.accept(sock, head.raw, offered, WS_EXEC, 5)
        if session is None:
            return
        _reader(session)
        ch = session.channels
        io = remotecommand.Io(ch[0] if request.stdin else None, ch[1] if request.stdout else None,
                              ch[2] if request.stderr else None, ch[3], ch[4] if request.tty else None,
                              session.protocol.startswith(("v4.", "v5.")), session.closed)
        first = next(n for n, asked in ((1, request.stdout), (2, request.stderr), (3, True)) if asked)
        session.send_raw(str(first).encode() if session.text else bytes([first]))  # "open", as kubelet's
        self._run(io, request)
        session.close()

    def _ws_port_forward(self, session: WsSession, request: Pending) -> None:
        netns = self.backend.pod_netns(request.pod_id)
        threads = []
        for i, port in enumerate(request.ports):
            data, error = session.channels[2 * i], session.channels[2 * i + 1]
            for channel in (data, error):
                channel.write(port.to_bytes(2, "little"))
            threads.append(remotecommand.background(remotecommand.forward, netns, port, request.pod_id, data,
                                                    error, session.closed))
        for t in threads:
            t.join()
        session.close()

    # -- both

    def _run(self, io: remotecommand.Io, request: Pending) -> None:
        try:
            if request.kind == "attach":
                attach_dir, ctl = self.backend.attach_paths(request.container_id)
            else:
                run = self.backend.exec_process(request)
        except Exception as e:  # noqa: BLE001 - said to the client, as kubelet's InternalError
            remotecommand.finish(io, remotecommand.status(0, request.command, str(e)))
            return
        if request.kind == "attach":
            remotecommand.serve_attach(io, attach_dir, ctl, request.tty)
        else:
            remotecommand.serve_exec(io, run)


def _wanted(request: Pending, resize: bool) -> dict[str, object]:
    """The streams a client opens for REQUEST (kubelet's count), by type, None until opened."""
    kinds = [ERROR] + [k for k, asked in ((STDIN, request.stdin), (STDOUT, request.stdout),
                                           (STDERR, request.stderr and not request.tty),
                                           (RESIZE, request.tty and resize)) if asked]
    return dict.fromkeys(kinds)


def _port_stream(stream: object) -> bool:
    """A port-forward stream is data or error, for a port that is one."""
    port = stream.header("port")
    return stream.header("streamtype") in ("data", "error") and port.isdigit() and 0 < int(port) < 65536


def _reader(session: Session | WsSession) -> None:
    remotecommand.background(session.serve)


# -- HTTP, as little of it as an upgrade needs

@dataclass
class Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    raw: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def list(self, name: str) -> list[str]:
        """Every value of NAME's headers, also comma-separated ones."""
        return [p.strip() for v in self.all(name) for p in v.split(",") if p.strip()]

    def get(self, name: str) -> str:
        values = self.all(name)
        return values[0] if values else ""


def _read_head(sock: socket.socket) -> tuple[Request | None, bytes]:
    """The request line and headers (lowercase names), and what followed them."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_REQUEST:
            return None, b"large"
        chunk = sock.recv(4096)
        if not chunk:
            return None, b""
        buf += chunk
    raw, rest = buf.split(b"\r\n\r\n", 1)
    if len(raw) > MAX_REQUEST:
        return None, b"large"
    lines = raw.decode("latin-1").split("\r\n")
    words = lines[0].split(" ")
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        return None, b""
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None, b""
        headers.append((name.lower(), value.strip()))
    return Request(words[0], words[1], headers, raw + b"\r\n\r\n"), rest


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def _reply(sock: socket.socket, code: int, body: str, headers: list[tuple[str, str]] = ()) -> None:
    text = body.encode() + b"\n"
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}", "Content-Type: text/plain; charset=utf-8",
             f"Content-Length: {len(text)}", *(f"{k}: {v}" for k, v in headers), "Connection: close", "", ""]
    try:
        sock.sendall("\r\n".join(lines).encode() + text)
    except OSError:
        pass
