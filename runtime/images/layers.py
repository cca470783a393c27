"""One image layer (tar, tar+gzip, tar+zstd) applied to a directory of its own: an overlayfs
lower layer. Extraction is a security boundary: the layer is hostile input.

- Every path is resolved beneath the layer root one component at a time, through directory
  descriptors opened with O_NOFOLLOW: a symlink (or anything else) where a directory should be
  refuses the layer, so no entry reaches outside the root, whatever symlinks, hard links or
  earlier entries say. `..` in a name or a hard link's target refuses the layer too.
- OCI whiteouts become overlayfs ones: `.wh.NAME` a 0:0 character device, `.wh..wh..opq` the
  `trusted.overlay.opaque` xattr on its directory (hiding the lower layers' content of it, not
  this layer's own entries).
- Device nodes are skipped and setuid/setgid bits cleared unless the policy allows them; of the
  xattrs only `user.*` (and `security.capability` where setuid is allowed) are kept: an image
  must never set `trusted.overlay.*`.
- The uncompressed stream is counted (a size limit against tar bombs) and hashed (the DiffID).
- The layer is written to a temporary directory beside its target and renamed into place only
  when all of it checked out: a refused layer leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tarfile

from .._lite.dataclasses import dataclass, field
from ..errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
WHITEOUT, OPAQUE = ".wh.", ".wh..wh..opq"
DEFAULT_LIMIT = 8 << 30  # uncompressed bytes per layer
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Policy:
    limit: int = DEFAULT_LIMIT  # uncompressed bytes a layer may hold
    allow_setuid: bool = False  # keep setuid/setgid bits and file capabilities
    allow_devices: bool = False  # create device nodes (else skipped, with a note)


@dataclass
class Applied:
    diff_id: str  # sha256:<hex> of the uncompressed tar stream
    size: int  # uncompressed bytes
    notes: list[str] = field(default_factory=list)  # what the policy left out


class LayerError(SpecError):
    """The layer is refused (unsafe, corrupt, too big, or not what its digests say)."""


def apply(blob: BinaryIO, media_type: str, dest: str, diff_id: str | None = None,
          policy: Policy | None = None) -> Applied:
    """Unpack the layer BLOB (compressed as MEDIA_TYPE says) into the new directory DEST."""
    policy = policy or Policy()
    if media_type not in MEDIA_TYPES:
        raise LayerError(f"unsupported layer media type {media_type!r}", where=dest,
                         hint="tar, tar+gzip or tar+zstd layers (OCI or Docker media types)")
    parent, name = os.path.split(os.path.abspath(dest))
    tmp = os.path.join(parent, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    os.mkdir(tmp, 0o755)
    try:
        stream = _Counted(_decompressed(blob, MEDIA_TYPES[media_type]), policy.limit)
        try:
            notes = _Extractor(tmp, policy).run(stream)
        except OSError as exc:  # a full disk, a hard link to a directory, ...
            raise LayerError(f"cannot unpack the layer: {exc.strerror or exc}", where=dest) from None
        stream.drain()
        digest = "sha256:" + stream.sha256.hexdigest()
        if diff_id is not None and digest != diff_id:
            raise LayerError(f"layer content is {digest}, the image says {diff_id}", where=dest,
                             hint="the layer is corrupt or the image config lies")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never follows symlinks out of the tree
        raise
    return Applied(digest, stream.count, notes)


def _decompressed(blob: BinaryIO, compression: str) -> BinaryIO:
    if compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=blob, mode="rb")  # type: ignore[return-value]
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(blob)  # type: ignore[return-value]
    return blob


class _Counted:
    """Reads the uncompressed stream for tarfile, hashing and counting it; past LIMIT it stops."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self.raw, self.limit, self.count = raw, limit, 0
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.raw.read(size if size >= 0 else 1 << 20)
        except (OSError, EOFError, ValueError) as exc:  # gzip/zstd: a corrupt or truncated stream
            raise LayerError(f"cannot decompress the layer: {exc}", where="layer") from None
        self.count += len(data)
        if self.count > self.limit:
            raise LayerError(f"layer is larger than the limit of {self.limit} bytes uncompressed",
                             where="layer", hint="a tar bomb, or raise the image store's layer limit")
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        """The rest of the stream (tar's end blocks) belongs to the DiffID too."""
        while self.read(1 << 20):
            pass


