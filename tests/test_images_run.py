"""`stockade run --image`: the image's layers under an overlay of the container's own, seen with
its id maps; entrypoint, cmd, env, user and workdir from the image config as podman fills them;
--pull from a real registry; nothing left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundles import make_rootfs
from images import PATH_ENV, Registry, layer_tar, oci_archive, tar_of
from kernel import needs_root, require  # noqa: F401 - needs_root: a fixture, used by name
from leftovers import new_since, snapshot
from stockade.runtime.images.archive import import_archive
from stockade.runtime.images.store import Store

pytestmark = pytest.mark.usefixtures("needs_root")

STOCKADE = str(Path(sys.executable).parent / "stockade")
CONFIG = {
    "Env": [PATH_ENV, "GREETING=hello"],
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ['echo "$GREETING from $(id -u):$(id -g) groups $(id -G) in $(pwd) home $HOME"'],
    "User": "app",
    "WorkingDir": "/srv/app",
}


def _layers(tmp: Path) -> list[tuple[bytes, str]]:
    base = make_rootfs(tmp / "base")
    (base / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (base / "etc/group").write_text("root:x:0:\napp:x:1000:\nstaff:x:50:app\n")
    (base / "etc/gone").write_text("whited out by the top layer\n")
    top = layer_tar(("srv/app/data", b"from the image\n"), ("etc/.wh.gone", b""))
    return [(tar_of(base), "gzip"), (top, "zstd")]


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("image")
    return oci_archive(tmp / "app.tar", "localhost/test/app:v1", _layers(tmp), CONFIG)


@pytest.fixture
def store_dir() -> Iterator[Path]:
    """A store whose parents others may search (the container's init reaches its root through
    them as an unprivileged host id); pytest's own temporary directories are 0700."""
    path = Path(tempfile.mkdtemp(prefix="stockade-test-store-", dir="/var/tmp"))
    path.chmod(0o711)
    before = snapshot()
    try:
        yield path
        assert new_since(before) == {}
        assert list((path / "containers").iterdir()) == []
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store(store_dir: Path, image_archive: Path) -> Store:
    store = Store(str(store_dir))
    import_archive(store, str(image_archive))
    return store


