"""The CRI server's RuntimeService basics and ImageService, driven as kubelet and critest drive
them: a real `stockade cri serve`, a real registry (Debian's docker-registry, images the tests
build and push with skopeo), the generated CRI stubs. Test names follow the CRI validation
suite's areas (runtime info, image management, image consistency)."""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from images import PATH_ENV, Registry, TokenServer, layer_tar, oci_archive
from kernel import needs_root, require  # noqa: F401 - needs_root: a fixture, used by name

from cri import STOCKADE, Server, fast_tmp, pb, pull, status_code

pytestmark = pytest.mark.usefixtures("needs_root")
Pair = tuple[Registry, Registry]

APP = [(layer_tar(("etc/motd", b"base\n"), ("bin/app", b"#!/bin/sh\n")), "gzip"),
       (layer_tar(("etc/issue", b"top\n")), "zstd")]


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Registry]]:
    """An open registry with test/app (user 1000) and test/named (user app), and one that wants
    bearer tokens with private/app on it."""
    require(shutil.which("docker-registry") and shutil.which("skopeo"), "docker-registry and skopeo (setup)")
    base = tmp_path_factory.mktemp("registries")
    (base / "open").mkdir()
    (base / "token").mkdir()
    open_registry = Registry(base / "open")
    tokens = TokenServer(base / "token")
    token_registry = Registry(base / "token", token_auth=tokens)
    try:
        for name, user in (("test/app:v1", "1000"), ("test/named:v1", "app")):
            archive = oci_archive(base / f"{user}.tar", "localhost/x", APP, {"Env": [PATH_ENV], "User": user,
                                                                         "Cmd": ["/bin/app"]})
            open_registry.push(archive, name)
        private = oci_archive(base / "p.tar", "localhost/p", APP, {"Cmd": ["/bin/app"]})
        token_registry.push(private, "private/app:v1")
        yield open_registry, token_registry
    finally:
        open_registry.stop()
        token_registry.stop()
        tokens.stop()


@pytest.fixture
def server(registries: Pair) -> Iterator[Server]:
    base = fast_tmp()
    srv = Server(base, *(f for r in registries for f in ("--insecure-registry", r.host)))
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        assert not srv.socket.exists()
        shutil.rmtree(base, ignore_errors=True)


def test_runtime_info_version_status_and_config(server: Server) -> None:
    version = server.runtime.Version(pb.VersionRequest(version="v1"))
    assert (version.runtime_name, version.runtime_api_version) == ("stockade", "v1")
    status = server.runtime.Status(pb.StatusRequest())
    conditions = {c.type: c for c in status.status.conditions}
    assert conditions["RuntimeReady"].status is True
    assert conditions["NetworkReady"].status is False and conditions["NetworkReady"].reason
    assert {h.name for h in status.runtime_handlers} == {"stockade", "stockade-audit", ""}
    config = server.runtime.RuntimeConfig(pb.RuntimeConfigRequest())
    assert config.linux.cgroup_driver == pb.CGROUPFS
    ok = pb.UpdateRuntimeConfigRequest(runtime_config=pb.RuntimeConfig(
        network_config=pb.NetworkConfig(pod_cidr="10.88.0.0/16")))
    server.runtime.UpdateRuntimeConfig(ok)
    bad = pb.UpdateRuntimeConfigRequest(runtime_config=pb.RuntimeConfig(
        network_config=pb.NetworkConfig(pod_cidr="10.88.0.0/33")))
    code, message = status_code(server.runtime.UpdateRuntimeConfig, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pod_cidr" in message
    mode = server.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def test_image_consistency_pull_status_list_agree(server: Server, registries: Pair) -> None:
    host = registries[0].host
    ref = pull(server, f"{host}/test/app:v1")
    assert ref.startswith("sha256:")
    by_tag = _status(server, f"{host}/test/app:v1")
    assert by_tag.image.id == ref and by_tag.image.repo_tags == [f"{host}/test/app:v1"]
    assert by_tag.image.uid.value == 1000 and by_tag.image.username == "" and by_tag.image.size > 0
    digest = by_tag.image.repo_digests[0]
    for name in (digest, ref, ref[7:19]):
        assert _status(server, name).image.id == ref
    listed = server.images.ListImages(pb.ListImagesRequest()).images
    assert [i.id for i in listed] == [ref]
    only_one = pb.ImageFilter(image=pb.ImageSpec(image=digest))
    only = server.images.ListImages(pb.ListImagesRequest(filter=only_one))
    assert [i.id for i in only.images] == [ref]
    named = _status(server, _pulled(server, host))
    assert named.image.username == "app" and not named.image.HasField("uid")
    verbose = server.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref), verbose=True))
    assert ref in verbose.info["info"]
    usage = server.images.ImageFsInfo(pb.ImageFsInfoRequest()).image_filesystems[0]
    assert usage.used_bytes.value > 0 and usage.inodes_used.value > 0 and usage.timestamp > 0
    assert usage.fs_id.mountpoint == str(server.base / "images")


