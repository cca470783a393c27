"""The image store with offline imports: multi-layer images (plain, gzip, zstd, whiteouts),
names, lookups, removal, garbage collection, and layouts that lie."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from images import PATH_ENV, concurrently, layer_tar, oci_archive
from kernel import needs_root, require  # noqa: F401 - needs_root: a fixture, used by name
from stockade.runtime.errors import SpecError
from stockade.runtime.images.archive import export_oci, import_archive
from stockade.runtime.images.store import Store

pytestmark = pytest.mark.usefixtures("needs_root")


BASE = layer_tar(("etc/os-release", b"ID=stockade-test\n"), ("app/old", b"old"), ("app/keep", b"keep"))
TOP = layer_tar(("app/.wh.old", b""), ("app/new", b"new"))
CONFIG = {"Env": [PATH_ENV, "GREETING=hi"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $GREETING"],
          "User": "1000:1000", "WorkingDir": "/app", "ExposedPorts": {"8080/tcp": {}}, "Labels": {"a": "b"}}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"))


def test_import_unpacks_each_layer_once_and_keeps_the_config(store: Store, tmp_path: Path) -> None:
    layers = [(BASE, "gzip"), (TOP, "zstd")]
    archive = oci_archive(tmp_path / "a.tar", "localhost/test/app:v1", layers, CONFIG)
    ((image, notes),) = import_archive(store, str(archive))
    assert notes == []
    assert image.repo_tags == ["localhost/test/app:v1"]
    assert image.repo_digests == [f"localhost/test/app@{image.manifest_digest}"]
    config = image.image_config()
    assert (config.entrypoint, config.cmd, config.user, config.workdir) == (
        ["/bin/sh", "-c"], ["echo $GREETING"], "1000:1000", "/app")
    assert config.exposed_ports == ["8080/tcp"] and config.labels == {"a": "b"}
    base, top = (Path(store.layer_dir(d)) for d in image.layers)
    assert (base / "etc/os-release").read_bytes() == b"ID=stockade-test\n"
    assert (top / "app/new").read_bytes() == b"new" and (top / "app/old").lstat().st_rdev == 0
    # a second image sharing the base layer: the layer is not unpacked again
    before = os.stat(base).st_ino
    other = oci_archive(tmp_path / "b.tar", "localhost/test/other", [(BASE, "gzip")], {"Cmd": ["true"]})
    import_archive(store, str(other))
    assert os.stat(store.layer_dir(image.layers[0])).st_ino == before
    names = {i.repo_tags[0] for i in store.images()}
    assert names == {"localhost/test/app:v1", "localhost/test/other:latest"}


def test_lookup_by_name_digest_and_id(store: Store, tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "a.tar", "docker.io/library/app:1", [(BASE, "")], CONFIG)
    ((image, _),) = import_archive(store, str(archive))
    for ref in ("app:1", "docker.io/library/app:1", f"app@{image.manifest_digest}", image.id, image.id[7:19]):
        assert store.get(ref).id == image.id, ref
    with pytest.raises(SpecError, match="no image 'app:2'"):
        store.get("app:2")


def test_index_platform_is_picked_and_a_missing_one_is_named(store: Store, tmp_path: Path) -> None:
    platforms = ("linux/arm64", "linux/amd64")
    ok = oci_archive(tmp_path / "i.tar", "localhost/multi", [(BASE, "")], CONFIG, platforms)
    ((image, _),) = import_archive(store, str(ok))
    assert image.repo_tags == ["localhost/multi:latest"]
    arm = oci_archive(tmp_path / "arm.tar", "localhost/arm", [(BASE, "")], CONFIG, ("linux/arm64",))
    with pytest.raises(SpecError, match="no image for linux/amd64") as err:
        import_archive(store, str(arm))
    assert "linux/arm64" in err.value.hint


def test_remove_untags_and_prune_collects_unreferenced_layers(store: Store, tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "a.tar", "localhost/a", [(BASE, ""), (TOP, "")], CONFIG)
    ((a, _),) = import_archive(store, str(archive))
    other = oci_archive(tmp_path / "b.tar", "localhost/b", [(BASE, "")], CONFIG)
    ((b, _),) = import_archive(store, str(other))
    store.remove("localhost/a")
    assert [i.id for i in store.images()] == [b.id]
    store.prune(in_use={a.layers[1]})  # a container still mounts the top layer
    assert os.path.isdir(store.layer_dir(a.layers[0])) and os.path.isdir(store.layer_dir(a.layers[1]))
    removed = store.prune()
    assert store.layer_dir(a.layers[1]) in removed and os.path.isdir(store.layer_dir(b.layers[0]))
    assert not os.path.exists(store.blob_path(a.manifest_digest))


def test_a_layout_that_lies_leaves_nothing(store: Store, tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "a.tar", "localhost/liar", [(BASE, "gzip")], CONFIG)
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    index = json.loads(members["index.json"])
    manifest = json.loads(members["blobs/sha256/" + index["manifests"][0]["digest"][7:]])
    layer = manifest["layers"][0]["digest"][7:]
    members["blobs/sha256/" + layer] = members["blobs/sha256/" + layer][:-40] + b"\0" * 40  # corrupt
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SpecError, match=f"blob sha256:{layer}"):
        import_archive(store, str(bad))
    assert store.images() == [] and os.listdir(Path(store.root) / "layers") == []
    blobs = os.listdir(Path(store.root) / "blobs/sha256")
    assert layer not in blobs and not [b for b in blobs if b.endswith(".tmp")]


def test_concurrent_imports_unpack_a_layer_once(store: Store, tmp_path: Path) -> None:
    archive = oci_archive(tmp_path / "a.tar", "localhost/race", [(BASE, "gzip"), (TOP, "")], CONFIG)
    errors = concurrently(lambda: import_archive(Store(store.root), str(archive)), 4)
    assert errors == []
    assert len(store.images()) == 1
    layers = [e for e in os.listdir(Path(store.root) / "layers") if not e.endswith(".lock")]
    assert len(layers) == 2  # no temporaries, no second copy


def test_the_image_command_line(tmp_path: Path) -> None:
    """`stockade image import/ls/inspect/rm/prune` over a store of the test's own."""
    stockade = [str(Path(sys.executable).parent / "stockade"), "image", "--store", str(tmp_path / "s")]
    archive = oci_archive(tmp_path / "a.tar", "localhost/cli/app:v1", [(BASE, "gzip")], CONFIG)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*stockade, *args], capture_output=True, text=True, timeout=60)

    done = run("import", str(archive))
    assert done.returncode == 0 and done.stdout.startswith("localhost/cli/app:v1 sha256:"), done.stderr
    assert "localhost/cli/app:v1" in run("ls").stdout
    assert json.loads(run("ls", "--json").stdout)[0]["repo_tags"] == ["localhost/cli/app:v1"]
    assert json.loads(run("inspect", "localhost/cli/app:v1").stdout)["config"]["user"] == "1000:1000"
    missing = run("inspect", "localhost/cli/app:v2")
    assert missing.returncode == 1 and "no image 'localhost/cli/app:v2'" in missing.stderr
    assert "deleted sha256:" in run("rm", "localhost/cli/app:v1").stdout
    assert run("prune").stdout.startswith("removed ")
    assert os.listdir(tmp_path / "s" / "layers") == []


