"""One SPDY/3.1 connection as a server sees it: the client opens streams, the server answers each
(SYN_REPLY, or RST_STREAM when refused), data flows both ways, and the server ends it all with
GOAWAY. What moby/spdystream, the client kubectl and crictl use, expects: no flow control (it
neither sends nor honours windows), PINGs echoed, a stream closed by an empty DATA frame with FIN.

`serve()` reads the socket until the client leaves or breaks the protocol (then GOAWAY with
PROTOCOL_ERROR); the handler, in another thread, takes accepted streams from `streams()`, reads
and writes them, and calls `close()` at the end.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable

from . import spdy

MAX_STREAMS = 256      # open at once on one connection; more are refused (REFUSED_STREAM)
INBOX = 256            # DATA frames queued per stream before the connection's reader waits
CHUNK = 1 << 20        # the largest DATA frame written


class Inbox:
    """What a client sent on one stream or channel, read in order by the handler; bounded, so a
    client that outruns the handler waits (the connection's reader stops reading)."""

    def __init__(self) -> None:
        self._inbox: queue.Queue[bytes | None] = queue.Queue(INBOX)
        self.ended = False      # the client's side: FIN, RST, close or the connection gone
        self.finished = False   # ours

    def read(self, timeout: float | None = None) -> bytes:
        """The next chunk the client sent; b"" at its end (and ever after)."""
        chunk = self._inbox.get(timeout=timeout)
        if chunk is None:
            self._inbox.put(None)
            return b""
        return chunk

    def _deliver(self, data: bytes) -> None:
        if not self.ended and data:
            self._inbox.put(data)

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self._inbox.put(None)


class Stream(Inbox):
    """A client-opened stream: `read()` its data (b"" once it ended), `write()`, `close()` our side."""

    def __init__(self, session: Session, stream_id: int, headers: spdy.HeaderMap) -> None:
        super().__init__()
        self.session, self.id, self.headers = session, stream_id, headers

    def header(self, name: str) -> str:
        return self.headers.get(name, [""])[0]

    def write(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            if self.finished:
                return
            self.session.send(spdy.Data(self.id, data[i:i + CHUNK]))

    def close(self) -> None:
        """No more data from us (an empty DATA frame with FIN)."""
        if not self.finished:
            self.finished = True
            self.session._send_quietly(spdy.Data(self.id, b"", fin=True))
            self.session.forget(self)

    def reset(self, status: int = spdy.CANCEL) -> None:
        if not self.finished:
            self.finished = True
            self.session._send_quietly(spdy.RstStream(self.id, status))
        self._end()
        self.session.forget(self)


class Session:
    def __init__(self, sock: socket.socket, accept: Callable[[Stream], bool], *,
                 max_streams: int = MAX_STREAMS, pending: bytes = b"") -> None:
        """ACCEPT is told each new stream (in the reader's thread): True to answer it, False to
        refuse it (RST_STREAM CANCEL). PENDING: bytes already read past the HTTP upgrade."""
        self.sock, self.accept, self.max_streams, self._pending = sock, accept, max_streams, pending
        self.codec = spdy.Codec()
        self._send_lock = threading.Lock()
        self._table_lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._accepted: queue.Queue[Stream | None] = queue.Queue()
        self._last_id = 0
        self.closed = threading.Event()  # the client is gone (EOF, GOAWAY, an error)
        self.error = ""

    # -- the reader

    def serve(self) -> None:
        try:
            data, self._pending = self._pending, b""
            while True:
                data = data or self.sock.recv(1 << 16)
                if not data:
                    break
                for frame in self.codec.feed(data):
                    if not self._handle(frame):
                        return
                data = b""
        except spdy.ProtocolError as e:
            self.error = str(e)
            self._send_quietly(spdy.GoAway(self._last_id, spdy.GOAWAY_PROTOCOL_ERROR))
        except OSError as e:
            self.error = e.strerror or str(e)
        finally:
            self._client_gone()

    def _handle(self, frame: spdy.Frame) -> bool:
        """False when the connection is over (GOAWAY)."""
        if isinstance(frame, spdy.Data):
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                if frame.stream_id > self._last_id or frame.stream_id % 2 == 0:
                    raise spdy.ProtocolError(f"DATA on stream {frame.stream_id}, which was never opened")
                return True  # a stream we closed and forgot: late data is dropped
            stream._deliver(frame.data)
            if frame.fin:
                stream._end()
                self.forget(stream)
        elif isinstance(frame, spdy.SynStream):
            self._open(frame)
        elif isinstance(frame, spdy.RstStream):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream.finished = True
                stream._end()
                self.forget(stream)
        elif isinstance(frame, spdy.Ping):
            if frame.id % 2:  # the client's: echo it (ours would be even, and we send none)
                self.send(frame)
        elif isinstance(frame, spdy.GoAway):
            return False
        elif isinstance(frame, (spdy.SynReply, spdy.Headers)):
            raise spdy.ProtocolError("the client answered or extended a stream the server never opened")
        return True  # SETTINGS, WINDOW_UPDATE: no flow control here, as in spdystream

    def _open(self, frame: spdy.SynStream) -> None:
        if frame.stream_id % 2 == 0 or frame.stream_id <= self._last_id:
            raise spdy.ProtocolError(f"stream id {frame.stream_id} is not a new client stream")
        self._last_id = frame.stream_id
        stream = Stream(self, frame.stream_id, frame.headers)
        if len(self._streams) >= self.max_streams:
            self.send(spdy.RstStream(frame.stream_id, spdy.REFUSED_STREAM))
            return
        if not self.accept(stream):
            self.send(spdy.RstStream(frame.stream_id, spdy.CANCEL))
            return
        with self._table_lock:
            self._streams[frame.stream_id] = stream
        self.send(spdy.SynReply(frame.stream_id))  # before any data: clients drop data until it
        if frame.fin:
            stream._end()
        self._accepted.put(stream)

    def _client_gone(self) -> None:
        self.closed.set()
        with self._table_lock:
            streams = list(self._streams.values())
        for stream in streams:
            stream._end()
        self._accepted.put(None)

    # -- the handler's side

    def next_stream(self, timeout: float | None = None) -> Stream | None:
        """The next accepted stream; None once the client is gone. Raises queue.Empty on timeout."""
        stream = self._accepted.get(timeout=timeout)
        if stream is None:
            self._accepted.put(None)
        return stream

    def send(self, frame: spdy.Frame) -> None:
        """Encode and write under one lock: header compression is stateful and ordered."""
        with self._send_lock:
            self.sock.sendall(self.codec.encode(frame))

    def _send_quietly(self, frame: spdy.Frame) -> None:
        try:
            self.send(frame)
        except OSError:
            pass

    def forget(self, stream: Stream) -> None:
        if stream.finished and stream.ended:
            with self._table_lock:
                self._streams.pop(stream.id, None)

    def close(self) -> None:
        """Reset what we have not finished, say GOAWAY, and end the connection."""
        with self._table_lock:
            streams = list(self._streams.values())
        for stream in streams:
            if not stream.finished:
                stream.finished = True
                self._send_quietly(spdy.RstStream(stream.id, spdy.CANCEL))
        self._send_quietly(spdy.GoAway(self._last_id, spdy.GOAWAY_OK))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
