"""Layer extraction on the real filesystem: what the layer says is what lands, whiteouts become
overlayfs's, and hostile layers (every escape trick) are refused with nothing written outside
and nothing left behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard
from kernel import needs_root  # noqa: F401 - a fixture, used by name
from stockade.runtime.images.layers import Applied, LayerError, Policy, apply

pytestmark = pytest.mark.usefixtures("needs_root")  # ownership, device nodes, trusted.* xattrs

TAR = "application/vnd.oci.image.layer.v1.tar"


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **attrs: object) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.mode = attrs.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.mtime = attrs.pop("mtime", 1_700_000_000)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data


def _tar(*entries: tuple) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def _apply(raw: bytes, dest: Path, media_type: str = TAR, **kw: object) -> Applied:
    return apply(io.BytesIO(raw), media_type, str(dest), **kw)  # type: ignore[arg-type]


@pytest.fixture
def where(tmp_path: Path) -> Path:
    """A store directory with a bait next to it that no layer may touch."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("host secret")
    (tmp_path / "store").mkdir()
    return tmp_path


def _untouched(where: Path) -> None:
    assert sorted(os.listdir(where / "outside")) == ["secret"]
    assert (where / "outside" / "secret").read_text() == "host secret"
    assert os.listdir(where / "store") == []  # nothing left behind, not even the temporary


@pytest.mark.parametrize("compression", ["", "gzip", "zstd"])
def test_a_layer_lands_as_it_says(where: Path, compression: str) -> None:
    raw = _tar(
        _entry("etc", tarfile.DIRTYPE, mode=0o755, uid=0, gid=0),
        _entry("etc/motd", data=b"hello\n", mode=0o640, uid=1000, gid=1001, mtime=1_600_000_000),
        _entry("bin/tool", data=b"#!/bin/sh\n", mode=0o755),  # parent made implicitly
        _entry("bin/alias", tarfile.SYMTYPE, linkname="tool"),
        _entry("bin/hard", tarfile.LNKTYPE, linkname="bin/tool"),
        _entry("run/fifo", tarfile.FIFOTYPE),
        _entry("etc/attrs", data=b"x", pax_headers={"SCHILY.xattr.user.note": "kept",
                                                   "SCHILY.xattr.trusted.overlay.opaque": "y"}),
    )
    compress = {"": bytes, "gzip": gzip.compress, "zstd": zstandard.ZstdCompressor().compress}[compression]
    blob = compress(raw)
    media = TAR + {"": "", "gzip": "+gzip", "zstd": "+zstd"}[compression]
    layer = where / "store" / "layer"
    done = _apply(blob, layer, media, diff_id="sha256:" + hashlib.sha256(raw).hexdigest())
    assert done.diff_id == "sha256:" + hashlib.sha256(raw).hexdigest() and done.size == len(raw)
    motd = (layer / "etc/motd").stat()
    assert (layer / "etc/motd").read_bytes() == b"hello\n"
    assert (stat.S_IMODE(motd.st_mode), motd.st_uid, motd.st_gid, int(motd.st_mtime)) == (0o640, 1000, 1001,
                                                                                            1_600_000_000)
    assert os.readlink(layer / "bin/alias") == "tool"
    assert (layer / "bin/hard").stat().st_ino == (layer / "bin/tool").stat().st_ino
    assert stat.S_ISFIFO((layer / "run/fifo").stat().st_mode)
    assert os.getxattr(layer / "etc/attrs", "user.note") == b"kept"
    assert "trusted.overlay.opaque" not in os.listxattr(layer / "etc/attrs")  # an image never sets it
    assert any("trusted.overlay.opaque" in note for note in done.notes)


def test_whiteouts_become_overlayfs_whiteouts_and_hide_lower_layers(where: Path) -> None:
    lower = where / "store" / "lower"
    _apply(_tar(_entry("a/gone", data=b"1"), _entry("a/kept", data=b"2"), _entry("d/old", data=b"3")), lower)
    upper = where / "store" / "upper"
    _apply(_tar(_entry("a/.wh.gone"), _entry("d/.wh..wh..opq"), _entry("d/new", data=b"4")), upper)
    assert (upper / "a/gone").lstat().st_rdev == 0 and stat.S_ISCHR((upper / "a/gone").lstat().st_mode)
    assert os.getxattr(upper / "d", "trusted.overlay.opaque") == b"y"
    merged, work, top = (where / "store" / n for n in ("merged", "work", "top"))
    for d in (merged, work, top):
        d.mkdir()
    opts = f"lowerdir={upper}:{lower},upperdir={top},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "a")) == ["kept"]
        assert sorted(os.listdir(merged / "d")) == ["new"]  # opaque hid the lower d/old, kept d/new
    finally:
        subprocess.run(["umount", str(merged)], check=True)


