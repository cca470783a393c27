"""The SPDY/3.1 codec on its own (cri/spdy.py): the dictionary byte for byte, frames both ways,
header blocks in one compression context per direction, and hostile input refused."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest
from stockade.cri import spdy


def test_the_dictionary_is_spdy3s() -> None:
    # what zlib checks (the preset dictionary's adler32 in the stream header) and its digest
    assert len(spdy.DICTIONARY) == 1423 and zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2
    assert hashlib.sha256(spdy.DICTIONARY).hexdigest().startswith("51d27341")
    assert spdy.DICTIONARY.startswith(b"\x00\x00\x00\x07options") and spdy.DICTIONARY.endswith(b"enq=0.")


def test_a_first_header_block_names_the_dictionary() -> None:
    """zlib's header (best compression, a preset dictionary) then the dictionary's adler32: the
    bytes Go's spdystream sends first, which a peer checks before anything else."""
    wire = spdy.Codec().encode(spdy.SynReply(1))
    assert wire[:8] == b"\x80\x03\x00\x02\x00" + (len(wire) - 8).to_bytes(3, "big")
    assert wire[12:18] == bytes.fromhex("78f9e3c6a7c2")
    assert wire.endswith(b"\x00\x00\xff\xff")  # every block ends with a sync flush


FRAMES = [
    spdy.SynStream(1, {"streamtype": ["error"]}),
    spdy.SynStream(3, {"streamtype": ["data"], "port": ["80"], "requestid": ["0"]}, priority=2, fin=True),
    spdy.SynReply(1, {}),
    spdy.Headers(3, {"x": ["a", "b"]}),
    spdy.Data(3, b"hello", fin=True),
    spdy.Data(5, b""),
    spdy.RstStream(3, spdy.CANCEL),
    spdy.Settings([(0, 7, 65536), (1, 4, 100)]),
    spdy.Ping(1),
    spdy.GoAway(3, spdy.GOAWAY_OK),
    spdy.WindowUpdate(3, 1000),
]


def test_frames_round_trip_in_any_split() -> None:
    sender, wire = spdy.Codec(), b""
    for frame in FRAMES:
        wire += sender.encode(frame)
    for step in (1, 7, len(wire)):
        receiver, got = spdy.Codec(), []
        for i in range(0, len(wire), step):
            got += receiver.feed(wire[i:i + step])
        assert got == FRAMES


def test_header_blocks_share_one_context_per_direction() -> None:
    """The second block refers back to the first: a fresh decoder cannot read it alone."""
    sender = spdy.Codec()
    first = sender.encode(spdy.SynStream(1, {"streamtype": ["stdout"]}))
    second = sender.encode(spdy.SynStream(3, {"streamtype": ["stdout"]}))
    assert len(second) < len(first)
    with pytest.raises(spdy.ProtocolError):
        spdy.Codec().feed(second)
    both = spdy.Codec()
    assert [f.stream_id for f in both.feed(first + second)] == [1, 3]


def _block(*pairs: tuple[bytes, bytes]) -> bytes:
    raw = struct.pack(">I", len(pairs)) + b"".join(
        struct.pack(">I", len(k)) + k + struct.pack(">I", len(v)) + v for k, v in pairs)
    z = zlib.compressobj(zdict=spdy.DICTIONARY)
    return z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)


def _syn(block: bytes) -> bytes:
    body = struct.pack(">IIBB", 1, 0, 0, 0) + block
    return struct.pack(">HHB", 0x8003, spdy.SYN_STREAM, 0) + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize(("wire", "says"), [
    (_syn(_block((b"StreamType", b"error"))), "not lowercase"),
    (_syn(_block((b"a", b"1"), (b"a", b"2"))), "repeated"),
    (_syn(_block(*[(f"h{i}".encode(), b"v") for i in range(65)])), "headers in one block"),
    (_syn(bytes.fromhex("78f9deadbeef") + b"junk"), "does not decompress"),  # another dictionary
    (_syn(_block((b"a", b"x" * 70000))), "larger than"),
    (b"\x80\x02\x00\x01\x00\x00\x00\x00", "version 2"),
    (b"\x80\x03\x00\x0a\x00\x00\x00\x00", "type 10"),
    (b"\x80\x03\x00\x03\x00\x00\x00\x04\x00\x00\x00\x01", "RST_STREAM frame of 4 bytes"),
    (b"\x80\x03\x00\x04\x00\x00\x00\x04\x00\x00\x00\x09", "for 9 entries"),
    (b"\x80\x03\x00\x01\x00\xff\xff\xff", "too large"),
])
def test_hostile_input_is_a_protocol_error(wire: bytes, says: str) -> None:
    with pytest.raises(spdy.ProtocolError, match=says):
        spdy.Codec().feed(wire)
