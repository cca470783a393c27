"""SPDY/3.1 framing, the part of it kubelet's streaming clients use (client-go over moby/spdystream):
frames to bytes and back, and the header blocks' zlib compression with the SPDY/3 dictionary.

Plain data and arithmetic, no sockets: cri/spdy_session.py runs a connection over it. A Codec
holds one connection's two compression contexts (one per direction, for the connection's whole
life: zlib checks the dictionary's adler32, and every block ends with a sync flush). Input is
hostile: every length is bounded before anything is allocated, and anything malformed raises
ProtocolError, after which the connection is finished.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN, FLAG_UNIDIRECTIONAL = 0x01, 0x02
# RST_STREAM status codes
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL, INTERNAL_ERROR, FRAME_TOO_LARGE = 1, 2, 3, 5, 6, 11
# GOAWAY status codes
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR, GOAWAY_INTERNAL_ERROR = 0, 1, 2

MAX_DATA = 16 << 20            # a DATA frame's length field holds 24 bits
MAX_CONTROL = 64 << 10         # no control frame this protocol needs comes near it
MAX_HEADER_BLOCK = 64 << 10    # decompressed
MAX_HEADER_PAIRS = 64


def _dictionary() -> bytes:
    """The SPDY/3 header dictionary (draft-mbelshe-httpbis-spdy-00, 2.6.10.1): 65 words, each
    with a 32-bit length, then common values run together."""
    words = ("options head post put delete trace accept accept-charset accept-encoding accept-language "
             "accept-ranges age allow authorization cache-control connection content-base content-encoding "
             "content-language content-length content-location content-md5 content-range content-type date "
             "etag expect expires from host if-match if-modified-since if-none-match if-range "
             "if-unmodified-since last-modified location max-forwards pragma proxy-authenticate "
             "proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
             "user-agent vary via warning www-authenticate method get status 200_OK version HTTP/1.1 "
             "url public set-cookie keep-alive origin")
    tokens = [w.replace("_", " ") for w in words.split(" ")]
    head = b"".join(struct.pack(">I", len(w)) + w.encode() for w in tokens)
    tail = ("100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
            "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
            "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
            "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
            "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
            "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
            "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.")
    return head + tail.encode()


DICTIONARY = _dictionary()
assert len(DICTIONARY) == 1423 and zlib.adler32(DICTIONARY) == 0xE3C6A7C2


class ProtocolError(Exception):
    """The peer broke the protocol; the connection ends (GOAWAY with PROTOCOL_ERROR)."""


HeaderMap = dict[str, list[str]]


@dataclass
class Data:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass
class SynStream:
    stream_id: int
    headers: HeaderMap = field(default_factory=dict)
    associated: int = 0
    priority: int = 0
    fin: bool = False
    unidirectional: bool = False


@dataclass
class SynReply:
    stream_id: int
    headers: HeaderMap = field(default_factory=dict)
    fin: bool = False


@dataclass
class Headers:
    stream_id: int
    headers: HeaderMap = field(default_factory=dict)
    fin: bool = False


@dataclass
class RstStream:
    stream_id: int
    status: int


@dataclass
class Settings:
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (flags, id, value)
    clear: bool = False


@dataclass
class Ping:
    id: int


@dataclass
class GoAway:
    last_good: int
    status: int = GOAWAY_OK


@dataclass
class WindowUpdate:
    stream_id: int
    delta: int


Frame = Data | SynStream | SynReply | Headers | RstStream | Settings | Ping | GoAway | WindowUpdate
_ID = 0x7FFFFFFF


class Codec:
    """Encode frames for one side of a connection and decode the other side's, incrementally."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zdict=DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)
        self._buf = bytearray()

    # -- out

    def encode(self, frame: Frame) -> bytes:
        """The frame's bytes. Frames with header blocks advance the compression context: send
        them in the order they were encoded."""
        if isinstance(frame, Data):
            if len(frame.data) >= 1 << 24:
                raise ValueError("a DATA frame holds less than 16 MiB")
            return struct.pack(">IB", frame.stream_id & _ID, FLAG_FIN if frame.fin else 0) + \
                len(frame.data).to_bytes(3, "big") + frame.data
        kind, flags, body = self._control(frame)
        return struct.pack(">HHB", 0x8000 | VERSION, kind, flags) + len(body).to_bytes(3, "big") + body

    def _control(self, f: Frame) -> tuple[int, int, bytes]:
        fin = FLAG_FIN if getattr(f, "fin", False) else 0
        if isinstance(f, SynStream):
            flags = fin | (FLAG_UNIDIRECTIONAL if f.unidirectional else 0)
            return SYN_STREAM, flags, struct.pack(">IIBB", f.stream_id & _ID, f.associated & _ID,
                                                   (f.priority & 7) << 5, 0) + self._block(f.headers)
        if isinstance(f, SynReply):
            return SYN_REPLY, fin, struct.pack(">I", f.stream_id & _ID) + self._block(f.headers)
        if isinstance(f, Headers):
            return HEADERS, fin, struct.pack(">I", f.stream_id & _ID) + self._block(f.headers)
        if isinstance(f, RstStream):
            return RST_STREAM, 0, struct.pack(">II", f.stream_id & _ID, f.status)
        if isinstance(f, Settings):
            body = struct.pack(">I", len(f.entries)) + b"".join(
                struct.pack(">II", (fl << 24) | ident, value) for fl, ident, value in f.entries)
            return SETTINGS, 1 if f.clear else 0, body
        if isinstance(f, Ping):
            return PING, 0, struct.pack(">I", f.id)
        if isinstance(f, GoAway):
            return GOAWAY, 0, struct.pack(">II", f.last_good & _ID, f.status)
        if isinstance(f, WindowUpdate):
            return WINDOW_UPDATE, 0, struct.pack(">II", f.stream_id & _ID, f.delta & _ID)
        raise TypeError(f"not a SPDY frame: {f!r}")

    def _block(self, headers: HeaderMap) -> bytes:
        raw = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            n, v = name.lower().encode(), "\0".join(values).encode()
            raw += [struct.pack(">I", len(n)), n, struct.pack(">I", len(v)), v]
        return self._deflate.compress(b"".join(raw)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    # -- in

    def feed(self, data: bytes) -> list[Frame]:
        """Every frame DATA completes (the rest is kept for the next call)."""
        self._buf += data
        frames = []
        while len(self._buf) >= 8:
            length = int.from_bytes(self._buf[5:8], "big")
            control = self._buf[0] & 0x80
            if length > (MAX_CONTROL if control else MAX_DATA):
                kind = "control" if control else "DATA"
                raise ProtocolError(f"a {kind} frame of {length} bytes is too large")
            if len(self._buf) < 8 + length:
                break
            head, body = bytes(self._buf[:8]), bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            frames.append(self._decode(head, body))
        return frames

    def _decode(self, head: bytes, body: bytes) -> Frame:
        word, flags = struct.unpack(">IB", head[:5])
        if not word & 0x80000000:
            return Data(word & _ID, body, bool(flags & FLAG_FIN))
        version, kind = (word >> 16) & 0x7FFF, word & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version}, not 3")
        fin = bool(flags & FLAG_FIN)
        if kind == SYN_STREAM:
            sid, assoc, prio, _slot = self._fixed(">IIBB", body, "SYN_STREAM")
            return SynStream(sid & _ID, self._headers(body[10:]), assoc & _ID, prio >> 5, fin,
                             bool(flags & FLAG_UNIDIRECTIONAL))
        if kind in (SYN_REPLY, HEADERS):
            (sid,) = self._fixed(">I", body, "SYN_REPLY/HEADERS")
            cls = SynReply if kind == SYN_REPLY else Headers
            return cls(sid & _ID, self._headers(body[4:]), fin)
        if kind == RST_STREAM:
            sid, status = self._fixed(">II", body, "RST_STREAM", exact=True)
            return RstStream(sid & _ID, status)
        if kind == SETTINGS:
            return self._settings(body, flags)
        if kind == PING:
            return Ping(self._fixed(">I", body, "PING", exact=True)[0])
        if kind == GOAWAY:
            last, status = self._fixed(">II", body, "GOAWAY", exact=True)
            return GoAway(last & _ID, status)
        if kind == WINDOW_UPDATE:
            sid, delta = self._fixed(">II", body, "WINDOW_UPDATE", exact=True)
            return WindowUpdate(sid & _ID, delta & _ID)
        raise ProtocolError(f"control frame type {kind} is not SPDY/3.1's")

    @staticmethod
    def _fixed(fmt: str, body: bytes, what: str, exact: bool = False) -> tuple:
        size = struct.calcsize(fmt)
        if len(body) < size or exact and len(body) != size:
            raise ProtocolError(f"a {what} frame of {len(body)} bytes")
        return struct.unpack(fmt, body[:size])

    @staticmethod
    def _settings(body: bytes, flags: int) -> Settings:
        if len(body) < 4:
            raise ProtocolError("a SETTINGS frame without its count")
        (count,) = struct.unpack(">I", body[:4])
        if len(body) != 4 + 8 * count:
            raise ProtocolError(f"a SETTINGS frame of {len(body)} bytes for {count} entries")
        entries = []
        for i in range(count):
            word, value = struct.unpack(">II", body[4 + 8 * i:12 + 8 * i])
            entries.append((word >> 24, word & 0xFFFFFF, value))
        return Settings(entries, bool(flags & 1))

    def _headers(self, compressed: bytes) -> HeaderMap:
        try:
            raw = self._inflate.decompress(compressed, MAX_HEADER_BLOCK)
        except zlib.error as e:
            raise ProtocolError(f"a header block does not decompress: {e}") from None
        if self._inflate.unconsumed_tail:
            raise ProtocolError(f"a header block larger than {MAX_HEADER_BLOCK} bytes")
        return parse_block(raw)


def parse_block(raw: bytes) -> HeaderMap:
    """A decompressed header block: names lowercase and unique, values split at NUL."""
    if len(raw) < 4:
        raise ProtocolError("a header block without its count")
    (count,) = struct.unpack(">I", raw[:4])
    if count > MAX_HEADER_PAIRS:
        raise ProtocolError(f"{count} headers in one block")
    pos, out = 4, {}
    for _ in range(count):
        name, pos = _string(raw, pos)
        value, pos = _string(raw, pos)
        key = name.decode("latin-1")
        if not key or key != key.lower() or key in out:
            raise ProtocolError(f"header name {key!r} is empty, not lowercase or repeated")
        out[key] = value.decode("latin-1").split("\0")
    if pos != len(raw):
        raise ProtocolError("bytes after the last header")
    return out


def _string(raw: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(raw):
        raise ProtocolError("a header block ends inside a length")
    (n,) = struct.unpack(">I", raw[pos:pos + 4])
    if pos + 4 + n > len(raw):
        raise ProtocolError("a header block ends inside a string")
    return raw[pos + 4:pos + 4 + n], pos + 4 + n