def test_docker_archives_that_skopeo_writes_import(store: Store, tmp_path: Path) -> None:
    """`docker save`'s format, written by a real peer (skopeo's docker-archive transport)."""
    require(shutil.which("skopeo"), "skopeo (setup)")
    archive = oci_archive(tmp_path / "a.tar", "localhost/app", [(BASE, "gzip"), (TOP, "")], CONFIG)
    docker = tmp_path / "docker.tar"  # (docker archives have no zstd layers)
    done = subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}",
                           f"docker-archive:{docker}:localhost/dock/app:v2"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    ((image, _),) = import_archive(store, str(docker))
    assert image.repo_tags == ["localhost/dock/app:v2"]
    assert image.image_config().cmd == ["echo $GREETING"]
    top = Path(store.layer_dir(image.layers[1]))
    assert (top / "app/new").read_bytes() == b"new" and (top / "app/old").lstat().st_rdev == 0
    ((again, _),) = import_archive(store, str(docker), name="localhost/renamed:1")
    assert again.id == image.id and "localhost/renamed:1" in store.get(image.id).repo_tags


def test_export_writes_a_layout_peers_read_and_that_imports_back(store: Store, tmp_path: Path) -> None:
    require(shutil.which("skopeo") and shutil.which("umoci"), "skopeo and umoci (setup)")
    archive = oci_archive(tmp_path / "a.tar", "localhost/exp/app:v1", [(BASE, "gzip"), (TOP, "")], CONFIG)
    ((image, _),) = import_archive(store, str(archive))  # (Debian's umoci reads no zstd layers)
    export_oci(store, "localhost/exp/app:v1", str(tmp_path / "out.tar"))
    export_oci(store, "localhost/exp/app:v1", str(tmp_path / "out"))
    seen = subprocess.run(["skopeo", "inspect", "--config", f"oci-archive:{tmp_path / 'out.tar'}"],
                          capture_output=True, text=True, timeout=60)
    assert seen.returncode == 0 and json.loads(seen.stdout)["config"]["User"] == "1000:1000", seen.stderr
    unpacked = subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{tmp_path / 'out'}:v1",
                               str(tmp_path / "bundle")], capture_output=True, text=True, timeout=60)
    assert unpacked.returncode == 0, unpacked.stderr
    assert (tmp_path / "bundle/rootfs/app/new").read_bytes() == b"new"
    assert not (tmp_path / "bundle/rootfs/app/old").exists()
    other = Store(str(tmp_path / "other"))
    for path in (tmp_path / "out.tar", tmp_path / "out"):
        ((back, _),) = import_archive(other, str(path))
        assert (back.id, back.repo_tags) == (image.id, ["localhost/exp/app:v1"])