class _Extractor:
    def __init__(self, root: str, policy: Policy) -> None:
        self.root, self.policy = root, policy
        self.notes: list[str] = []
        self.dir_times: list[tuple[str, int]] = []

    def run(self, stream: _Counted) -> list[str]:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    self._entry(tar, member)
        except tarfile.TarError as exc:
            raise LayerError(f"corrupt layer tar: {exc}", where="layer") from None
        for rel, mtime in reversed(self.dir_times):  # deepest last written first: after their entries
            self._in_parent(rel, lambda fd, leaf, t=mtime: os.utime(leaf, (t, t), dir_fd=fd,
                                                                     follow_symlinks=False))
        return self.notes

    # -- one entry

    def _entry(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = _relative(m.name)
        if rel == ".":
            return
        parent_rel, leaf = posixpath.split(rel)
        if leaf == OPAQUE:
            self._in_dir(parent_rel, lambda fd: os.setxattr(fd, "trusted.overlay.opaque", b"y"))
            return
        if leaf.startswith(WHITEOUT):
            target = leaf[len(WHITEOUT):]
            if not target or target in (".", ".."):
                raise LayerError(f"bad whiteout {m.name!r}", where="layer")
            self._in_parent(posixpath.join(parent_rel, target), self._whiteout)
            return
        if (m.ischr() or m.isblk()) and not self.policy.allow_devices:
            self.notes.append(f"device node {rel} skipped (the image store does not allow devices)")
            return
        self._in_parent(rel, lambda fd, name: self._create(tar, m, fd, name))
        if m.isdir():
            self.dir_times.append((rel, int(m.mtime)))

    def _create(self, tar: tarfile.TarFile, m: tarfile.TarInfo, fd: int, name: str) -> None:
        if m.isdir():
            if not _is_dir(fd, name):
                _remove(fd, name)
                os.mkdir(name, 0o700, dir_fd=fd)
        else:
            _remove(fd, name)
            if m.isreg():
                self._file(tar, m, fd, name)
            elif m.issym():
                os.symlink(m.linkname, name, dir_fd=fd)  # never followed here: content only
            elif m.islnk():
                self._hardlink(m, fd, name)
            elif m.isfifo():
                os.mkfifo(name, 0o600, dir_fd=fd)
            elif m.ischr() or m.isblk():
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(name, 0o600 | kind, os.makedev(m.devmajor, m.devminor), dir_fd=fd)
            else:
                raise LayerError(f"unsupported tar entry type {m.type!r} for {m.name!r}", where="layer")
        self._metadata(m, fd, name)

    def _file(self, tar: tarfile.TarFile, m: tarfile.TarInfo, fd: int, name: str) -> None:
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=fd)
        try:
            src = tar.extractfile(m)
            while src is not None and (chunk := src.read(1 << 20)):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
        finally:
            os.close(out)

    def _hardlink(self, m: tarfile.TarInfo, fd: int, name: str) -> None:
        target = _relative(m.linkname)

        def link(tfd: int, tleaf: str) -> None:
            os.link(tleaf, name, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)

        self._in_parent(target, link, create=False)

    def _metadata(self, m: tarfile.TarInfo, fd: int, name: str) -> None:
        if m.islnk():
            return  # the same inode as its target, whose metadata is set
        os.chown(name, m.uid, m.gid, dir_fd=fd, follow_symlinks=False)
        if m.issym():
            os.utime(name, (int(m.mtime),) * 2, dir_fd=fd, follow_symlinks=False)
            return
        mode = stat.S_IMODE(m.mode)
        if mode & (stat.S_ISUID | stat.S_ISGID) and not self.policy.allow_setuid:
            self.notes.append(f"setuid/setgid bits cleared on {_relative(m.name)}")
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        os.chmod(name, mode, dir_fd=fd)  # not a symlink: the entry was just made by us
        self._xattrs(m, fd, name)
        if not m.isdir():
            os.utime(name, (int(m.mtime),) * 2, dir_fd=fd, follow_symlinks=False)

    def _xattrs(self, m: tarfile.TarInfo, fd: int, name: str) -> None:
        for key, value in (m.pax_headers or {}).items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr."):]
            allowed = attr.startswith("user.") or (attr == "security.capability" and self.policy.allow_setuid)
            if not allowed:
                self.notes.append(f"xattr {attr} on {_relative(m.name)} dropped")
                continue
            data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
            target = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                os.setxattr(target, attr, data)
            finally:
                os.close(target)

    @staticmethod
    def _whiteout(fd: int, name: str) -> None:
        _remove(fd, name)
        os.mknod(name, 0o600 | stat.S_IFCHR, os.makedev(0, 0), dir_fd=fd)

    # -- paths beneath the root

    def _in_parent(self, rel: str, action, create: bool = True) -> None:  # noqa: ANN001
        """action(parent directory fd, leaf name) with the parent resolved beneath the root."""
        parent_rel, leaf = posixpath.split(rel)
        if not leaf or leaf in (".", ".."):
            raise LayerError(f"bad path {rel!r} in the layer", where="layer")
        self._in_dir(parent_rel, lambda fd: action(fd, leaf), create)

    def _in_dir(self, rel: str, action, create: bool = True) -> None:  # noqa: ANN001
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for component in [c for c in rel.split("/") if c not in ("", ".")]:
                nxt = _step(fd, component, create, rel)
                os.close(fd)
                fd = nxt
            action(fd)
        finally:
            os.close(fd)


def _step(fd: int, component: str, create: bool, rel: str) -> int:
    """The directory COMPONENT under FD (made when missing), never through a symlink."""
    try:
        return os.open(component, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise LayerError(f"hard link target {rel!r} is not in the layer", where="layer") from None
    except OSError as exc:  # ELOOP or ENOTDIR: a symlink or a file where a directory should be
        raise LayerError(f"{rel!r} goes through {component!r}, which is not a directory "
                         f"({exc.strerror}): refusing a path escape", where="layer") from None
    os.mkdir(component, 0o755, dir_fd=fd)
    return os.open(component, _DIR_FLAGS, dir_fd=fd)


def _relative(name: str) -> str:
    """The entry's path relative to the layer root; `..` anywhere refuses the layer."""
    path = name.lstrip("/")  # absolute names are taken as beneath the root, as the tools do
    if ".." in path.split("/"):
        raise LayerError(f"path {name!r} has '..': refusing a path escape", where="layer")
    return posixpath.normpath(path) if path else "."


def _is_dir(fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _remove(fd: int, name: str) -> None:
    """Make room for an entry: what an earlier entry of this layer put at NAME goes."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
        try:
            for entry in os.listdir(sub):
                _remove(sub, entry)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=fd)
    else:
        os.unlink(name, dir_fd=fd)
