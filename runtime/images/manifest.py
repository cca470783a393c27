"""Image manifests, indexes and configs as plain data: OCI image index/manifest and Docker
manifest list/schema 2 in, the platform's manifest picked, every descriptor checked. Schema 1
is refused. Nothing here touches the network or the disk: the callers verify digests of bytes.
"""

from __future__ import annotations

from .._lite import json
from .._lite.dataclasses import dataclass, field
from ..errors import SpecError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((*MANIFESTS, *INDEXES))  # what a registry client asks for
MAX_DOCUMENT = 4 << 20  # manifests, indexes and configs are small; a bigger one is an attack


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)


@dataclass
class Manifest:
    config: Descriptor
    layers: list[Descriptor]


@dataclass
class Config:
    """What a container made from the image needs (the OCI image config's `config` and rootfs)."""

    diff_ids: list[str]
    user: str = ""
    env: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = ""
    exposed_ports: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    os: str = "linux"
    architecture: str = "amd64"


def check_digest(digest: object, where: str) -> str:
    algorithm, _, encoded = str(digest).partition(":")
    if algorithm != "sha256" or len(encoded) != 64 or encoded.strip("0123456789abcdef"):
        raise SpecError(f"unsupported or malformed digest {digest!r}", where=where, hint="sha256:<64 hex>")
    return str(digest)


def load(data: bytes, where: str) -> dict:
    if len(data) > MAX_DOCUMENT:
        raise SpecError(f"document of {len(data)} bytes is larger than {MAX_DOCUMENT}", where=where)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"not JSON: {exc}", where=where) from None
    if not isinstance(doc, dict):
        raise SpecError("not a JSON object", where=where)
    return doc


def kind(doc: dict, media_type: str, where: str) -> str:
    """The document's media type: the one it was served as, else its own field, else its shape."""
    found = media_type or doc.get("mediaType") or ""
    if found in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise SpecError("Docker image manifest schema 1 is not supported", where=where,
                        hint="push the image again with a current tool (schema 2 or OCI)")
    if not found:
        found = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if found not in (*INDEXES, *MANIFESTS):
        raise SpecError(f"unsupported manifest media type {found!r}", where=where)
    return found


def descriptor(d: object, where: str) -> Descriptor:
    if not isinstance(d, dict):
        raise SpecError("descriptor is not an object", where=where)
    size = d.get("size")
    if not isinstance(size, int) or size < 0:
        raise SpecError(f"descriptor size {size!r} is not a byte count", where=where)
    media_type = d.get("mediaType", "")
    if not isinstance(media_type, str):
        raise SpecError("descriptor mediaType is not a string", where=where)
    platform = d.get("platform") or {}
    annotations = d.get("annotations") or {}
    if not isinstance(platform, dict) or not isinstance(annotations, dict):
        raise SpecError("descriptor platform/annotations are not objects", where=where)
    digest = check_digest(d.get("digest"), f"{where}.digest")
    return Descriptor(media_type, digest, size, platform, annotations)


def pick(doc: dict, where: str, os_name: str = "linux", arch: str = "amd64", variant: str = "") -> Descriptor:
    """The manifest for the platform from an index (a variant, when asked, must match)."""
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise SpecError("index has no manifests list", where=where)
    found = []
    for i, entry in enumerate(entries):
        d = descriptor(entry, f"{where}.manifests[{i}]")
        p = d.platform
        if (p.get("os"), p.get("architecture")) == (os_name, arch) and variant in ("", p.get("variant")):
            found.append(d)
    if not found:
        platforms = [e.get("platform") or {} for e in entries if isinstance(e, dict)]
        offered = sorted({f"{p.get('os')}/{p.get('architecture')}" for p in platforms})
        raise SpecError(f"no image for {os_name}/{arch}{'/' + variant if variant else ''}", where=where,
                        hint=f"the index offers: {', '.join(offered) or 'nothing'}")
    return found[0]


def manifest(doc: dict, where: str) -> Manifest:
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise SpecError("manifest has no layers list", where=where)
    return Manifest(descriptor(doc.get("config"), f"{where}.config"),
                    [descriptor(x, f"{where}.layers[{i}]") for i, x in enumerate(layers)])


def config(doc: dict, where: str) -> Config:
    rootfs = doc.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise SpecError("image config has no rootfs.diff_ids", where=where)
    c = doc.get("config") or {}
    if not isinstance(c, dict):
        raise SpecError("image config's config is not an object", where=where)

    def strings(key: str) -> list[str]:
        value = c.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SpecError(f"config.{key} is not a list of strings", where=where)
        return list(value)

    return Config(
        diff_ids=[check_digest(x, f"{where}.rootfs.diff_ids[{i}]") for i, x in enumerate(diff_ids)],
        user=str(c.get("User") or ""),
        env=strings("Env"),
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        workdir=str(c.get("WorkingDir") or ""),
        exposed_ports=sorted(c.get("ExposedPorts") or {}),
        labels=dict(c.get("Labels") or {}),
        os=str(doc.get("os") or "linux"),
        architecture=str(doc.get("architecture") or "amd64"),
    )
