"""Images in and out without a registry: OCI image layouts (a directory or a tar of one) and
`docker save` archives in, OCI image layouts out, for nodes that cannot reach a registry.

Everything read is checked as a pull checks it: blobs against their digests (or digested as
they are stored, for a docker archive's layers, which have none), layers against the config's
diff ids when they are unpacked. A layout or archive is untrusted: names inside it are looked
up as members, never joined to a path on the host.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

from ..errors import SpecError
from . import manifest
from .reference import parse
from .store import Image, Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
_MAGIC = ((b"\x1f\x8b", "application/vnd.oci.image.layer.v1.tar+gzip"),
          (b"\x28\xb5\x2f\xfd", "application/vnd.oci.image.layer.v1.tar+zstd"))
_TAR = "application/vnd.oci.image.layer.v1.tar"


def import_archive(store: Store, path: str, name: str | None = None) -> list[tuple[Image, list[str]]]:
    """PATH (an OCI layout directory or tar, or a docker-archive tar) into STORE; NAME renames
    a single image. Returns each image with the notes of the layer policy."""
    with _Archive(path) as archive, store.adding():
        if archive.has("index.json"):
            return _import_oci(store, archive, name)
        if archive.has("manifest.json"):
            return _import_docker(store, archive, name)
    raise SpecError("neither an OCI image layout (index.json) nor a docker archive (manifest.json)",
                    where=path, hint="`skopeo copy` can make either")


def export_oci(store: Store, ref: str, out: str) -> Image:
    """REF as an OCI image layout: a directory OUT, or a tar when OUT ends in .tar."""
    image = store.get(ref)
    body = store.read_blob(image.manifest_digest)
    m = manifest.manifest(manifest.load(body, image.manifest_digest), image.manifest_digest)
    annotations = {}
    if image.repo_tags:
        annotations = {"io.containerd.image.name": image.repo_tags[0],
                       "org.opencontainers.image.ref.name": parse(image.repo_tags[0]).tag or "latest"}
    entry = {"mediaType": manifest.kind(json.loads(body), "", ref), "digest": image.manifest_digest,
             "size": len(body), **({"annotations": annotations} if annotations else {})}
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps({"schemaVersion": 2, "mediaType": manifest.OCI_INDEX,
                                  "manifests": [entry]}).encode(),
    }
    blobs = [image.manifest_digest, m.config.digest, *(x.digest for x in m.layers)]
    for digest in blobs:
        if not store.has_blob(digest):
            raise SpecError(f"blob {digest} of {ref} is not in the store", where=store.root,
                            hint="pull or import the image again")
    if out.endswith(".tar"):
        _write_tar(store, out, files, blobs)
    else:
        _write_dir(store, out, files, blobs)
    return image


def _import_oci(store: Store, archive: _Archive, name: str | None) -> list[tuple[Image, list[str]]]:
    index = manifest.load(archive.read("index.json"), f"{archive.path}: index.json")
    out = []
    for i, entry in enumerate(index.get("manifests") or []):
        d = manifest.descriptor(entry, f"{archive.path}: index.json manifests[{i}]")
        names = [name] if name else [a for k in NAME_ANNOTATIONS if (a := d.annotations.get(k))][:1]
        if d.media_type in manifest.INDEXES:
            d = manifest.pick(manifest.load(archive.blob(d.digest), d.digest), d.digest)
        names = [str(parse(n)) for n in names if ":" in n or "/" in n or name]
        body = archive.blob(d.digest)
        m = manifest.manifest(manifest.load(body, d.digest), d.digest)
        for blob in (m.config, *m.layers):
            archive.copy_blob(store, blob)
        store.put_blob(d.digest, io.BytesIO(body), d.size)
        out.append(store.add(body, names, d.media_type))
    if not out:
        raise SpecError("the layout's index.json lists no image", where=archive.path)
    return out


def _import_docker(store: Store, archive: _Archive, name: str | None) -> list[tuple[Image, list[str]]]:
    """`docker save`'s format: manifest.json lists each image's config file, layer files and tags."""
    where = f"{archive.path}: manifest.json"
    try:
        entries = json.loads(archive.read("manifest.json"))
    except ValueError as exc:
        raise SpecError(f"manifest.json is not JSON: {exc}", where=where) from None
    if not isinstance(entries, list) or not entries:
        raise SpecError("manifest.json lists no image", where=where)
    if name and len(entries) != 1:
        raise SpecError(f"--name for an archive of {len(entries)} images", where=where)
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str) or not isinstance(
                entry.get("Layers"), list):
            raise SpecError(f"entry {i} needs Config and Layers", where=where)
        config = archive.read(entry["Config"])
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        store.put_blob(config_digest, io.BytesIO(config), len(config))
        layers = [_docker_layer(store, archive, str(member)) for member in entry["Layers"]]
        body = json.dumps({
            "schemaVersion": 2, "mediaType": manifest.OCI_MANIFEST,
            "config": {"mediaType": manifest.OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": layers,
        }).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        store.put_blob(digest, io.BytesIO(body), len(body))
        tags = [name] if name else [str(t) for t in entry.get("RepoTags") or []]
        out.append(store.add(body, [str(parse(t)) for t in tags], manifest.OCI_MANIFEST))
    return out


def _docker_layer(store: Store, archive: _Archive, member: str) -> dict:
    with archive.open(member) as f:
        head = f.read(4)
    media_type = next((t for magic, t in _MAGIC if head.startswith(magic)), _TAR)
    with archive.open(member) as f:
        digest, size = store.add_blob(f)
    return {"mediaType": media_type, "digest": digest, "size": size}


def _write_dir(store: Store, out: str, files: dict[str, bytes], blobs: list[str]) -> None:
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    for digest in blobs:
        target = os.path.join(out, "blobs", "sha256", digest[7:])
        if not os.path.exists(target):
            with open(store.blob_path(digest), "rb") as src, open(target + ".tmp", "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.rename(target + ".tmp", target)
    for name, data in files.items():  # index.json last: the layout is complete once it exists
        with open(os.path.join(out, name + ".tmp"), "wb") as f:
            f.write(data)
        os.rename(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def _write_tar(store: Store, out: str, files: dict[str, bytes], blobs: list[str]) -> None:
    tmp = out + ".tmp"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
            for digest in dict.fromkeys(blobs):
                path = store.blob_path(digest)
                info = tarfile.TarInfo("blobs/sha256/" + digest[7:])
                info.size, info.mode = os.path.getsize(path), 0o644
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.rename(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class _Archive:
    """Read access to a directory or a tar of an image archive, verifying what it hands out."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.tar = None if os.path.isdir(path) else tarfile.open(path, "r:*")
        except (OSError, tarfile.TarError) as exc:
            raise SpecError(f"cannot read the archive: {exc}", where=path,
                            hint="an OCI layout (directory or tar) or a docker-archive tar") from None

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *_: object) -> None:
        if self.tar is not None:
            self.tar.close()

    def has(self, name: str) -> bool:
        if self.tar is None:
            return os.path.isfile(os.path.join(self.path, name))
        try:
            self.tar.getmember(name)
        except KeyError:
            return False
        return True

    def open(self, name: str) -> BinaryIO:
        if name.startswith("/") or ".." in name.split("/"):
            raise SpecError(f"member name {name!r} leaves the archive", where=self.path)
        try:
            if self.tar is None:
                return open(os.path.join(self.path, name), "rb")  # noqa: SIM115 - the caller closes it
            member = self.tar.getmember(name)
            # links are followed inside the archive only (tarfile looks their targets up as members)
            f = self.tar.extractfile(member) if member.isreg() or member.issym() or member.islnk() else None
        except (KeyError, FileNotFoundError):
            raise SpecError(f"no {name} in the archive", where=self.path) from None
        if f is None:
            raise SpecError(f"{name} is not a file in the archive", where=self.path)
        return f  # type: ignore[return-value]

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            data = f.read(manifest.MAX_DOCUMENT + 1)
        if len(data) > manifest.MAX_DOCUMENT:
            raise SpecError(f"{name} is larger than {manifest.MAX_DOCUMENT} bytes", where=self.path)
        return data

    def blob(self, digest: str) -> bytes:
        data = self.read("blobs/sha256/" + manifest.check_digest(digest, self.path)[7:])
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise SpecError(f"blob {digest} of the layout does not match its digest", where=self.path)
        return data

    def copy_blob(self, store: Store, d: manifest.Descriptor) -> None:
        if not store.has_blob(d.digest):
            with self.open("blobs/sha256/" + d.digest[7:]) as f:
                store.put_blob(d.digest, f, d.size)