def run(store: Store, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([STOCKADE, "run", "--allow-degraded", "--image-store", store.root, *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_runs_the_images_entrypoint_and_cmd_as_its_user(store: Store) -> None:
    done = run(store, "--image", "localhost/test/app:v1")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "hello from 1000:1000 groups 1000 50 in /srv/app home /home/app\n"


def test_a_command_replaces_cmd_and_flags_override_the_config(store: Store) -> None:
    done = run(store, "--image", "localhost/test/app:v1", "-u", "0", "-w", "/", "-e", "GREETING=hi", "--",
               'echo "$GREETING $(id -u) $(pwd)"')
    assert (done.returncode, done.stdout) == (0, "hi 0 /\n"), done.stderr
    done = run(store, "--image", "localhost/test/app:v1", "--entrypoint", "/bin/cat", "--", "/srv/app/data")
    assert (done.returncode, done.stdout) == (0, "from the image\n"), done.stderr
    done = run(store, "--image", "localhost/test/app:v1", "--entrypoint", '["/bin/sh", "-c", "exit 7"]')
    assert done.returncode == 7, done.stderr


def test_layers_are_owned_by_the_containers_root_and_writes_stay_in_its_upper(store: Store) -> None:
    image = store.get("localhost/test/app:v1")
    script = ("stat -c '%u %g' / /bin/busybox /srv/app/data; test ! -e /etc/gone && echo gone; "
              "echo changed > /srv/app/data && rm /bin/ls && touch /new && echo wrote")
    done = run(store, "--image", "localhost/test/app:v1", "-u", "0", "--", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0 0\n0 0\n0 0\ngone\nwrote\n"
    base, top = (Path(store.layer_dir(d)) for d in image.layers)
    assert (top / "srv/app/data").read_text() == "from the image\n"
    assert (base / "bin/ls").is_symlink() and (base / "bin/busybox").stat().st_uid == 0
    again = run(store, "--image", "localhost/test/app:v1", "--", "cat /srv/app/data; ls /new 2>&1")
    assert again.stdout.startswith("from the image\n") and "No such file" in again.stdout


def test_a_symlinked_passwd_resolves_inside_the_image(store_dir: Path, tmp_path: Path) -> None:
    """A hostile image's /etc/passwd pointing out of it must not read the host's."""
    rootfs = make_rootfs(tmp_path / "evil")
    (rootfs / "etc/passwd").unlink()
    os.symlink("../../../../../../../etc/passwd", rootfs / "etc/passwd")
    archive = oci_archive(tmp_path / "evil.tar", "localhost/test/evil", [(tar_of(rootfs), "")],
                          {"Env": [PATH_ENV], "Cmd": ["id"], "User": "_apt"})
    store = Store(str(store_dir))
    import_archive(store, str(archive))
    require("_apt:" in Path("/etc/passwd").read_text(), "a host user the image lacks (_apt)")
    done = run(store, "--image", "localhost/test/evil")
    assert done.returncode == 1
    assert "user '_apt' is not in the image's /etc/passwd" in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--image", "localhost/test/none", "--pull", "never"], "'localhost/test/none' is not in the store"),
    (["--image", "localhost/test/app:v1", "-u", "nobody"], "user 'nobody' is not in the image's"),
    (["--image", "localhost/test/app:v1", "-u", "app:wheel"], "group 'wheel' is not in the image's"),
    (["--image", "localhost/test/app:v1", "--entrypoint", "[1]"], "not a JSON array of strings"),
    (["--image", "localhost/test/app:v1", "--rootfs", "/"], "not allowed with argument --image"),
])
def test_bad_input_is_refused_clearly_and_leaves_nothing(store: Store, args: list[str], message: str) -> None:
    done = run(store, *args)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_an_image_without_entrypoint_or_cmd_needs_a_command(store_dir: Path, tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path / "plain")
    archive = oci_archive(tmp_path / "plain.tar", "localhost/test/plain", [(tar_of(rootfs), "")],
                          {"Env": [PATH_ENV]})
    store = Store(str(store_dir))
    import_archive(store, str(archive))
    done = run(store, "--image", "localhost/test/plain")
    assert done.returncode == 1 and "has no entrypoint or command" in done.stderr
    assert run(store, "--image", "localhost/test/plain", "--", "true").returncode == 0


def test_layers_in_use_survive_rm_and_prune_and_writes_are_the_mapped_roots(store: Store) -> None:
    image = store.get("localhost/test/app:v1")
    proc = subprocess.Popen([STOCKADE, "run", "--allow-degraded", "--image-store", store.root, "--image",
                             "localhost/test/app:v1", "-u", "0", "--", "touch /started; sleep 60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        containers = Path(store.root, "containers")
        _wait_for(lambda: any((c / "upper/started").exists() for c in containers.iterdir()))
        (started,) = containers.glob("*/upper/started")
        assert (started.stat().st_uid, started.stat().st_gid) == (100000, 100000)  # not the host's root
        store.remove("localhost/test/app:v1")
        store.prune()
        assert all(Path(store.layer_dir(d)).is_dir() for d in image.layers)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert list(Path(store.root, "containers").iterdir()) == []
    store.prune()
    assert not any(Path(store.layer_dir(d)).exists() for d in image.layers)


def test_pull_missing_always_and_never(store_dir: Path, image_archive: Path, tmp_path: Path) -> None:
    require(shutil.which("docker-registry") and shutil.which("skopeo"), "docker-registry and skopeo (setup)")
    registry = Registry(tmp_path)
    try:
        registry.push(image_archive, "test/app:v1")
        store = Store(str(store_dir))
        ref = f"{registry.host}/test/app:v1"
        pulled = ["--insecure-registry", registry.host, "--image", ref]
        assert run(store, "--pull", "never", *pulled[2:]).returncode == 1
        done = run(store, *pulled)  # missing: pulled first
        assert done.returncode == 0 and done.stdout.startswith("hello from 1000:1000"), done.stderr
        gets = len(registry.blob_gets())
        assert run(store, *pulled).returncode == 0 and len(registry.blob_gets()) == gets
        assert run(store, "--pull", "always", *pulled).returncode == 0
        manifests = registry.log.read_text().count("GET /v2/test/app/manifests/v1")
        assert manifests == 2 and len(registry.blob_gets()) == gets  # asked again, nothing refetched
    finally:
        registry.stop()


def _wait_for(condition, timeout: float = 30) -> None:  # noqa: ANN001 - a callable
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_root_filesystem_made_by_a_multithreaded_process(store: Store) -> None:
    """A server has other threads; a forked child of it may not unshare a user namespace, so the
    idmapped views come from a fresh process there: the result is the same."""
    import threading

    from stockade.runtime.images.rootfs import mount_root, unmount_root
    from stockade.runtime.spec import IDMapping

    image = store.get("localhost/test/app:v1")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        maps = [IDMapping(container_id=0, host_id=200000, size=65536)]
        root = Path(mount_root(store, image, "threaded", maps, maps))
        try:
            st = (root / "bin/busybox").stat()
            assert (st.st_uid, st.st_gid) == (200000, 200000)
            assert (root / "srv/app/data").stat().st_uid == 200000  # 0 in the layer
        finally:
            unmount_root(store, "threaded")
    finally:
        stop.set()
        other.join()
