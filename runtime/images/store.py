"""The image store: content-addressed blobs, one unpacked directory per layer (shared by every
image that has it), image metadata and tags, under one root (default /var/lib/stockade/images,
STOCKADE_IMAGE_STORE moves it).

    blobs/sha256/<hex>      compressed layers, manifests, configs: written beside, verified, renamed
    layers/<diff-id hex>/   a layer unpacked by layers.apply (an overlayfs lower directory)
    images/<config hex>.json  one image: its id, names, manifest, config and layers
    containers/<key>/       a container's root filesystem over the layers (images.rootfs)
    lock                    flock for metadata changes; layers/<hex>.lock per layer while unpacking
    gc.lock                 shared by pulls and imports while they add, exclusive for prune

Everything is written to a temporary name and renamed, and a blob is checked against its digest
before the rename, so a crash mid-pull leaves only temporaries (removed by the next `prune`),
never a half-written blob, layer or image that would be served.
"""

from __future__ import annotations

import errno
import fcntl
import os

from .._lite import json as jsonlite
from .._lite.dataclasses import asdict, dataclass, field
from ..errors import SpecError
from ..files import write_atomic
from ..state import remove_tree
from . import manifest
from .reference import parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, BinaryIO, NoReturn

    from . import layers

DEFAULT_ROOT = "/var/lib/stockade/images"


@dataclass
class Image:
    id: str  # the config digest
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    manifest_digest: str = ""
    layers: list[str] = field(default_factory=list)  # diff ids, bottom first
    size: int = 0  # compressed bytes of the layers
    config: dict = field(default_factory=dict)  # manifest.Config as a dict

    def image_config(self) -> manifest.Config:
        return manifest.Config(**self.config)


