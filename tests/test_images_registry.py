"""Pulls from a real registry: Debian's docker-registry (registry:2) on a loopback port, images
built by the tests and pushed with Debian's skopeo, pulled back into a store of the test's own."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from images import PATH_ENV, Registry, TokenServer, concurrently, layer_tar, oci_archive
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


def _partial_blob(root: Path) -> bool:
    """A blob more than 1 MiB into its download (a temporary may be renamed while we look)."""
    for path in (root / "blobs/sha256").glob("*.tmp"):
        try:
            if path.stat().st_size > (1 << 20):
                return True
        except FileNotFoundError:
            continue
    return False


def _layer_descriptors(store: Store, image) -> list:  # noqa: ANN001 - an Image
    from stockade.runtime.images import manifest

    body = store.read_blob(image.manifest_digest)
    return manifest.manifest(manifest.load(body, image.manifest_digest), image.manifest_digest).layers


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


def test_pull_progress_bars_on_a_terminal_lines_in_a_log_nothing_when_quiet(registry: Registry,
                                                                            tmp_path: Path) -> None:
    from terminals import Pty

    image = pull(Store(str(tmp_path / "ref")), f"{registry.host}/test/app:v1", _client(registry))[0]
    layers = [d.digest[:19] for d in _layer_descriptors(Store(str(tmp_path / "ref")), image)]
    stockade = [str(Path(sys.executable).parent / "stockade"), "image", "pull", "--insecure-registry",
                registry.host, f"{registry.host}/test/app:v1"]
    term = Pty([*stockade[:2], "--store", str(tmp_path / "tty"), *stockade[2:]])
    shown = term.expect("sha256:" + image.id[7:], seconds=60)
    assert term.proc.wait(timeout=30) == 0
    for layer in layers:
        assert f"{layer}  unpacked" in shown  # its row, redrawn in place
    # rows are redrawn at most ten times a second: at least the first bar was drawn
    assert "\x1b[2K" in shown and re.search(r"\[#+\] [\d.]+ K?i?B / [\d.]+ K?i?B", shown), shown
    log = subprocess.run([*stockade[:2], "--store", str(tmp_path / "log"), *stockade[2:]],
                         capture_output=True, text=True, timeout=120)
    assert log.returncode == 0 and "\x1b" not in log.stderr
    assert all(f"{layer} fetched" in log.stderr and f"{layer} unpacked" in log.stderr for layer in layers)
    quiet = subprocess.run([*stockade[:2], "--store", str(tmp_path / "q"), *stockade[2:], "--quiet"],
                           capture_output=True, text=True, timeout=120)
    assert (quiet.returncode, quiet.stderr) == (0, "") and quiet.stdout.endswith(f"{image.id}\n")


def test_a_killed_pull_leaves_the_store_consistent(registry: Registry, tmp_path: Path) -> None:
    """SIGKILL in the middle of a large layer: nothing half-written is served, the next pull
    completes, prune removes the temporaries."""
    big = layer_tar(("big", os.urandom(40 << 20)))
    archive = oci_archive(tmp_path / "big.tar", "localhost/big", [(big, "")], {"Cmd": ["true"]})
    registry.push(archive, "test/big:v1")
    root = tmp_path / "s"
    command = [str(Path(sys.executable).parent / "stockade"), "image", "--store", str(root), "pull",
               "--quiet", "--insecure-registry", registry.host, f"{registry.host}/test/big:v1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _partial_blob(root):
        assert proc.poll() is None and time.monotonic() < deadline, "the pull ended before it was killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    store = Store(str(root))
    assert store.images() == []
    for blob in (root / "blobs/sha256").iterdir():
        if not blob.name.endswith((".tmp", ".lock")):  # what is kept is whole and verified
            assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == "sha256:" + blob.name
    assert [p for p in (root / "layers").iterdir() if not p.name.endswith((".tmp", ".lock"))] == []
    image, _ = pull(store, f"{registry.host}/test/big:v1", _client(registry))
    assert Path(store.layer_dir(image.layers[0]), "big").stat().st_size == 40 << 20
    store.prune()
    assert not [p for p in (root / "blobs/sha256").iterdir() if p.name.endswith(".tmp")]


# -- a registry that wants bearer tokens from a token server of the tests' own


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The registry with `auth: token`: public/app (config and three layers), public/other and
    private/app pushed with the token server's user."""
    require(shutil.which("docker-registry") and shutil.which("skopeo") and shutil.which("openssl"),
            "docker-registry, skopeo and openssl (setup)")
    base = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(base)
    reg: Registry | None = None
    try:
        reg = Registry(base, token_auth=tokens)
        archive = oci_archive(base / "app.tar", "localhost/app",
                              [(BASE, "gzip"), (TOP, "zstd"), (layer_tar(("etc/third", b"3\n")), "")],
                              {"Env": [PATH_ENV], "Cmd": ["cat", "/etc/issue"]})
        other = oci_archive(base / "other.tar", "localhost/other",
                            [(layer_tar(("etc/other", b"o\n")), "gzip")], {"Cmd": ["true"]})
        reg.push(archive, "public/app:v1")
        reg.push(archive, "private/app:v1")
        reg.push(other, "public/other:v1")
        yield reg
    finally:
        if reg:
            reg.stop()
        tokens.stop()


