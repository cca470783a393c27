"""One WebSocket connection carrying Kubernetes' channel protocols (wsproto does the WebSocket
part): every message starts with its channel number (0 stdin, 1 stdout, 2 stderr, 3 error,
4 resize; for port-forward 2i data and 2i+1 error of the i-th port); the base64 variants send the
number as an ASCII digit and the rest base64-encoded, in text messages; v5.channel.k8s.io adds
[255, channel] for "this channel is closed". The end is a close frame with 1000 (normal).
SPDY/3.1+portforward.k8s.io carries a whole SPDY connection in its messages instead (Tunnel).

The handler reads and writes Channel objects, shaped like cri/spdy_session.Stream, so exec,
attach and port-forward run the same over either transport.
"""

from __future__ import annotations

import base64
import socket
import threading

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from .spdy_session import Inbox

CLOSE_CHANNEL = 255
MAX_MESSAGE = 16 << 20
NORMAL, TOO_BIG, PROTOCOL_ERROR = 1000, 1009, 1002


class Channel(Inbox):
    def __init__(self, session: WsSession, number: int) -> None:
        super().__init__()
        self.session, self.number = session, number

    def write(self, data: bytes) -> None:
        if data and not self.finished:
            self.session.send(self.number, data)

    def close(self) -> None:
        """Our side is done. Nothing goes on the wire: clients take [255, n] only from each other's
        side (client-go logs it from a server as an unknown channel); the end of the connection
        ends every channel."""
        self.finished = True

    def reset(self) -> None:
        self.close()
        self._end()


class Tunnel:
    """A socket's face on a tunnelling WebSocket (SPDY/3.1+portforward.k8s.io, what kubectl 1.31+
    and crictl's websocket transport send for port-forward): cri/spdy_session.Session runs on it."""

    def __init__(self, session: WsSession) -> None:
        self.session = session

    def recv(self, _size: int) -> bytes:
        return self.session.channels[0].read()

    def sendall(self, data: bytes) -> None:
        self.session.send_raw(data)

    def shutdown(self, _how: int) -> None:
        self.session.close()


class WsSession:
    def __init__(self, sock: socket.socket, conn: WSConnection, protocol: str, channels: int) -> None:
        self.sock, self.conn, self.protocol = sock, conn, protocol
        self.text = protocol.startswith("base64.") or ".base64." in protocol
        self.tunnel = protocol.startswith("SPDY/3.1+")  # messages carry a SPDY connection's bytes
        self.can_close_channels = protocol == "v5.channel.k8s.io"
        self.channels = [Channel(self, n) for n in range(channels)]
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self.error = ""

    @classmethod
    def accept(cls, sock: socket.socket, raw_request: bytes, offered: list[str], supported: tuple[str, ...],
               channels: int) -> WsSession | None:
        """The WebSocket handshake for RAW_REQUEST (the HTTP request as read): the first of the
        client's OFFERED subprotocols that is SUPPORTED, or "" when it offers none; None (and a
        403 sent) when none matches."""
        conn = WSConnection(ConnectionType.SERVER)
        conn.receive_data(raw_request)
        request = next((e for e in conn.events() if isinstance(e, Request)), None)
        if request is None:
            return None
        chosen = next((p for p in offered if p in supported), None) if offered else ""
        if chosen is None:
            sock.sendall(conn.send(RejectConnection(status_code=403)))
            return None
        sock.sendall(conn.send(AcceptConnection(subprotocol=chosen or None)))
        return cls(sock, conn, chosen, channels)

    # -- the reader

    def serve(self) -> None:
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                self.conn.receive_data(data)
                for event in self.conn.events():
                    if isinstance(event, Ping):
                        self._send_event(event.response())
                    elif isinstance(event, CloseConnection):
                        self._send_event(event.response())
                        return
                    elif isinstance(event, (BytesMessage, TextMessage)):
                        chunk = event.data.encode() if isinstance(event.data, str) else event.data
                        size += len(chunk)
                        if size > MAX_MESSAGE:
                            self._close(TOO_BIG, "message too large")
                            return
                        parts.append(chunk)
                        if event.message_finished:
                            self._dispatch(b"".join(parts))
                            parts, size = [], 0
        except (OSError, ValueError) as e:  # wsproto raises LocalProtocolError (a ValueError) too
            self.error = str(e)
        finally:
            self.closed.set()
            for channel in self.channels:
                channel._end()

    def _dispatch(self, message: bytes) -> None:
        if self.tunnel:
            self.channels[0]._deliver(message)
            return
        if not message:
            return
        number, payload = message[0], message[1:]
        if self.text:
            number -= ord("0")
            try:
                payload = base64.b64decode(payload, validate=True)
            except ValueError:
                return
        if number == CLOSE_CHANNEL and self.can_close_channels:
            if payload and payload[0] < len(self.channels):
                self.channels[payload[0]]._end()
            return
        if 0 <= number < len(self.channels):
            self.channels[number]._deliver(payload)

    # -- the handler's side

    def send(self, number: int, data: bytes) -> None:
        if self.text:
            self.send_raw(str(number).encode() + base64.b64encode(data))
        else:
            self.send_raw(bytes([number]) + data)

    def send_raw(self, message: bytes) -> None:
        event = Message(data=message.decode()) if self.text else Message(data=message)
        self._send_event(event)

    def _send_event(self, event: object) -> None:
        with self._lock:
            self.sock.sendall(self.conn.send(event))

    def _close(self, code: int, reason: str = "") -> None:
        try:
            self._send_event(CloseConnection(code=code, reason=reason))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self._close(NORMAL)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
