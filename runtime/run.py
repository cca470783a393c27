"""`stockade run`: the command line over runtime.sandbox. Parses the flags, resolves the profile
(seccomp filter and BPF policy, cached per profile file, code and kernel), then creates, starts,
waits for and deletes the container in the foreground, with a pty when asked.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._lite.contextlib import suppress
from ._lite.hashlib import sha256
from .errors import StockadeError
from .sandbox import DEFAULT_PIDS, SandboxOptions, prepare
from .state import DEFAULT_ROOT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_PROFILE = "restricted"
# Flags that are SandboxOptions fields of the same name.
SANDBOX_FLAGS = ("tenant", "memory", "cpus", "pids", "net", "rootfs", "bundle", "bind", "env", "workdir",
                 "user", "idmap", "tty", "image", "image_store")


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
    src.add_argument("--image", help="an image (name, name@digest or id): its layers under an overlay are "
                     "the root; with no command, its entrypoint and cmd run")
    p.add_argument("--entrypoint", metavar="CMD|JSON",
                   help="with --image: run this instead of its entrypoint (a JSON array for arguments; "
                   "'' for none)")
    p.add_argument("--pull", choices=("missing", "always", "never"), default="missing",
                   help="fetch --image from its registry: when it is not in the store (default), every "
                   "time, or never")
    p.add_argument("--image-store", help="image store directory (default $STOCKADE_IMAGE_STORE or "
                   "/var/lib/stockade/images)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="plain HTTP for this registry when pulling (repeatable)")
    p.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro]")
    p.add_argument("--env", "-e", action="append", default=[], metavar="K=V")
    p.add_argument("--workdir", "-w", default="", help="working directory (default: the image's, else /)")
    p.add_argument("--user", "-u", default="", metavar="UID[:GID]",
                   help="user inside (default: the image's, else root); names with --image")
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
    cid = args.name or f"run-{os.urandom(6).hex()}"
    if args.image:
        _have_image(args)
    with prepare(options(args), command, cid) as (spec, bundle, rootfs):
        if args.verbose:
            _report(spec.raw, cid)
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


def options(args: argparse.Namespace) -> SandboxOptions:
    """The sandbox the flags describe, with the profile resolved."""
    seccomp, policy = _profile_parts(args.profile)
    if seccomp is None:
        # Only ever by explicit request (--profile unconfined), and never quietly.
        _warn(f"profile {args.profile!r} installs no seccomp filter")
    if policy and not isinstance(policy, str):
        raise StockadeError(
            f"profile {args.profile!r} has an inline BPF policy; name a policy file instead",
            where=f"profile {args.profile}: bpf",
            hint='e.g. "bpf": "default"',
        )
    given = {name: getattr(args, name) for name in SANDBOX_FLAGS}
    given["entrypoint"] = _entrypoint(args.entrypoint)
    return SandboxOptions(profile=args.profile, seccomp=seccomp, bpf_policy=policy or None, **given)


def _entrypoint(text: str | None) -> list[str] | None:
    """--entrypoint as podman reads it: a JSON array of strings, else one program."""
    if text is None or not text.startswith("["):
        return None if text is None else ([text] if text else [])
    from ._lite import json as jsonlite

    try:
        value = jsonlite.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise StockadeError(f"--entrypoint {text!r} is not a JSON array of strings", where="--entrypoint",
                            hint='e.g. --entrypoint \'["/bin/sh", "-c"]\' or --entrypoint /bin/sh')
    return value


def _have_image(args: argparse.Namespace) -> None:
    """--image in the store, pulled first as --pull says."""
    from .errors import SpecError
    from .images.store import Store

    store = Store(args.image_store)
    if args.pull != "always":
        try:
            store.get(args.image)
            return
        except SpecError:
            if args.pull == "never":
                raise SpecError(f"image {args.image!r} is not in the store and --pull is never",
                                where=store.root, hint="pull or import it first, or drop --pull never"
                                ) from None
    from .images.progress import Bars
    from .images.registry import Client, pull
    from .syscalls import malloc_for_bulk_io

    malloc_for_bulk_io()
    client = Client(insecure=set(args.insecure_registry))
    bars = Bars(sys.stderr, sys.stderr.isatty())
    try:
        image, notes = pull(store, args.image, client, progress=bars)
    finally:
        client.close()
        bars.close()
    for note in notes:
        _warn(note)


def _stdin_from_dev_null() -> None:
    """Without -i the workload reads nothing of the caller's (as podman run)."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(fd, 0)
    os.close(fd)


def _warn(message: str) -> None:
    print(f"stockade: warning: {message}", file=sys.stderr, flush=True)


def _profile_parts(name: str) -> tuple[dict | None, Any]:
    """(the OCI seccomp section, the BPF policy) of a profile. A built-in or gallery profile's are
    cached per profile file, profile code, kernel and architecture: resolving them imports the
    profile machinery, which would cost every run more than its own start (bench/README.md)."""
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
        from .files import write_atomic

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
