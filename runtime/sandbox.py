"""The sandbox `stockade run` gives a command, as a library: options in, an OCI spec out.

`prepare` turns SandboxOptions into a parsed spec and a root filesystem; the caller creates the
container with them (`stockade run`, the profile recorder, the CRI server, tests). The sandbox:
a user namespace whose root maps to an unprivileged host range, every other namespace new, the
host's /usr read-only, a minimal /etc, fresh /proc and /dev, a private /tmp, no network, the
profile's seccomp filter and BPF policy, and a cgroup slice per tenant with the asked limits.
Profiles are resolved by the caller (the profile package sits above this one).
"""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

from ._lite.contextlib import suppress
from ._lite.dataclasses import dataclass, field
from ._lite.hashlib import sha256
from .defaults import MASKED_PATHS, OCI_DEFAULT_CAPS, READONLY_PATHS, standard_mounts
from .errors import StockadeError
from .state import remove_tree

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

    from .spec import Spec

IDMAP_BASE = 100000  # first host id of the default tenant's range
IDMAP_SIZE = 65536
TENANT_SLOTS = 4096  # other tenants get their own 65536-id range above the default one
DEFAULT_PIDS = 1024
# What an ordinary workload needs; the rest of the bounding set is dropped (runc's default, minus
# NET_RAW and MKNOD: untrusted code needs neither raw sockets nor device nodes).
DEFAULT_CAPS = [c for c in OCI_DEFAULT_CAPS if c not in ("CAP_MKNOD", "CAP_NET_RAW")]
HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")  # shared read-only (or symlinks)
HOST_ETC = ("alternatives", "ld.so.cache", "localtime")  # harmless host /etc entries programs look for


@dataclass
class SandboxOptions:
    """What a sandbox is made of; `stockade run`'s flags of the same names fill it."""

    profile: str = "restricted"  # its name, recorded in the container's annotations
    seccomp: dict | None = None  # the profile's OCI seccomp section (None: no filter)
    bpf_policy: str | None = None  # the profile's BPF policy name
    tenant: str = "default"
    memory: str | None = None
    cpus: str | None = None
    pids: str | int = DEFAULT_PIDS
    net: str = "none"
    rootfs: str | None = None
    bundle: str | None = None
    bind: list[str] = field(default_factory=list)  # SRC:DST[:ro]
    env: list[str] = field(default_factory=list)  # K=V
    workdir: str = ""  # "": the image's, else /
    user: str = ""  # "": the image's, else 0:0 (names only with an image: its /etc/passwd)
    idmap: str | None = None  # HOSTID:SIZE
    tty: bool = False
    image: str | None = None  # a name, digest or id in the image store: its overlay is the root
    image_store: str | None = None  # the store's directory (default: images.store's)
    entrypoint: list[str] | None = None  # in place of the image's ([]: none, the command alone)


@contextlib.contextmanager
def prepare(
    opts: SandboxOptions, command: list[str], cid: str, edit: Callable[[dict], None] | None = None
) -> Iterator[tuple[Spec, Path, Path]]:
    """(spec, bundle, rootfs) for COMMAND in the sandbox OPTS describe; EDIT may change the OCI
    config first (the recorder swaps the filter). The root filesystem (built-in, or an image's
    overlay) lives until exit."""
    from . import spec as specmod

    if not command and not opts.image:
        raise StockadeError("no command to run", hint="stockade run [OPTIONS] -- CMD [ARGS...]")
    with root_filesystem(opts, cid) as (bundle, rootfs, image):
        config = build_config(opts, command, cid, _Workload.of(opts, command, image, rootfs))
        if edit is not None:
            edit(config)
        if opts.bundle:
            config = _merge_bundle(Path(opts.bundle), config)
        config["root"]["path"] = str(rootfs)
        spec = specmod.parse_spec(config, where="stockade run")
        spec.raw = config
        yield spec, bundle, rootfs


@dataclass
class _Workload:
    """The process's command, ids, base environment and directory: from the options, filled in
    from the image config where they say nothing (as podman does)."""

    args: list[str]
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # before the defaults and --env
    cwd: str = "/"
    home: str = ""

    @classmethod
    def of(cls, opts: SandboxOptions, command: list[str], image: Any, rootfs: Path) -> _Workload:
        if image is None:
            uid, gid = _user(opts.user or "0:0")
            return cls(args=command, uid=uid, gid=gid, cwd=opts.workdir or "/")
        from .images.passwd import resolve

        cfg = image.image_config()
        entrypoint = cfg.entrypoint if opts.entrypoint is None else opts.entrypoint
        # podman: a new entrypoint drops the image's cmd too; a command replaces the cmd
        args = entrypoint + (command or (cfg.cmd if opts.entrypoint is None else []))
        if not args:
            raise StockadeError(f"image {opts.image} has no entrypoint or command", where="--image",
                                hint="give one: stockade run --image REF -- CMD [ARGS...]")
        where = "--user" if opts.user else "image User"
        user = resolve(str(rootfs), opts.user or cfg.user or "0", where=where)
        if not (0 <= user.uid < IDMAP_SIZE and 0 <= user.gid < IDMAP_SIZE):
            raise StockadeError(f"user {user.uid}:{user.gid}: ids must be below {IDMAP_SIZE} (the mapped "
                                "range)", where=where)
        return cls(args=args, uid=user.uid, gid=user.gid, additional_gids=user.additional_gids,
                   env=list(cfg.env), cwd=opts.workdir or cfg.workdir or "/", home=user.home)