@pytest.mark.parametrize("what", ["not-an-archive", "empty-manifest", "escape", "garbage-json"])
def test_bad_archives_are_named_and_leave_nothing(store: Store, tmp_path: Path, what: str) -> None:
    path = tmp_path / "bad.tar"
    members = {
        "not-an-archive": {"hello.txt": b"hi"},
        "empty-manifest": {"manifest.json": b"[]"},
        "escape": {"manifest.json": json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()},
        "garbage-json": {"manifest.json": b"{not json"},
    }[what]
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SpecError) as err:
        import_archive(store, str(path))
    assert str(path) in str(err.value)
    assert store.images() == [] and os.listdir(Path(store.root) / "blobs/sha256") == []


@pytest.mark.parametrize("full", ["blob", "unpack"])
def test_a_full_disk_is_reported_and_leaves_nothing(tmp_path: Path, full: str) -> None:
    """The store on a 1 MiB tmpfs in a mount namespace of the test's own: the import fails with
    ENOSPC named, and nothing half-written stays. A random layer fills the disk as a blob; a
    gzipped layer of zeros fits, and fills it when unpacked."""
    big = layer_tar(("big", os.urandom(3 << 20) if full == "blob" else bytes(3 << 20)))
    archive = oci_archive(tmp_path / "big.tar", "localhost/big", [(big, "" if full == "blob" else "gzip")],
                          CONFIG)
    stockade = str(Path(sys.executable).parent / "stockade")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && "
              f"{stockade} image --store {disk}/s import {archive}; echo rc=$?; "
              f"find {disk}/s -type f -o -type d -path '*/layers/*'")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert "rc=1" in done.stdout and "No space left on device" in done.stderr, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and ("blob sha256:" in done.stderr or "/layers/" in done.stderr)
    left = [line for line in done.stdout.splitlines()[1:] if "/images/" in line or line.endswith(".tmp")
            or "/layers/" in line and not line.endswith(".lock")]
    assert left == [], left