def _tokens(reg: Registry) -> TokenServer:
    assert reg.token_auth
    return reg.token_auth


def _auth_file(path: Path, host: str, user: str, password: str) -> str:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": encoded}}}))
    return str(path)


def _nothing_kept(store: Store) -> None:
    assert store.images() == []
    root = Path(store.root)
    assert [p.name for p in (root / "blobs/sha256").iterdir() if not p.name.endswith(".lock")] == []
    assert [p for p in (root / "layers").iterdir() if p.is_dir()] == []


def test_anonymous_pull_of_a_public_image_answers_the_bearer_challenge(token_registry: Registry,
                                                                       store: Store) -> None:
    tokens = _tokens(token_registry)
    # the registry refuses a request without a token, and names the token service
    bare = httpx.get(f"http://{token_registry.host}/v2/public/app/manifests/v1", timeout=10)
    assert bare.status_code == 401 and f'realm="{tokens.realm}"' in bare.headers["www-authenticate"]
    image, _ = pull(store, f"{token_registry.host}/public/app:v1", _client(token_registry))
    assert image.repo_tags == [f"{token_registry.host}/public/app:v1"] and len(image.layers) == 3
    assert image.image_config().cmd == ["cat", "/etc/issue"]
    assert (Path(store.layer_dir(image.layers[2])) / "etc/third").read_bytes() == b"3\n"
    assert ("repository:public/app:pull", "") in tokens.requests  # anonymously


@pytest.mark.parametrize("password", [None, "wrong"], ids=["anonymous", "wrong-password"])
def test_a_private_image_needs_credentials(token_registry: Registry, store: Store, tmp_path: Path,
                                          password: str | None) -> None:
    auth = (_auth_file(tmp_path / "auth.json", token_registry.host, _tokens(token_registry).user, password)
            if password else os.devnull)
    client = Client(insecure={token_registry.host}, auth_file=auth, timeout=10, deadline=120)
    ref = f"{token_registry.host}/private/app:v1"
    with pytest.raises(RegistryError) as err:
        pull(store, ref, client)
    if password:  # the token service refuses the credentials
        assert "token service answered 401 for repository:private/app:pull: UNAUTHORIZED" in err.value.what
        assert "credentials" in err.value.hint
        assert err.value.where.startswith(_tokens(token_registry).realm)
    else:  # an anonymous token without access: the registry refuses it
        answer = f"{token_registry.host}/private/app: GET /v2/private/app/manifests/v1 answered 401"
        assert answer in err.value.what
        assert "UNAUTHORIZED" in err.value.what and err.value.where == ref
        assert "log in" in err.value.hint
    assert token_registry.host in str(err.value)
    _nothing_kept(store)


