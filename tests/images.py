"""OCI image archives for tests that drive real engines without a registry: a busybox root
filesystem (bundles.make_rootfs) with catatonit as the pod's pause process, packed as an OCI
image layout tar that `ctr images import` reads."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from bundles import make_rootfs

CATATONIT = shutil.which("catatonit") or "/usr/bin/catatonit"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def busybox_image(archive: Path, name: str) -> Path:
    """ARCHIVE: an image NAME with busybox in /bin and catatonit at /pause; its entrypoint
    `/pause -P` waits for a signal (the pod sandbox's pause process; containers give a command)."""
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = make_rootfs(Path(tmp) / "rootfs")
        shutil.copy2(CATATONIT, rootfs / "pause")
        layer = _tar_of(rootfs)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [PATH_ENV], "Entrypoint": ["/pause", "-P"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
    }
    blobs: dict[str, bytes] = {}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": _add(blobs, _json(config), "application/vnd.oci.image.config.v1+json"),
        "layers": [_add(blobs, layer, "application/vnd.oci.image.layer.v1.tar")],
    }
    entry = _add(blobs, _json(manifest), manifest["mediaType"])
    entry["annotations"] = {"io.containerd.image.name": name}
    index = {"schemaVersion": 2, "manifests": [entry]}
    files = {"oci-layout": _json({"imageLayoutVersion": "1.0.0"}), "index.json": _json(index)}
    files.update({f"blobs/sha256/{d.split(':')[1]}": data for d, data in blobs.items()})
    with tarfile.open(archive, "w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def _tar_of(rootfs: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False)
    return buf.getvalue()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict:
    blobs[_digest(data)] = data
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}
