"""`stockade run`: run an untrusted command confined, on the built-in root filesystem by default.

Builds an OCI config in memory (the same library path as `stockade-oci` then takes it):
a user namespace whose root maps to an unprivileged host range, every other namespace new,
the host's /usr read-only, a minimal /etc, fresh /proc and /dev, a private /tmp, no network,
the `restricted` profile, and a cgroup slice with the asked limits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
from pathlib import Path

from ._lite.contextlib import suppress
from ._lite.hashlib import sha256
from .defaults import MASKED_PATHS, OCI_DEFAULT_CAPS, READONLY_PATHS, standard_mounts
from .errors import StockadeError
from .state import DEFAULT_ROOT, remove_tree

TYPE_CHECKING = False  # typing, secrets, shutil and tempfile would cost every run ~5 ms
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PROFILE = "restricted"
IDMAP_BASE = 100000  # first host id of the default tenant's range
IDMAP_SIZE = 65536
TENANT_SLOTS = 4096  # other tenants get their own 65536-id range above the default one
DEFAULT_PIDS = 1024
# What an ordinary workload needs; the rest of the bounding set is dropped (runc's default, minus
# NET_RAW and MKNOD: untrusted code needs neither raw sockets nor device nodes).
DEFAULT_CAPS = [c for c in OCI_DEFAULT_CAPS if c not in ("CAP_MKNOD", "CAP_NET_RAW")]
HOST_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")  # shared read-only (or symlinks)
HOST_ETC = ("alternatives", "ld.so.cache", "localtime")  # harmless host /etc entries programs look for


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="seccomp+BPF profile (default %(default)s)")
    p.add_argument("--tenant", default="default", help="tenant name: its own id range and cgroup slice")
    p.add_argument("--memory", help="memory limit, e.g. 256M")
    p.add_argument("--cpus", help="CPU limit in CPUs, e.g. 0.5")
    p.add_argument("--pids", default=str(DEFAULT_PIDS), help="process limit (default %(default)s)")
    p.add_argument(
        "--net", default="none", help="network: only 'none' now (zero-trust networking comes with CRI)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rootfs", help="root filesystem directory instead of the built-in one")
    src.add_argument("--bundle", help="OCI bundle (config.json + rootfs) to run with these limits")
    p.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro]")
    p.add_argument("--env", "-e", action="append", default=[], metavar="K=V")
    p.add_argument("--workdir", "-w", default="/")
    p.add_argument("--user", "-u", default="0:0", metavar="UID[:GID]", help="user inside (default root)")
    p.add_argument("--idmap", metavar="HOSTID:SIZE", help="host id range the container's ids map to")
    p.add_argument("--timeout", type=float, help="kill everything after this many seconds (exit 124)")
    p.add_argument("--name", help="container ID (default: run-<random>)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="state directory")
    p.add_argument(
        "--allow-degraded",
        action="store_true",
        help="run even when a layer the profile needs cannot be enforced here (reported)",
    )
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin attached (else /dev/null)")
    p.add_argument("-t", "--tty", action="store_true", help="give the workload a pty on this terminal")
    p.add_argument("-v", "--verbose", action="store_true", help="say which layers confine the workload")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")


def main(args: argparse.Namespace) -> int:
    from . import foreground
    from .container import CreateOptions

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise StockadeError("no command to run", hint="stockade run [OPTIONS] -- CMD [ARGS...]")
    cid = args.name or f"run-{os.urandom(6).hex()}"
    config = build_config(args, command, cid)
    with root_filesystem(args) as (bundle, rootfs):
        from . import spec as specmod

        if args.bundle:
            config = _merge_bundle(Path(args.bundle), config)
        config["root"]["path"] = str(rootfs)
        spec = specmod.parse_spec(config, where="stockade run")
        spec.raw = config
        if args.verbose:
            _report(config, cid)
        opts = CreateOptions(spec=spec, rootfs=rootfs, allow_degraded=args.allow_degraded, warn=_warn)
        if not args.interactive:
            _stdin_from_dev_null()
        if not args.tty:
            return foreground.run(args.root, cid, bundle, opts, timeout=args.timeout)
        from .terminal import Terminal

        term = Terminal(stdin=args.interactive)
        opts.console_socket = term.path
        try:
            return foreground.run(args.root, cid, bundle, opts, timeout=args.timeout, terminal=term)
        finally:
            term.close()


def _stdin_from_dev_null() -> None:
    """Without -i the workload reads nothing of the caller's (as podman run)."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(fd, 0)
    os.close(fd)


def _warn(message: str) -> None:
    print(f"stockade: warning: {message}", file=sys.stderr, flush=True)