class Store:
    def __init__(self, root: str | None = None, policy: layers.Policy | None = None) -> None:
        self.root = root or os.environ.get("STOCKADE_IMAGE_STORE") or DEFAULT_ROOT
        self._policy = policy
        if set(self.root) & set(",:\\"):
            raise SpecError("the image store's path cannot hold ',', ':' or '\\' (overlayfs options)",
                            where=self.root)
        for sub in ("blobs/sha256", "layers", "images", "containers"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        for path in (self.root, os.path.join(self.root, "containers")):
            # A container's init, root in its user namespace only, must pass through to its root
            # filesystem: search (not read) permission; layers, blobs and images stay 0700.
            mode = os.stat(path).st_mode & 0o7777
            if mode & 0o011 != 0o011:
                os.chmod(path, mode | 0o011)

    # -- blobs

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", manifest.check_digest(digest, "blob")[7:])

    def blob_lock(self, digest: str) -> _flock:
        """Held while one pull fetches the blob, so concurrent pulls of it wait instead."""
        return _flock(self.blob_path(digest) + ".lock")

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def put_blob(self, digest: str, source: BinaryIO, size: int | None = None) -> str:
        """Store SOURCE as DIGEST, refusing it (and keeping nothing) when the bytes disagree."""
        path = self.blob_path(digest)
        if os.path.exists(path):
            return path
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        sha, count = _sha256(), 0
        try:
            with open(tmp, "xb") as out:
                while chunk := source.read(1 << 20):
                    count += len(chunk)
                    if size is not None and count > size:
                        break
                    sha.update(chunk)
                    out.write(chunk)
            if size is not None and count != size:
                raise SpecError(f"blob {digest} has {count if count <= size else 'more than ' + str(size)} "
                                f"bytes, its descriptor says {size}", where="image")
            if "sha256:" + sha.hexdigest() != digest:
                raise SpecError(f"blob {digest} has content sha256:{sha.hexdigest()}", where="image",
                                hint="corrupt or tampered: nothing of it was kept")
            os.rename(tmp, path)
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            _raise_stored(exc, digest, self.root)
        return path

    def add_blob(self, source: BinaryIO) -> tuple[str, int]:
        """Store SOURCE, whose digest is not known beforehand (a docker-archive layer): (digest, size)."""
        tmp = os.path.join(self.root, "blobs", "sha256", f"new.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        sha, count = _sha256(), 0
        try:
            with open(tmp, "xb") as out:
                while chunk := source.read(1 << 20):
                    count += len(chunk)
                    sha.update(chunk)
                    out.write(chunk)
            digest = "sha256:" + sha.hexdigest()
            os.rename(tmp, self.blob_path(digest))
        except BaseException as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            _raise_stored(exc, "a layer", self.root)
        return digest, count

    def read_blob(self, digest: str) -> bytes:
        with open(self.blob_path(digest), "rb") as f:
            return f.read(manifest.MAX_DOCUMENT + 1)

    def _document(self, digest: str) -> dict:
        return manifest.load(self.read_blob(digest), digest)

    # -- layers

    def layer_dir(self, diff_id: str) -> str:
        return os.path.join(self.root, "layers", manifest.check_digest(diff_id, "layer")[7:])

    def unpack(self, layer: manifest.Descriptor, diff_id: str) -> list[str]:
        """The layer's directory, unpacked once however many pulls ask at the same time."""
        from . import layers

        dest = self.layer_dir(diff_id)
        with _flock(dest + ".lock"):
            if os.path.isdir(dest):
                return []
            with open(self.blob_path(layer.digest), "rb") as blob:
                return layers.apply(blob, layer.media_type, dest, diff_id, self.policy).notes

    @property
    def policy(self) -> layers.Policy:
        from . import layers

        if self._policy is None:
            self._policy = layers.Policy()
        return self._policy

    def adding(self) -> _flock:
        """Held (shared) by a pull or an import from its first blob until its image is recorded,
        and by a container's root filesystem while it is made: `prune` (exclusive) waits, so it
        never takes blobs, temporaries or layers that are about to be used."""
        return _flock(os.path.join(self.root, "gc.lock"), shared=True)

    def layers_in_use(self) -> set[str]:
        """Diff ids of layers a container's root filesystem is made of (images.rootfs)."""
        used: set[str] = set()
        base = os.path.join(self.root, "containers")
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "layers")) as f:
                    used.update(f.read().split())
            except OSError:
                continue
        return used

    # -- images

    def add(self, manifest_bytes: bytes, names: list[str], media_type: str = "") -> tuple[Image, list[str]]:
        """An image whose manifest and blobs are in the store: configs checked, layers unpacked,
        metadata written, NAMES tagged. Returns the image and the notes of the layer policy."""
        digest = "sha256:" + _sha256(manifest_bytes).hexdigest()
        doc = manifest.load(manifest_bytes, digest)
        if manifest.kind(doc, media_type, digest) not in manifest.MANIFESTS:
            raise SpecError("an index, not an image manifest", where=digest)
        m = manifest.manifest(doc, digest)
        config = manifest.config(self._document(m.config.digest), m.config.digest)
        if len(config.diff_ids) != len(m.layers):
            raise SpecError(f"{len(m.layers)} layers but {len(config.diff_ids)} diff ids", where=digest)
        notes = []
        for layer, diff_id in zip(m.layers, config.diff_ids, strict=True):
            notes += self.unpack(layer, diff_id)
        image = Image(
            id=m.config.digest,
            manifest_digest=digest,
            layers=config.diff_ids,
            size=sum(x.size for x in m.layers),
            config=asdict(config),
        )
        with _flock(os.path.join(self.root, "lock")):
            for other in self.images():  # a name moves to the newest image that claims it
                kept = [t for t in other.repo_tags if t not in names]
                if kept != other.repo_tags and other.id != image.id:
                    other.repo_tags = kept
                    self._save(other)
            old = self._load(image.id)
            image.repo_tags = sorted({*(old.repo_tags if old else []), *names})
            digests = {f"{parse(n).name}@{digest}" for n in names}
            image.repo_digests = sorted({*(old.repo_digests if old else []), *digests})
            self._save(image)
        return image, notes

    def images(self) -> list[Image]:
        out = []
        for name in sorted(os.listdir(os.path.join(self.root, "images"))):
            if name.endswith(".json"):
                image = self._load("sha256:" + name[:-5])
                if image is not None:
                    out.append(image)
        return out

    def get(self, ref: str) -> Image:
        """An image by name (normalised), name@digest, or id (full or a unique prefix of 12+)."""
        image = self.find(ref)
        if image is not None:
            return image
        raise SpecError(f"no image {ref!r} in the store", where=self.root,
                        hint="`stockade image ls` lists them; import or pull it first")

    def find(self, ref: str) -> Image | None:
        """`get`, but None for an image that is not here (a malformed REF is still an error)."""
        images = self.images()
        found = [i for i in images if _is_id_of(ref, i)]
        if len(found) == 1:
            return found[0]
        r = parse(ref)
        for image in images:
            if (r.digest and f"{r.name}@{r.digest}" in image.repo_digests) or (
                not r.digest and f"{r.name}:{r.tag}" in image.repo_tags
            ):
                return image
        return None

    def remove(self, ref: str) -> Image:
        """Untag REF; the image goes when no name is left, its layers with `prune`."""
        image = self.get(ref)
        with _flock(os.path.join(self.root, "lock")):
            r = None if _is_id_of(ref, image) else parse(ref)
            if r is not None and not r.digest:
                image.repo_tags = [t for t in image.repo_tags if t != f"{r.name}:{r.tag}"]
            else:
                image.repo_tags = []
            if image.repo_tags:
                self._save(image)
            else:
                os.unlink(self._meta(image.id))
        return image

    def prune(self, in_use: set[str] | None = None) -> list[str]:
        """Remove layers and blobs no image references (and temporaries of interrupted work);
        IN_USE: diff ids a running container still mounts. Returns what was removed."""
        with _flock(os.path.join(self.root, "gc.lock")), _flock(os.path.join(self.root, "lock")):
            keep_layers, keep_blobs = set(in_use or ()) | self.layers_in_use(), set()
            for image in self.images():
                keep_layers |= set(image.layers)
                keep_blobs |= {image.id, image.manifest_digest}
                m = manifest.manifest(self._document(image.manifest_digest), image.id)
                keep_blobs |= {x.digest for x in m.layers}
            removed = []
            for entry in os.listdir(os.path.join(self.root, "layers")):
                path = os.path.join(self.root, "layers", entry)
                if entry.endswith(".tmp") or f"sha256:{entry.removesuffix('.lock')}" not in keep_layers:
                    remove_tree(path) if os.path.isdir(path) else os.unlink(path)
                    removed.append(path)
            blobs = os.path.join(self.root, "blobs", "sha256")
            for entry in os.listdir(blobs):
                if entry.endswith(".tmp") or f"sha256:{entry.removesuffix('.lock')}" not in keep_blobs:
                    os.unlink(os.path.join(blobs, entry))
                    removed.append(os.path.join(blobs, entry))
        return removed

    # -- metadata files

    def _meta(self, image_id: str) -> str:
        return os.path.join(self.root, "images", manifest.check_digest(image_id, "image")[7:] + ".json")

    def _load(self, image_id: str) -> Image | None:
        try:
            with open(self._meta(image_id)) as f:
                return Image(**jsonlite.loads(f.read()))
        except FileNotFoundError:
            return None

    def _save(self, image: Image) -> None:
        write_atomic(self._meta(image.id), jsonlite.dumps(asdict(image), sort_keys=True))


class _flock:  # noqa: N801 - used like a function
    def __init__(self, path: str, shared: bool = False) -> None:
        self.path, self.how = path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, self.how)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _sha256(data: bytes = b"") -> Any:
    """OpenSSL's SHA-256 for blobs (several times CPython's own on large layers); imported only
    when a blob is written, so that starting a container from the store does not load libcrypto."""
    import hashlib

    return hashlib.sha256(data)


def _raise_stored(exc: BaseException, what: str, root: str) -> NoReturn:
    """EXC again, or for a failed write (a full disk) an error that names the blob and the cause."""
    if isinstance(exc, OSError):
        hint = "free space on the store's filesystem" if exc.errno == errno.ENOSPC else ""
        raise SpecError(f"cannot store blob {what}: {exc.strerror or exc}", where=root, hint=hint) from None
    raise exc


def _is_id_of(ref: str, image: Image) -> bool:
    """REF names IMAGE by its id: the full digest, or 12 or more of its hex digits."""
    wanted = ref.removeprefix("sha256:")
    return len(wanted) >= 12 and not wanted.strip("0123456789abcdef") and image.id[7:].startswith(wanted)


def iter_names(image: Image) -> Iterator[str]:
    yield from image.repo_tags or [f"<none>@{image.id}"]