def build_config(opts: SandboxOptions, command: list[str], cid: str, work: _Workload | None = None
                 ) -> dict[str, Any]:
    work = work or _Workload.of(opts, command, None, Path("/"))
    host_base, size = _idmap(opts)
    if opts.net != "none":
        raise StockadeError(
            f"--net {opts.net} is not available",
            where="--net",
            hint="use --net none; per-tenant zero-trust networking arrives with the CRI front-end",
        )
    config: dict[str, Any] = {
        "ociVersion": "1.2.0",
        "process": _process(opts, work),
        "root": {"path": "rootfs", "readonly": not opts.image},  # an image's root has its own upper
        "hostname": cid[:63],
        "mounts": _mounts(opts),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")],
            "uidMappings": [{"containerID": 0, "hostID": host_base, "size": size}],
            "gidMappings": [{"containerID": 0, "hostID": host_base, "size": size}],
            "resources": _resources(opts),
            "cgroupsPath": f"{_cgroup_parent()}/{_tenant(opts.tenant)}/{cid}",
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
        "annotations": {"io.stockade.tenant": opts.tenant, "io.stockade.profile": opts.profile},
    }
    if opts.image:
        config["annotations"]["io.stockade.image"] = opts.image
    if opts.seccomp is not None:
        config["linux"]["seccomp"] = opts.seccomp
    if opts.bpf_policy:
        config["annotations"]["io.stockade.bpf-policy"] = opts.bpf_policy
    return config