def build_config(args: argparse.Namespace, command: list[str], cid: str) -> dict[str, Any]:
    uid, gid = _user(args.user)
    host_base, size = _idmap(args)
    if args.net != "none":
        raise StockadeError(
            f"--net {args.net} is not available",
            where="--net",
            hint="use --net none; per-tenant zero-trust networking arrives with the CRI front-end",
        )
    config: dict[str, Any] = {
        "ociVersion": "1.2.0",
        "process": _process(args, command, uid, gid),
        "root": {"path": "rootfs", "readonly": True},
        "hostname": cid[:63],
        "mounts": _mounts(args),
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")],
            "uidMappings": [{"containerID": 0, "hostID": host_base, "size": size}],
            "gidMappings": [{"containerID": 0, "hostID": host_base, "size": size}],
            "resources": _resources(args),
            "cgroupsPath": f"{_cgroup_parent()}/{_tenant(args.tenant)}/{cid}",
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
        "annotations": {"io.stockade.tenant": args.tenant, "io.stockade.profile": args.profile},
    }
    _apply_profile(config, args.profile)
    return config


def _process(args: argparse.Namespace, command: list[str], uid: int, gid: int) -> dict[str, Any]:
    env = [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root" if uid == 0 else "HOME=/tmp",
        "LANG=C.UTF-8",
        f"TERM={os.environ.get('TERM', 'xterm')}",
        "container=stockade",  # as podman sets container=podman: what detection tools read
    ]
    for item in args.env:
        if "=" not in item or item.startswith("="):
            raise StockadeError(f"--env {item!r} is not KEY=VALUE", where="--env")
        env.append(item)
    nofile = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    caps = DEFAULT_CAPS if uid == 0 else []
    process: dict[str, Any] = {
        "terminal": bool(args.tty),
        "user": {"uid": uid, "gid": gid},
        "args": command,
        "env": env,
        "cwd": args.workdir,
        "capabilities": {"bounding": DEFAULT_CAPS, "effective": caps, "permitted": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        "noNewPrivileges": True,
    }
    if args.tty:
        from .terminal import size_of

        size = size_of(0) or size_of(1)
        if size:
            process["consoleSize"] = {"height": size[0], "width": size[1]}
    return process


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


def _idmap(args: argparse.Namespace) -> tuple[int, int]:
    if args.idmap:
        host, _, size = args.idmap.partition(":")
        try:
            base, count = int(host), int(size or IDMAP_SIZE)
        except ValueError:
            raise StockadeError(f"--idmap {args.idmap!r}: expected HOSTID:SIZE", where="--idmap") from None
        if base < 1000 or count < 1:
            raise StockadeError("--idmap must map to unprivileged host ids (>= 1000)", where="--idmap")
        return base, count
    if args.tenant == "default":
        return IDMAP_BASE, IDMAP_SIZE
    # A stable, distinct range per tenant: root of one tenant is nobody to another.
    slot = 1 + int.from_bytes(sha256(args.tenant.encode()).digest()[:4], "big") % TENANT_SLOTS
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


def _resources(args: argparse.Namespace) -> dict[str, Any]:
    from .resources import parse_cpus, parse_size

    res: dict[str, Any] = {}
    if args.memory:
        limit = parse_size(args.memory, "--memory")
        res["memory"] = {"limit": limit, "swap": limit}  # swap == limit: no swap beyond the limit
    if args.cpus:
        quota, period = parse_cpus(args.cpus, "--cpus")
        res["cpu"] = {"quota": quota, "period": period}
    try:
        pids = int(args.pids)
    except ValueError:
        raise StockadeError(f"--pids {args.pids!r} is not a whole number", where="--pids") from None
    if pids < 1:
        raise StockadeError("--pids must be at least 1", where="--pids")
    res["pids"] = {"limit": pids}
    return res


def _mounts(args: argparse.Namespace) -> list[dict[str, Any]]:
    mounts = standard_mounts()
    if not args.rootfs and not args.bundle:
        mounts += _host_mounts()
    for item in args.bind:
        mounts.append(_bind(item))
    return mounts


def _host_mounts() -> list[dict[str, Any]]:
    out = []
    for name in HOST_DIRS:
        host = Path("/") / name
        if host.is_dir() and not host.is_symlink():
            out.append(
                {
                    "destination": f"/{name}",
                    "type": "bind",
                    "source": str(host),
                    "options": ["rbind", "ro", "nosuid", "nodev", "rprivate"],
                }
            )
    for name in HOST_ETC:
        host = Path("/etc") / name
        if host.exists() and not host.is_symlink():
            out.append(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": str(host),
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec", "rprivate"],
                }
            )
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