def _status(server: Server, name: str) -> pb.ImageStatusResponse:
    return server.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=name)))


def _pulled(server: Server, host: str) -> str:
    pull(server, f"{host}/test/named:v1")
    return f"{host}/test/named:v1"


def test_image_management_remove_drops_every_name_and_is_idempotent(server: Server, registries: Pair) -> None:
    host = registries[0].host
    ref = pull(server, f"{host}/test/app:v1")
    pull(server, f"{host}/test/app@" + _status(server, ref).image.repo_digests[0].split("@")[1])
    server.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=f"{host}/test/app:v1")))
    assert not _status(server, ref).HasField("image")
    assert server.images.ListImages(pb.ListImagesRequest()).images == []
    assert [p for p in (server.base / "images/layers").iterdir() if not p.name.endswith(".lock")] == []
    server.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)))  # gone already: OK
    unknown = _status(server, f"{host}/test/none:v1")
    assert not unknown.HasField("image")


def test_pull_with_credentials_from_the_request(server: Server, registries: Pair) -> None:
    token_registry = registries[1]
    image = f"{token_registry.host}/private/app:v1"
    code, message = status_code(pull, server, image)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "private/app" in message
    auth = token_registry.token_auth
    assert pull(server, image, username=auth.user, password=auth.password).startswith("sha256:")
    import base64

    encoded = base64.b64encode(f"{auth.user}:{auth.password}".encode()).decode()
    server.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image)))
    assert pull(server, image, auth=encoded).startswith("sha256:")


@pytest.mark.parametrize(("image", "code", "words"), [
    ("", grpc.StatusCode.INVALID_ARGUMENT, "image.image"),
    ("Not A Reference", grpc.StatusCode.INVALID_ARGUMENT, "Not A Reference"),
    ("{host}/test/none:v1", grpc.StatusCode.NOT_FOUND, "test/none"),
    ("127.0.0.1:1/test/app:v1", grpc.StatusCode.UNAVAILABLE, "cannot reach"),
])
def test_bad_pulls_get_the_right_status_and_leave_nothing(server: Server, registries: Pair, image: str,
                                                          code: grpc.StatusCode, words: str) -> None:
    got, message = status_code(pull, server, image.format(host=registries[0].host))
    assert got == code and words in message, message
    assert list((server.base / "images/images").iterdir()) == []
    assert not [p for p in (server.base / "images/blobs/sha256").iterdir() if p.name.endswith(".tmp")]


