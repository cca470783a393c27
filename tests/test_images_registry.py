"""Pulls from a real registry: Debian's docker-registry (registry:2) on a loopback port, images
built by the tests and pushed with Debian's skopeo, pulled back into a store of the test's own."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from images import PATH_ENV, Registry, concurrently, layer_tar, oci_archive
from kernel import needs_root, require  # noqa: F401 - needs_root: a fixture, used by name
from stockade.runtime.images.registry import Client, RegistryError, pull
from stockade.runtime.images.store import Store

pytestmark = pytest.mark.usefixtures("needs_root")


BASE = layer_tar(("etc/motd", b"base\n"), ("data/blob", os.urandom(200_000)))
TOP = layer_tar(("etc/.wh.motd", b""), ("etc/issue", b"top\n"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    require(shutil.which("docker-registry") and shutil.which("skopeo"), "docker-registry and skopeo (setup)")
    base = tmp_path_factory.mktemp("registry")
    reg = Registry(base)
    try:
        archive = oci_archive(base / "app.tar", "localhost/app", [(BASE, "gzip"), (TOP, "zstd")],
                              {"Env": [PATH_ENV], "Cmd": ["cat", "/etc/issue"], "User": "1000"})
        reg.push(archive, "test/app:v1")
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def _client(reg: Registry) -> Client:
    return Client(insecure={reg.host}, auth_file=os.devnull, timeout=10, deadline=120)


def test_pull_unpacks_what_the_layers_say(registry: Registry, store: Store) -> None:
    image, _ = pull(store, f"{registry.host}/test/app:v1", _client(registry))
    assert image.repo_tags == [f"{registry.host}/test/app:v1"]
    assert image.image_config().cmd == ["cat", "/etc/issue"] and image.image_config().user == "1000"
    base, top = (Path(store.layer_dir(d)) for d in image.layers)
    with tarfile.open(fileobj=io.BytesIO(BASE)) as tar:
        for member in tar.getmembers():
            assert (base / member.name).read_bytes() == tar.extractfile(member).read()  # type: ignore[union-attr]
    assert (top / "etc/issue").read_bytes() == b"top\n" and (top / "etc/motd").lstat().st_rdev == 0
    # by digest, and nothing downloaded again
    gets = len(registry.blob_gets())
    again, _ = pull(store, f"{registry.host}/test/app@{image.manifest_digest}", _client(registry))
    assert again.id == image.id and len(registry.blob_gets()) == gets


def test_concurrent_pulls_fetch_each_blob_once(registry: Registry, store: Store) -> None:
    before = registry.blob_gets()
    ref = f"{registry.host}/test/app:v1"
    errors = concurrently(lambda: pull(Store(store.root), ref, _client(registry)), 3)
    assert errors == []
    fetched = registry.blob_gets()[len(before):]
    assert len(fetched) == len(set(fetched)) == 3  # config and two layers, once each


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("test/nothing:v1", "answered 404"),
        ("test/app:v2", "answered 404"),
        ("test/app@sha256:" + "0" * 64, "answered 404"),
    ],
)
def test_unknown_images_and_tags_are_named(registry: Registry, store: Store, ref: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message) as err:
        pull(store, f"{registry.host}/{ref}", _client(registry))
    assert registry.host in err.value.what
    assert store.images() == []


def test_a_registry_that_is_down_or_not_plain_http(registry: Registry, store: Store) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(RegistryError, match="cannot reach"):
        pull(store, f"{closed}/test/app:v1", Client(insecure={closed}, auth_file=os.devnull, timeout=3))
    with pytest.raises(RegistryError, match="cannot reach"):  # HTTPS to a plain HTTP registry
        pull(store, f"{registry.host}/test/app:v1", Client(auth_file=os.devnull, timeout=5))


def test_a_corrupt_blob_is_refused_and_nothing_kept(registry: Registry, store: Store, tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "c.tar", "localhost/corrupt", [(layer_tar(("f", b"x" * 5000)), "gzip")],
                          {"Cmd": ["true"]})
    registry.push(archive, "test/corrupt:v1")
    blobs = list((registry.data / "docker/registry/v2/blobs/sha256").rglob("data"))
    victim = max(blobs, key=lambda p: p.stat().st_mtime_ns if p.stat().st_size > 100 else 0)
    victim.write_bytes(victim.read_bytes()[:-10] + b"\0" * 10)
    with pytest.raises(Exception, match="has content|decompress|corrupt"):
        pull(store, f"{registry.host}/test/corrupt:v1", _client(registry))
    assert store.images() == []
    leftovers = [p for p in (Path(store.root) / "blobs/sha256").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] and [p for p in (Path(store.root) / "layers").iterdir() if p.is_dir()] == []


def test_pull_from_the_command_line(registry: Registry, tmp_path: Path) -> None:
    stockade = [str(Path(sys.executable).parent / "stockade"), "image", "--store", str(tmp_path / "s")]
    done = subprocess.run([*stockade, "pull", "--insecure-registry", registry.host,
                           f"{registry.host}/test/app:v1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"{registry.host}/test/app:v1 sha256:" in done.stdout, done.stderr
    command = [*stockade, "pull", "--insecure-registry", registry.host, f"{registry.host}/test/none"]
    bad = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "answered 404" in bad.stderr and "no such image" in bad.stderr