def _apply_profile(config: dict[str, Any], name: str) -> None:
    seccomp, policy = _profile_parts(name)
    if seccomp is not None:
        config["linux"]["seccomp"] = seccomp
    else:
        # Only ever by explicit request (--profile unconfined), and never quietly.
        print(f"stockade: warning: profile {name!r} installs no seccomp filter", file=sys.stderr)
    if isinstance(policy, str):
        config["annotations"]["io.stockade.bpf-policy"] = policy
    elif policy:
        raise StockadeError(
            f"profile {name!r} has an inline BPF policy; name a policy file instead",
            where=f"profile {name}: bpf",
            hint='e.g. "bpf": "default"',
        )


def _profile_parts(name: str) -> tuple[dict | None, Any]:
    """(the OCI seccomp section, the BPF policy) of a profile. A built-in or gallery profile's are
    cached per profile file, profile code, kernel and architecture: resolving them imports the
    profile machinery, ~7 ms of every run."""
    key = _profile_cache_key(name)
    cache = os.path.join(_cache_dir(), f"profile-{key}.json") if key else None
    if cache:
        from ._lite import json as jsonlite

        with suppress(OSError, ValueError, KeyError):
            with open(cache) as f:
                data = jsonlite.loads(f.read())
            return data["seccomp"], data["bpf"]
    from stockade.profiles import load_profile, profile_seccomp

    profile = load_profile(name)
    parts = (profile_seccomp(profile), profile.bpf_policy)
    if cache:
        from ._lite import json as jsonlite
        from .state import write_atomic

        with suppress(OSError, TypeError):  # no cache: the next run resolves again
            os.makedirs(os.path.dirname(cache), mode=0o700, exist_ok=True)
            write_atomic(cache, jsonlite.dumps({"seccomp": parts[0], "bpf": parts[1]}))
    return parts


def _profile_cache_key(name: str) -> str | None:
    """None for a profile given as a file, or one that is not built in or in the gallery."""
    if os.sep in name or name.endswith((".json", ".yaml", ".yml")):
        return None
    profiles = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "profiles")
    found = [
        os.path.join(profiles, d, name + ext)
        for d in ("builtin", "gallery")
        for ext in (".json", ".yaml")
        if os.path.isfile(os.path.join(profiles, d, name + ext))
    ]
    if not found:
        return None
    code = [os.path.join(profiles, m) for m in sorted(os.listdir(profiles)) if m.endswith(".py")]
    inputs = [found[0], *code]
    stats = [(path, os.stat(path)) for path in inputs]
    stamp = "|".join(f"{path}:{st.st_mtime_ns}:{st.st_size}" for path, st in stats)
    uname = os.uname()
    return sha256(f"{stamp}|{uname.release}|{uname.machine}".encode()).hexdigest()[:32]


def _cache_dir() -> str:
    from .seccomp import cache_dir  # the seccomp cache's directory; imported by create anyway

    return cache_dir()


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
def root_filesystem(args: argparse.Namespace):  # noqa: ANN202 - yields (bundle, rootfs)
    if args.bundle:
        bundle = Path(args.bundle).resolve()
        config = bundle / "config.json"
        from ._lite import json as jsonlite

        root = (
            jsonlite.loads(config.read_text()).get("root", {}).get("path", "rootfs")
            if config.exists()
            else "rootfs"
        )
        rootfs = (bundle / root).resolve()
        _must_be_dir(rootfs, "--bundle rootfs")
        yield bundle, rootfs
        return
    if args.rootfs:
        rootfs = Path(args.rootfs).resolve()
        _must_be_dir(rootfs, "--rootfs")
        yield rootfs.parent, rootfs
        return
    tmp = _private_dir("/run", "stockade-rootfs-")
    try:
        _populate_default_rootfs(tmp)
        _bind_mount_points(tmp, args.bind)
        yield tmp, tmp
    finally:
        with suppress(OSError):  # like shutil.rmtree(ignore_errors=True): never mask the result
            remove_tree(str(tmp))


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


def _report(config: dict[str, Any], cid: str) -> None:
    import json

    linux = config["linux"]
    uidmap = linux["uidMappings"][0]
    print(
        f"stockade: {cid}: user namespace root -> host uid {uidmap['hostID']} (+{uidmap['size']}), "
        f"namespaces {','.join(n['type'] for n in linux['namespaces'])}, "
        f"profile {config['annotations']['io.stockade.profile']}, "
        f"seccomp {'on' if linux.get('seccomp') else 'OFF'}, limits {json.dumps(linux['resources'])}",
        file=sys.stderr,
    )
