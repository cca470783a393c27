"""A container's root filesystem made from an image: the image's layers, read-only and seen with
the container's id maps, under an overlayfs whose upper and work directories are the container's.

    <store>/containers/<key>/   key: 16 hex of sha256(container id), short so that the overlay's
                                options (one page) hold many layers
        id                      the container id
        layers                  the diff ids it is made of: `Store.prune` keeps them
        upper/ work/            the container's writes, removed with it
        l/<n>                   layer n's idmapped view, attached only until the overlay holds it
        root/                   the overlay: the container's rootfs

Layers are unpacked once, owned by the ids the image names (0 for root), and shared by every
container of every tenant. A container whose root is mapped to host id 100000 sees them through
an idmapped mount of each layer (Linux 5.12+, under overlayfs 5.19+): on-disk 0 shows as 100000,
so the container's root owns the image's files without a chown per container, and copy-up writes
them into its upper directory already owned by its own ids.
"""

from __future__ import annotations

import errno
import os

from .._lite.hashlib import sha256
from ..errors import StockadeError
from ..idmap import userns_fd
from ..mountinfo import read as read_mounts
from ..state import remove_tree
from ..syscalls import MNT_DETACH, MS_NODEV, idmapped_tree, mount, move_mount, umount2

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..spec import IDMapping
    from .store import Image, Store

PAGE = 4096  # mount(2) copies at most one page of options


def container_dir(store: Store, cid: str) -> str:
    return os.path.join(store.root, "containers", sha256(cid.encode()).hexdigest()[:16])


def mount_root(
    store: Store,
    image: Image,
    cid: str,
    uid_maps: list[IDMapping] | None = None,
    gid_maps: list[IDMapping] | None = None,
) -> str:
    """Mount CID's root filesystem over IMAGE's layers; returns its path. With id maps, the
    layers are seen through them and the container's root owns the upper directory."""
    base = container_dir(store, cid)
    if uid_maps:
        _check_reachable(os.path.dirname(base))
    try:
        os.mkdir(base, 0o711)  # the container's init passes through it as a mapped user
        os.chmod(base, 0o711)  # whatever the umask
    except FileExistsError:
        raise StockadeError(f"container {cid} already has a root filesystem", where=base,
                            hint="delete that container first, or choose another name") from None
    try:
        with store.adding():  # prune waits until the layers this root uses are recorded
            return _mount(store, image, cid, base, uid_maps or [], gid_maps or [])
    except BaseException:
        unmount_root(store, cid)
        raise


def unmount_root(store: Store, cid: str) -> None:
    """Unmount CID's root filesystem and remove its directory with the container's writes.
    Nothing is removed while anything is still mounted below it (that could reach the layers)."""
    base = container_dir(store, cid)
    if not os.path.isdir(base):
        return
    for point in _mounts_below(base):
        try:
            umount2(point, MNT_DETACH)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOENT):
                raise
    left = _mounts_below(base)
    if left:
        raise StockadeError(f"{left[0]} is still mounted", where=base, hint="unmount it, then retry")
    remove_tree(base)


def _mount(store: Store, image: Image, cid: str, base: str, uid_maps: list[IDMapping],
           gid_maps: list[IDMapping]) -> str:
    with open(os.path.join(base, "id"), "w") as f:
        f.write(cid)
    with open(os.path.join(base, "layers"), "w") as f:
        f.write("".join(f"{d}\n" for d in image.layers))
    upper, work, root = (os.path.join(base, d) for d in ("upper", "work", "root"))
    for d in (upper, work, root):
        os.mkdir(d, 0o755)
    lowers = [store.layer_dir(d) for d in reversed(image.layers)]  # overlay wants the top first
    for path in lowers:
        if not os.path.isdir(path):
            raise StockadeError(f"layer {os.path.basename(path)} of {image.id} is not unpacked",
                                where=store.root, hint="pull or import the image again")
    if not lowers:  # an image without layers: an empty lower directory
        lowers = [os.path.join(base, "l")]
        os.mkdir(lowers[0], 0o755)
    elif uid_maps:
        lowers = _idmapped(lowers, base, uid_maps, gid_maps)
        os.chown(upper, _host_id(uid_maps), _host_id(gid_maps))
    data = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}"
    if len(data) >= PAGE:
        raise StockadeError(f"{len(image.layers)} layers are too many for one overlay mount",
                            where=image.id, hint="flatten the image")
    try:
        mount("overlay", root, "overlay", MS_NODEV, data)
    except OSError as exc:
        raise StockadeError(f"cannot mount the overlay root filesystem: {exc.strerror}", where=root,
                            hint="the store must be on a filesystem overlayfs accepts as upper "
                            "(ext4, xfs, tmpfs)") from None
    _detach_layer_views(base)
    return root


def _idmapped(layers: list[str], base: str, uid_maps: list[IDMapping],
              gid_maps: list[IDMapping]) -> list[str]:
    """Attach an idmapped view of each layer under BASE/l; the overlay takes its own reference
    to each, so the views are detached again once it is mounted."""
    os.mkdir(os.path.join(base, "l"), 0o700)
    ns = userns_fd(uid_maps, gid_maps)
    views = []
    try:
        for n, layer in enumerate(layers):
            view = os.path.join(base, "l", str(n))
            os.mkdir(view, 0o755)
            try:
                fd = idmapped_tree(layer, ns)
            except OSError as exc:
                raise StockadeError(f"cannot make an idmapped view of a layer: {exc.strerror}",
                                    where=layer, hint="idmapped mounts need Linux 5.12+ and a "
                                    "filesystem that supports them (ext4, xfs, btrfs, tmpfs 6.3+)") from None
            try:
                move_mount(fd, view)
            finally:
                os.close(fd)
            views.append(view)
    finally:
        os.close(ns)
    return views


def _detach_layer_views(base: str) -> None:
    views = os.path.join(base, "l")
    if not os.path.isdir(views):
        return
    for name in os.listdir(views):
        view = os.path.join(views, name)
        umount2(view, MNT_DETACH)  # a view of the same filesystem: os.path.ismount cannot tell
        os.rmdir(view)


def _check_reachable(path: str) -> None:
    """The container's init, root only in its user namespace, opens its root filesystem by path
    (as runc's does): every directory above must let others search it."""
    path = os.path.realpath(path)
    while True:
        if os.stat(path).st_mode & 0o001 == 0:
            raise StockadeError(f"{path} is not searchable by others, so a container's root filesystem "
                                "in the image store below it cannot be reached by the container's root",
                                where="image store", hint=f"chmod o+x {path}, or move the store")
        if path == "/":
            return
        path = os.path.dirname(path)


def _host_id(maps: list[IDMapping]) -> int:
    """The host id the container's id 0 maps to."""
    for m in maps:
        if m.container_id == 0:
            return m.host_id
    raise StockadeError("the id maps do not map root (container id 0)", where="linux.uidMappings")


def _mounts_below(base: str) -> list[str]:
    """Mount points at or under BASE, deepest first."""
    prefix = os.path.realpath(base) + "/"
    return sorted((m.point for m in read_mounts() if m.point.startswith(prefix)), key=len, reverse=True)