def test_policy_skips_devices_and_clears_setuid(where: Path) -> None:
    raw = _tar(_entry("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
               _entry("bin/su", data=b"x", mode=0o4755))
    layer = where / "store" / "l"
    done = _apply(raw, layer)
    assert not (layer / "dev/sda").exists() and stat.S_IMODE((layer / "bin/su").stat().st_mode) == 0o755
    assert len(done.notes) == 2
    allowed = where / "store" / "allowed"
    _apply(raw, allowed, policy=Policy(allow_devices=True, allow_setuid=True))
    assert stat.S_ISBLK((allowed / "dev/sda").lstat().st_mode)
    assert stat.S_IMODE((allowed / "bin/su").stat().st_mode) == 0o4755


def _outside(where: Path) -> str:
    return str(where / "outside")


@pytest.mark.parametrize(
    "case",
    ["dotdot", "dotdot-inside", "symlink-dir", "symlink-replaces-dir", "hardlink-out", "hardlink-abs",
     "whiteout-dotdot", "symlink-then-whiteout", "hardlink-to-dir"],
)
def test_escapes_are_refused_and_leave_nothing(where: Path, case: str) -> None:
    out = _outside(where)
    entries = {
        "dotdot": [_entry("../outside/evil", data=b"x")],
        "dotdot-inside": [_entry("a/../../outside/evil", data=b"x")],
        "symlink-dir": [_entry("link", tarfile.SYMTYPE, linkname=out), _entry("link/evil", data=b"x")],
        "symlink-replaces-dir": [
            _entry("d", tarfile.DIRTYPE),
            _entry("d", tarfile.SYMTYPE, linkname=out),
            _entry("d/secret", data=b"overwritten"),
        ],
        "hardlink-out": [_entry("h", tarfile.LNKTYPE, linkname="../outside/secret")],
        "hardlink-abs": [
            _entry("link", tarfile.SYMTYPE, linkname=out),
            _entry("h", tarfile.LNKTYPE, linkname="link/secret"),
        ],
        "whiteout-dotdot": [_entry("a/.wh..."), _entry("b", data=b"x")],
        "symlink-then-whiteout": [_entry("link", tarfile.SYMTYPE, linkname=out), _entry("link/.wh.secret")],
        "hardlink-to-dir": [_entry("d", tarfile.DIRTYPE), _entry("h", tarfile.LNKTYPE, linkname="d")],
    }[case]
    with pytest.raises(LayerError):
        _apply(_tar(*entries), where / "store" / "evil")
    _untouched(where)


def test_absolute_names_stay_beneath_the_root(where: Path) -> None:
    layer = where / "store" / "abs"
    _apply(_tar(_entry("/etc/hostname", data=b"in-layer")), layer)
    assert (layer / "etc/hostname").read_bytes() == b"in-layer"


def test_lies_and_bombs_are_refused(where: Path) -> None:
    raw = _tar(_entry("f", data=b"a" * 100_000))
    with pytest.raises(LayerError, match="the image says"):
        _apply(raw, where / "store" / "x", diff_id="sha256:" + "0" * 64)
    with pytest.raises(LayerError, match="larger than the limit"):
        _apply(gzip.compress(raw), where / "store" / "x", TAR + "+gzip", policy=Policy(limit=50_000))
    with pytest.raises(LayerError, match="decompress|corrupt"):
        _apply(gzip.compress(raw)[:-200], where / "store" / "x", TAR + "+gzip")  # truncated
    with pytest.raises(LayerError, match="corrupt layer tar"):
        _apply(raw[:700] + b"\x00garbage" * 100, where / "store" / "x")
    with pytest.raises(LayerError, match="unsupported layer media type"):
        _apply(raw, where / "store" / "x", "application/vnd.oci.image.layer.v1.tar+bzip2")
    _untouched(where)