def _process(opts: SandboxOptions, work: _Workload) -> dict[str, Any]:
    env = _environment(work.env, [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"HOME={work.home or ('/root' if work.uid == 0 else '/tmp')}",
        *([] if opts.image else ["LANG=C.UTF-8"]),
        f"TERM={os.environ.get('TERM', 'xterm')}",
        "container=stockade",  # as podman sets container=podman: what detection tools read
    ])
    for item in opts.env:
        if "=" not in item or item.startswith("="):
            raise StockadeError(f"--env {item!r} is not KEY=VALUE", where="--env")
    env = _environment(env, opts.env, override=True)
    uid, gid = work.uid, work.gid
    nofile = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    caps = DEFAULT_CAPS if uid == 0 else []
    process: dict[str, Any] = {
        "terminal": bool(opts.tty),
        "user": {"uid": uid, "gid": gid, **({"additionalGids": work.additional_gids}
                                            if work.additional_gids else {})},
        "args": work.args,
        "env": env,
        "cwd": work.cwd,
        "capabilities": {"bounding": DEFAULT_CAPS, "effective": caps, "permitted": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        "noNewPrivileges": True,
    }
    if opts.tty:
        from .terminal import size_of

        size = size_of(0) or size_of(1)
        if size:
            process["consoleSize"] = {"height": size[0], "width": size[1]}
    return process


def _environment(env: list[str], more: list[str], override: bool = False) -> list[str]:
    """ENV with MORE's KEY=VALUE added: where a key is in both, MORE's wins only with OVERRIDE."""
    out = {item.partition("=")[0]: item for item in env}
    for item in more:
        key = item.partition("=")[0]
        if override or key not in out:
            out[key] = item
    return list(out.values())


def _user(text: str) -> tuple[int, int]:
    uid_text, _, gid_text = text.partition(":")
    try:
        uid = int(uid_text)
        gid = int(gid_text) if gid_text else uid
    except ValueError:
        raise StockadeError(
            f"--user {text!r}: expected numeric UID[:GID]",
            where="--user",
            hint="e.g. --user 1000:1000 (the built-in root filesystem has no user names)",
        ) from None
    if not (0 <= uid < IDMAP_SIZE and 0 <= gid < IDMAP_SIZE):
        raise StockadeError(
            f"--user {text!r}: ids must be below {IDMAP_SIZE} (the mapped range)", where="--user"
        )
    return uid, gid


def _idmap(opts: SandboxOptions) -> tuple[int, int]:
    if opts.idmap:
        host, _, size = opts.idmap.partition(":")
        try:
            base, count = int(host), int(size or IDMAP_SIZE)
        except ValueError:
            raise StockadeError(f"--idmap {opts.idmap!r}: expected HOSTID:SIZE", where="--idmap") from None
        if base < 1000 or count < 1:
            raise StockadeError("--idmap must map to unprivileged host ids (>= 1000)", where="--idmap")
        return base, count
    return tenant_range(opts.tenant)


def tenant_range(tenant: str) -> tuple[int, int]:
    """(first host id, size) of TENANT's id range: stable and distinct per tenant, so that root of
    one tenant is nobody to another (the CRI server gives each Kubernetes namespace its own)."""
    if tenant == "default":
        return IDMAP_BASE, IDMAP_SIZE
    slot = 1 + int.from_bytes(sha256(tenant.encode()).digest()[:4], "big") % TENANT_SLOTS
    return IDMAP_BASE + slot * IDMAP_SIZE, IDMAP_SIZE


def _cgroup_parent() -> str:
    """Where tenant slices live: the cgroup the BPF agent attaches its programs to (its
    --cgroup-root), so every container below it is covered. Default: "stockade"."""
    parent = os.environ.get("STOCKADE_CGROUP_PARENT", "stockade").strip("/")
    if not parent.startswith("stockade") or ".." in parent.split("/"):
        raise StockadeError(
            f"STOCKADE_CGROUP_PARENT={parent!r} must name a cgroup starting with 'stockade'",
            where="environment",
        )
    return parent


def _tenant(name: str) -> str:
    if not name or set(name) - set("abcdefghijklmnopqrstuvwxyz0123456789-_") or name[0] in "-_":
        raise StockadeError(
            f"--tenant {name!r}: use lowercase letters, digits, '-' and '_'", where="--tenant"
        )
    return name


def _resources(opts: SandboxOptions) -> dict[str, Any]:
    from .resources import parse_cpus, parse_size

    res: dict[str, Any] = {}
    if opts.memory:
        limit = parse_size(opts.memory, "--memory")
        res["memory"] = {"limit": limit, "swap": limit}  # swap == limit: no swap beyond the limit
    if opts.cpus:
        quota, period = parse_cpus(opts.cpus, "--cpus")
        res["cpu"] = {"quota": quota, "period": period}
    try:
        pids = int(str(opts.pids))
    except ValueError:
        raise StockadeError(f"--pids {opts.pids!r} is not a whole number", where="--pids") from None
    if pids < 1:
        raise StockadeError("--pids must be at least 1", where="--pids")
    res["pids"] = {"limit": pids}
    return res


def _mounts(opts: SandboxOptions) -> list[dict[str, Any]]:
    mounts = standard_mounts()
    if not opts.rootfs and not opts.bundle and not opts.image:
        mounts += _host_mounts()
    for item in opts.bind:
        mounts.append(_bind(item))
    return mounts


def _host_mounts() -> list[dict[str, Any]]:
    """The host's /usr (and friends) and a few harmless /etc files, read-only."""
    out = []
    for parent, names, extra in (("/", HOST_DIRS, []), ("/etc", HOST_ETC, ["noexec"])):
        for name in names:
            host = Path(parent) / name
            if host.exists() and not host.is_symlink():
                options = ["rbind", "ro", "nosuid", "nodev", *extra, "rprivate"]
                out.append({"destination": str(host), "type": "bind", "source": str(host),
                            "options": options})
    return out


def _bind(item: str) -> dict[str, Any]:
    parts = item.split(":")
    if (
        len(parts) not in (2, 3)
        or not parts[0]
        or not parts[1]
        or (len(parts) == 3 and parts[2] not in ("ro", "rw"))
    ):
        raise StockadeError(f"--bind {item!r}: expected SRC:DST[:ro]", where="--bind")
    src, dst = Path(parts[0]).resolve(), parts[1]
    if not src.exists():
        raise StockadeError(
            f"--bind source {parts[0]} does not exist", where="--bind", hint="create it first"
        )
    if not dst.startswith("/"):
        raise StockadeError(f"--bind destination {dst!r} must be absolute", where="--bind")
    options = ["rbind", "nosuid", "nodev", "rprivate"] + (["ro"] if parts[2:] == ["ro"] else [])
    return {"destination": dst, "type": "bind", "source": str(src), "options": options}


def _merge_bundle(bundle: Path, ours: dict[str, Any]) -> dict[str, Any]:
    """A bundle's own config, with stockade run's confinement and limits laid over it."""
    from ._lite import json as jsonlite

    try:
        config = jsonlite.loads((bundle / "config.json").read_text())
    except OSError as err:
        raise StockadeError(f"cannot read config.json: {err.strerror}", where=str(bundle)) from None
    except ValueError as err:  # json.JSONDecodeError
        raise StockadeError(
            f"invalid JSON at line {getattr(err, 'lineno', '?')} column {getattr(err, 'colno', '?')}: "
            f"{getattr(err, 'msg', err)}",
            where=str(bundle / "config.json"),
        ) from None
    process = config.setdefault("process", {})
    process["args"] = ours["process"]["args"]
    process["noNewPrivileges"] = True
    linux = config.setdefault("linux", {})
    for key in ("resources", "cgroupsPath", "seccomp"):
        if key in ours["linux"]:
            linux[key] = ours["linux"][key]
    config.setdefault("annotations", {}).update(ours["annotations"])
    return config


@contextlib.contextmanager
def root_filesystem(opts: SandboxOptions, cid: str) -> Iterator[tuple[Path, Path, Any]]:
    """(bundle directory, rootfs, the image or None) for the container CID."""
    if opts.image:
        with _image_root(opts, cid) as (rootfs, image):
            yield rootfs.parent, rootfs, image
        return
    if opts.bundle:
        bundle = Path(opts.bundle).resolve()
        config = bundle / "config.json"
        from ._lite import json as jsonlite

        root = (
            jsonlite.loads(config.read_text()).get("root", {}).get("path", "rootfs")
            if config.exists()
            else "rootfs"
        )
        rootfs = (bundle / root).resolve()
        _must_be_dir(rootfs, "--bundle rootfs")
        yield bundle, rootfs, None
        return
    if opts.rootfs:
        rootfs = Path(opts.rootfs).resolve()
        _must_be_dir(rootfs, "--rootfs")
        yield rootfs.parent, rootfs, None
        return
    tmp = _private_dir("/run", "stockade-rootfs-")
    try:
        _populate_default_rootfs(tmp)
        _bind_mount_points(tmp, opts.bind)
        yield tmp, tmp, None
    finally:
        with suppress(OSError):  # like shutil.rmtree(ignore_errors=True): never mask the result
            remove_tree(str(tmp))


@contextlib.contextmanager
def _image_root(opts: SandboxOptions, cid: str) -> Iterator[tuple[Path, Any]]:
    """The image's layers under an overlay of the container's own, seen with its id maps."""
    from .images.rootfs import mount_root, unmount_root
    from .images.store import Store
    from .spec import IDMapping

    if opts.rootfs or opts.bundle:
        raise StockadeError("--image cannot be combined with --rootfs or --bundle", where="--image")
    store = Store(opts.image_store)
    image = store.get(str(opts.image))
    host_base, size = _idmap(opts)
    maps = [IDMapping(container_id=0, host_id=host_base, size=size)]
    rootfs = Path(mount_root(store, image, cid, maps, maps))
    try:
        yield rootfs, image
    finally:
        unmount_root(store, cid)


def _private_dir(parent: str, prefix: str) -> Path:
    """tempfile.mkdtemp without tempfile's imports."""
    while True:
        path = os.path.join(parent, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return Path(path)
        except FileExistsError:
            continue


def _must_be_dir(path: Path, where: str) -> None:
    if not path.is_dir():
        raise StockadeError(
            f"root filesystem {path} is not a directory",
            where=where,
            hint="point at an unpacked root filesystem",
        )


def _bind_mount_points(root: Path, binds: list[str]) -> None:
    """Create --bind destinations up front: root in the user namespace cannot write our rootfs."""
    for item in binds:
        src, dst = item.split(":")[:2]
        target = root / dst.lstrip("/")
        if target.exists() or target.is_symlink():
            continue
        if Path(src).is_dir():
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()


def _populate_default_rootfs(root: Path) -> None:
    """Mount points and a minimal /etc; the host's /usr and friends are bind-mounted read-only."""
    os.chmod(root, 0o755)
    for name in ("proc", "dev", "sys", "tmp", "etc", "root", "var/tmp", "run", "home", "mnt", "opt", "srv"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for name in HOST_DIRS:
        host = Path("/") / name
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))  # merged /usr: bin -> usr/bin
        elif host.is_dir():
            (root / name).mkdir()
    for name in HOST_ETC:
        host = Path("/etc") / name
        if host.is_dir() and not host.is_symlink():
            (root / "etc" / name).mkdir()
        elif host.exists() and not host.is_symlink():
            (root / "etc" / name).touch()
    etc = root / "etc"
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (etc / "group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")
    (etc / "hostname").write_text("stockade\n")
    (etc / "resolv.conf").write_text("")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files\n")
    os.chmod(root / "tmp", 0o1777)
