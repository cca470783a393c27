"""Image references, parsed and normalised as docker, podman and containerd do.

`busybox` -> docker.io/library/busybox:latest; `host:port/name:tag`; `name@sha256:<64 hex>`;
tag and digest together (the digest decides, the tag is kept for display). The first path
component is a registry host when it has a dot or a port, or is `localhost`.
"""

from __future__ import annotations

import re

from .._lite.dataclasses import dataclass
from ..errors import SpecError

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGESTS = {"sha256": 64, "sha512": 128}
MAX_NAME = 255


@dataclass
class Reference:
    domain: str
    path: str  # library/busybox
    tag: str = ""
    digest: str = ""  # sha256:<hex>

    @property
    def name(self) -> str:
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse(text: str) -> Reference:
    """A reference from user input; SpecError quoting the part that is wrong."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise SpecError(f"invalid image reference {text!r}: empty or surrounded by spaces", where="image")
    rest, _, digest = text.partition("@")
    if digest:
        _check_digest(text, digest)
    name, tag = _split_tag(rest)
    if tag is not None and not _TAG.fullmatch(tag):
        raise SpecError(f"invalid image reference {text!r}: tag {tag!r}", where="image",
                        hint="letters, digits, '_', '.' and '-', at most 128, not starting with '.' or '-'")
    domain, path = _split_domain(name)
    if not _DOMAIN.fullmatch(domain):
        raise SpecError(f"invalid image reference {text!r}: registry {domain!r}", where="image")
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise SpecError(f"invalid image reference {text!r}: name component {component!r}", where="image",
                            hint="lowercase letters and digits, separated by '.', '_', '__' or '-'")
    if len(f"{domain}/{path}") > MAX_NAME:
        raise SpecError(f"invalid image reference {text!r}: name longer than {MAX_NAME}", where="image")
    if tag is None and not digest:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag or "", digest)


def _split_tag(name: str) -> tuple[str, str | None]:
    """A tag is after the last ':' that comes after the last '/' (a port is before it)."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :]
    return name, None


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain in ("index.docker.io", "registry-1.docker.io"):
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    return domain, path


def _check_digest(text: str, digest: str) -> None:
    algorithm, _, encoded = digest.partition(":")
    size = _DIGESTS.get(algorithm)
    if size is None or len(encoded) != size or encoded.strip("0123456789abcdef"):
        raise SpecError(f"invalid image reference {text!r}: digest {digest!r}", where="image",
                        hint="sha256:<64 lowercase hex digits>")
