"""Image references, normalised as docker, podman and containerd do; bad ones quoted."""

from __future__ import annotations

import pytest
from stockade.runtime.errors import SpecError
from stockade.runtime.images.reference import parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("user/app", "docker.io/user/app:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/team/app:v1.2_rc-3", "localhost:5000/team/app:v1.2_rc-3"),
        ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest"),
        ("quay.io/a/b/c", "quay.io/a/b/c:latest"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"reg.example:443/app:v1@{DIGEST}", f"reg.example:443/app:v1@{DIGEST}"),
        ("a__b/c-d.e", "docker.io/a__b/c-d.e:latest"),
    ],
)
def test_references_normalise(text: str, canonical: str) -> None:
    ref = parse(text)
    assert str(ref) == canonical
    assert parse(str(ref)) == ref  # canonical form is a fixed point


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("BusyBox", "'BusyBox'"),
        ("busybox:", "tag ''"),
        ("busybox:-x", "tag '-x'"),
        ("busybox:" + "x" * 129, "tag 'xxx"),
        ("busybox@sha256:abc", "digest 'sha256:abc'"),
        ("busybox@md5:" + "a" * 32, "digest 'md5:"),
        ("a//b", "name component ''"),
        ("a/b..c", "name component 'b..c'"),
        ("bad_host.example:99999x/app", "registry 'bad_host.example:99999x'"),
        ("", "empty"),
        (" busybox", "spaces"),
    ],
)
def test_malformed_references_quote_the_wrong_part(text: str, quoted: str) -> None:
    with pytest.raises(SpecError) as err:
        parse(text)
    assert quoted in err.value.what, err.value.what