@pytest.mark.parametrize("key", ["{host}", "http://{host}", "https://{host}/v1/"])
def test_a_private_image_with_credentials_from_the_auth_file(token_registry: Registry, store: Store,
                                                             tmp_path: Path, key: str) -> None:
    """The auth file's key as podman (host:port) or docker login (URL) write it."""
    tokens = _tokens(token_registry)
    key = key.format(host=token_registry.host)
    auth = _auth_file(tmp_path / "auth.json", key, tokens.user, tokens.password)
    client = Client(insecure={token_registry.host}, auth_file=auth, timeout=10, deadline=120)
    image, _ = pull(store, f"{token_registry.host}/private/app:v1", client)
    assert image.repo_tags == [f"{token_registry.host}/private/app:v1"] and len(image.layers) == 3
    base = Path(store.layer_dir(image.layers[0]))
    assert (base / "etc/motd").read_bytes() == b"base\n"
    assert tokens.requests[-1] == ("repository:private/app:pull", tokens.user)  # asked as the user


def test_auth_file_keys_name_the_registry_host(tmp_path: Path) -> None:
    """docker login's URL keys (Docker Hub's is https://index.docker.io/v1/) and podman's host keys."""
    encoded = base64.b64encode(b"hub:pw").decode()
    auths = {"https://index.docker.io/v1/": {"auth": encoded},
             "http://127.0.0.1:5000/v2/": {"auth": base64.b64encode(b"me:a:b").decode()},
             "quay.io": {"auth": encoded}}
    (tmp_path / "auth.json").write_text(json.dumps({"auths": auths}))
    client = Client(auth_file=str(tmp_path / "auth.json"))
    try:
        assert client.credentials == {"registry-1.docker.io": ("hub", "pw"), "127.0.0.1:5000": ("me", "a:b"),
                                      "quay.io": ("hub", "pw")}
    finally:
        client.close()


def test_tokens_are_cached_per_scope(token_registry: Registry, store: Store) -> None:
    tokens = _tokens(token_registry)
    app, other = "repository:public/app:pull", "repository:public/other:pull"
    before = {scope: tokens.count(scope) for scope in (app, other)}
    gets = len(token_registry.blob_gets())
    client = _client(token_registry)
    image, _ = pull(store, f"{token_registry.host}/public/app:v1", client)
    assert len(token_registry.blob_gets()) - gets == 4  # the config and three layers ...
    assert tokens.count(app) - before[app] == 1  # ... with one token
    again, _ = pull(store, f"{token_registry.host}/public/app@{image.manifest_digest}", client)
    assert again.id == image.id and tokens.count(app) - before[app] == 1
    pull(store, f"{token_registry.host}/public/other:v1", client)  # another repository: its own token
    assert tokens.count(other) - before[other] == 1 and tokens.count(app) - before[app] == 1
    # a new client starts without tokens
    pull(store, f"{token_registry.host}/public/other:v1", _client(token_registry))
    assert tokens.count(other) - before[other] == 2


def test_an_expired_token_is_fetched_again(token_registry: Registry, store: Store) -> None:
    """A token the registry no longer takes (a long pull outlives it) is replaced, not an error."""
    tokens = _tokens(token_registry)
    scope = "repository:public/other:pull"
    before = tokens.count(scope)
    client = _client(token_registry)
    tokens.LIFETIME = -57  # the registry allows 60 s of clock skew: this token works for 2-3 s
    try:
        image, _ = pull(store, f"{token_registry.host}/public/other:v1", client)
    finally:
        tokens.LIFETIME = TokenServer.LIFETIME
    time.sleep(4)
    again, _ = pull(store, f"{token_registry.host}/public/other@{image.manifest_digest}", client)
    assert again.id == image.id and tokens.count(scope) - before == 2


def test_a_token_service_that_is_down(tmp_path: Path, store: Store) -> None:
    require(shutil.which("docker-registry") and shutil.which("openssl"), "docker-registry, openssl (setup)")
    tokens = TokenServer(tmp_path)
    reg = Registry(tmp_path, token_auth=tokens)
    try:
        tokens.stop()
        with pytest.raises(RegistryError, match="cannot reach the token service") as err:
            pull(store, f"{reg.host}/public/app:v1", _client(reg))
        assert err.value.where.startswith(tokens.realm)
    finally:
        reg.stop()
    _nothing_kept(store)