def test_a_client_deadline_ends_the_pull_with_deadline_exceeded(server: Server) -> None:
    """A registry that accepts and never answers: the call ends at the client's deadline, the
    server stops waiting too and keeps serving."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        request = pb.PullImageRequest(image=pb.ImageSpec(image=f"{host}/test/app:v1"))
        code, _ = status_code(server.images.PullImage, request, timeout=2)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10  # the server gave up by itself, the registry still silent
        while "PullImage refused" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.1)
        assert "timed out" in server.log.read_text() or "deadline" in server.log.read_text()
    assert server.runtime.Version(pb.VersionRequest()).runtime_name == "stockade"


def test_concurrent_pulls_of_one_image_agree(server: Server, registries: Pair) -> None:
    host = registries[0].host
    refs: list[str] = []
    threads = [threading.Thread(target=lambda: refs.append(pull(server, f"{host}/test/app:v1")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(refs) == 4 and len(set(refs)) == 1


def test_a_second_server_on_the_same_socket_is_refused(server: Server) -> None:
    done = subprocess.run([STOCKADE, "cri", "serve", "--socket", str(server.socket), "--state-dir",
                           str(server.base / "state2"), "--image-store", str(server.base / "images")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "another server is listening" in done.stderr
    assert server.runtime.Version(pb.VersionRequest()).runtime_name == "stockade"


@pytest.mark.parametrize(("text", "words"), [
    ('[stockade]\nsokcet = "/x"\n', "unknown key 'sokcet'"),
    ("[stockade\n", "not valid TOML"),
    ('[stockade]\ndefault_handler = "nope"\n', "default_handler 'nope'"),
    ('[stockade.handlers.strict]\nprofile = 3\n', "stockade.handlers.strict.profile: expected a str"),
    ('[stockade]\nnetwork = "ovs"\n', "network 'ovs'"),
    ('[stockade]\nnetwork = "bridge"\n[stockade.pod_network]\npod_cidr = "10.0.0.1/16"\n',
     "is not an IPv4 network"),
    ('[stockade.pod_network]\npod_cidr6 = "10.1.0.0/16"\n', "pod_cidr6 '10.1.0.0/16' is not an IPv6 network"),
    ('[stockade.pod_network]\npod_cidr6 = "fd00::/120"\n', "pod_cidr6 fd00::/120 is too small"),
    ('[stockade.pod_network]\nnode_allow = ["10.0.0.1:53"]\n', "node_allow entry '10.0.0.1:53'"),
])
def test_a_bad_configuration_is_named_and_nothing_starts(tmp_path: Path, text: str, words: str) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text(text)
    # --no-bpf-agent: should a bad configuration slip through, it must not touch the node's pins
    done = subprocess.run([STOCKADE, "cri", "serve", "--config", str(config), "--no-bpf-agent", "--socket",
                           str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and words in done.stderr and str(config) in done.stderr, done.stderr
    assert not (tmp_path / "s.sock").exists()


def test_handlers_from_the_configuration_are_listed(tmp_path: Path) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text('[stockade]\ndefault_handler = "strict"\nlog_format = "json"\n'
                      '[stockade.handlers.strict]\nuser_namespace = true\n'
                      '[stockade.handlers.lenient]\nuser_namespace = false\nprofile = "default"\n')
    base = fast_tmp()
    srv = Server(base, config=config)
    try:
        listed = srv.runtime.Status(pb.StatusRequest()).runtime_handlers
        # every handler runs kubelet's hostUsers: false pods in the ids kubelet chose
        handlers = {h.name: h.features.user_namespaces for h in listed}
        assert handlers == {"strict": True, "lenient": True, "": True}
    finally:
        assert srv.stop() == 0
        assert '"level": "info"' in srv.log.read_text()
        shutil.rmtree(base, ignore_errors=True)


def test_a_registry_mirror_is_asked_first_and_keeps_the_name(registries: Pair, tmp_path: Path) -> None:
    """mirrors: an image of registry.k8s.io (unreachable here) comes from the open registry the
    configuration names as its mirror, under its own name; a mirror that is down falls back to
    the registry itself (containerd's order)."""
    open_registry, _ = registries
    config = tmp_path / "stockade.toml"
    host = open_registry.host
    config.write_text(f'[stockade.registries]\ninsecure = ["{host}", "127.0.0.1:9"]\n'
                      f'mirrors = {{ "registry.k8s.io" = "{host}", "{host}" = "127.0.0.1:9" }}\n')
    base = fast_tmp()
    srv = Server(base, config=config)
    try:
        ref = pull(srv, "registry.k8s.io/test/app:v1")
        names = {n for i in srv.images.ListImages(pb.ListImagesRequest()).images for n in i.repo_tags}
        assert "registry.k8s.io/test/app:v1" in names and ref
        assert pull(srv, f"{open_registry.host}/test/named:v1")  # its mirror is down: the registry itself
    finally:
        assert srv.stop() == 0
        shutil.rmtree(base, ignore_errors=True)
