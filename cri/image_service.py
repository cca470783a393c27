"""CRI ImageService over the image library (stockade.runtime.images): pull, status, list, remove,
filesystem usage. An image's CRI id is its config digest: the same string PullImage returns as
image_ref and ContainerStatus reports as image_id."""

from __future__ import annotations

import base64
import os
import threading
import time

from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc
from stockade.runtime.images.reference import parse
from stockade.runtime.images.registry import Client, pull
from stockade.runtime.images.store import Image, Store

from .errors import invalid, log, rpc

TYPE_CHECKING = False
if TYPE_CHECKING:
    import grpc

    from .config import Config

USAGE_TTL = 10.0  # seconds a filesystem walk is reused: kubelet asks every few seconds


class ImageService(pb_grpc.ImageServiceServicer):
    def __init__(self, config: Config, store: Store) -> None:
        self.config, self.store = config, store
        self._usage: tuple[float, int, int] = (0.0, 0, 0)
        self._usage_lock = threading.Lock()

    @rpc
    def PullImage(self, request: pb.PullImageRequest, context: grpc.ServicerContext
                  ) -> pb.PullImageResponse:
        ref = _ref(request.image)
        remaining = context.time_remaining()
        deadline = min(3600.0, remaining) if remaining is not None else 3600.0
        client = Client(insecure=set(self.config.insecure_registries), timeout=min(30.0, deadline),
                        deadline=deadline, mirrors=self.config.registry_mirrors, **_auth(request.auth, ref))
        try:
            image, notes = pull(self.store, ref, client)
        finally:
            client.close()
        for note in notes:
            log.info("pull %s: %s", ref, note)
        log.info("pulled %s as %s", ref, image.id)
        return pb.PullImageResponse(image_ref=image.id)

    @rpc
    def ImageStatus(self, request: pb.ImageStatusRequest, context: grpc.ServicerContext
                  ) -> pb.ImageStatusResponse:
        image = self.store.find(_ref(request.image))
        if image is None:
            return pb.ImageStatusResponse()  # absent is not an error: kubelet then pulls
        info = {"info": _verbose(image)} if request.verbose else {}
        return pb.ImageStatusResponse(image=_message(image), **info)

    @rpc
    def ListImages(self, request: pb.ListImagesRequest, context: grpc.ServicerContext
                  ) -> pb.ListImagesResponse:
        wanted = request.filter.image.image if request.HasField("filter") else ""
        if wanted:
            image = self.store.find(wanted)
            return pb.ListImagesResponse(images=[_message(image)] if image else [])
        return pb.ListImagesResponse(images=[_message(i) for i in self.store.images()])

    @rpc
    def RemoveImage(self, request: pb.RemoveImageRequest, context: grpc.ServicerContext
                  ) -> pb.RemoveImageResponse:
        image = self.store.find(_ref(request.image))
        if image is not None:  # an image that is not there is removed already
            self.store.remove(image.id)  # by id: every name goes
            self.store.prune()  # its layers, unless a container still uses them
            log.info("removed image %s", image.id)
        return pb.RemoveImageResponse()

    @rpc
    def ImageFsInfo(self, request: pb.ImageFsInfoRequest, context: grpc.ServicerContext
                  ) -> pb.ImageFsInfoResponse:
        used, inodes = self._walk()
        usage = pb.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=pb.FilesystemIdentifier(mountpoint=self.store.root),
            used_bytes=pb.UInt64Value(value=used),
            inodes_used=pb.UInt64Value(value=inodes),
        )
        return pb.ImageFsInfoResponse(image_filesystems=[usage])

    def _walk(self) -> tuple[int, int]:
        """Bytes and inodes under the store (blocks, as du counts them), cached for USAGE_TTL."""
        with self._usage_lock:
            when, used, inodes = self._usage
            if time.monotonic() - when < USAGE_TTL:
                return used, inodes
            used = inodes = 0
            for top, dirs, files in os.walk(self.store.root):
                for name in dirs + files:
                    try:
                        st = os.lstat(os.path.join(top, name))
                    except OSError:
                        continue
                    used += st.st_blocks * 512
                    inodes += 1
            self._usage = (time.monotonic(), used, inodes)
            return used, inodes


def _ref(spec: pb.ImageSpec) -> str:
    if not spec.image:
        raise invalid("no image named", where="image.image", hint="e.g. docker.io/library/busybox:latest")
    return spec.image


def _auth(auth: pb.AuthConfig, ref: str) -> dict:
    """Client arguments from the request's credentials for the image's registry."""
    host = auth.server_address or parse(ref).domain
    user, password = auth.username, auth.password
    if auth.auth and not user:
        try:
            user, _, password = base64.b64decode(auth.auth).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise invalid("auth is not base64 of user:password", where="auth.auth") from None
    out: dict = {}
    if user:
        out["credentials"] = {host: (user, password)}
    if auth.registry_token:
        out["registry_tokens"] = {host: auth.registry_token}
    return out


def _message(image: Image) -> pb.Image:
    uid, username = _user(image.image_config().user)
    return pb.Image(
        id=image.id,
        repo_tags=image.repo_tags,
        repo_digests=image.repo_digests,
        size=image.size,
        spec=pb.ImageSpec(image=image.id),
        username=username,
        **({"uid": pb.Int64Value(value=uid)} if uid is not None else {}),
    )


def _user(user: str) -> tuple[int | None, str]:
    """The image config's user as kubelet wants it: a uid when it is a number, else a name
    (kubelet's runAsNonRoot check reads these)."""
    name = user.partition(":")[0]
    if not name:
        return 0, ""
    return (int(name), "") if name.isdigit() else (None, name)


def _verbose(image: Image) -> dict[str, str]:
    from stockade.runtime._lite import json
    from stockade.runtime._lite.dataclasses import asdict

    return {"info": json.dumps(asdict(image))}
