"""`stockade image`: the command line over the image store (pull, ls, inspect, rm, prune, import,
export)."""

from __future__ import annotations

import argparse
import json
import sys

from .._lite.argparse import formatter, lean_argparse
from .._lite.dataclasses import asdict
from .store import Store, iter_names


def main(argv: list[str]) -> int:
    with lean_argparse():
        args = _parser().parse_args(argv)
    store = Store(args.store)
    return args.func(store, args) or 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stockade image", description="images in the store",
                                formatter_class=formatter)
    p.add_argument("--store", help="store directory ($STOCKADE_IMAGE_STORE, else /var/lib/stockade/images)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pull = sub.add_parser("pull", help="fetch an image from its registry", formatter_class=formatter)
    pull.add_argument("ref")
    pull.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                      help="plain HTTP for this registry (repeatable)")
    pull.add_argument("--platform", default="linux/amd64", help="os/arch from an index (default %(default)s)")
    pull.add_argument("--auth-file", help="docker-style auth.json (default: $REGISTRY_AUTH_FILE, ...)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress, only the result")
    pull.set_defaults(func=_pull)
    ls = sub.add_parser("ls", help="list images", formatter_class=formatter)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_ls)
    inspect = sub.add_parser("inspect", help="an image's metadata as JSON", formatter_class=formatter)
    inspect.add_argument("ref")
    inspect.set_defaults(func=_inspect)
    rm = sub.add_parser("rm", help="remove names (an image goes with its last)", formatter_class=formatter)
    rm.add_argument("refs", nargs="+", metavar="REF")
    rm.set_defaults(func=_rm)
    prune = sub.add_parser("prune", help="remove layers and blobs no image uses", formatter_class=formatter)
    prune.set_defaults(func=_prune)
    imp = sub.add_parser("import", help="an OCI image layout (directory or tar) or a docker-archive tar "
                         "into the store", formatter_class=formatter)
    imp.add_argument("path", metavar="FILE|DIR")
    imp.add_argument("--name", help="the name to give it (default: the layout's own)")
    imp.set_defaults(func=_import)
    exp = sub.add_parser("export", help="an image as an OCI image layout (a directory, or a tar if OUT "
                         "ends in .tar)", formatter_class=formatter)
    exp.add_argument("ref", metavar="REF")
    exp.add_argument("out", metavar="OUT")
    exp.set_defaults(func=_export)
    return p


def _pull(store: Store, args: argparse.Namespace) -> None:
    from ..errors import SpecError
    from ..syscalls import malloc_for_bulk_io
    from .progress import Bars
    from .registry import Client, pull

    os_name, _, arch = args.platform.partition("/")
    if os_name != "linux" or not arch:
        raise SpecError(f"--platform {args.platform!r}: only linux/<arch>", where="--platform")
    malloc_for_bulk_io()
    client = Client(insecure=set(args.insecure_registry), auth_file=args.auth_file)
    bars = None if args.quiet else Bars(sys.stderr, sys.stderr.isatty())
    try:
        image, notes = pull(store, args.ref, client, arch=arch, progress=bars)
    finally:
        client.close()
        if bars:
            bars.close()
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{', '.join(iter_names(image))} {image.id}")


def _ls(store: Store, args: argparse.Namespace) -> None:
    from .progress import size

    images = store.images()
    if args.json:
        print(json.dumps([asdict(i) for i in images], indent=2))
        return
    print(f"{'NAME':60s} {'ID':14s} {'SIZE':>10s}")
    for image in images:
        for name in iter_names(image):
            print(f"{name:60s} {image.id[7:19]:14s} {size(image.size):>10s}")


def _inspect(store: Store, args: argparse.Namespace) -> None:
    print(json.dumps(asdict(store.get(args.ref)), indent=2))


def _rm(store: Store, args: argparse.Namespace) -> None:
    for ref in args.refs:
        image = store.remove(ref)
        print(f"untagged {ref}" + ("" if image.repo_tags else f"; deleted {image.id}"))


def _prune(store: Store, args: argparse.Namespace) -> None:
    removed = store.prune()
    print(f"removed {len(removed)} layers and blobs")


def _import(store: Store, args: argparse.Namespace) -> None:
    from .archive import import_archive

    for image, notes in import_archive(store, args.path, args.name):
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"{', '.join(iter_names(image))} {image.id}")


def _export(store: Store, args: argparse.Namespace) -> None:
    from .archive import export_oci

    image = export_oci(store, args.ref, args.out)
    print(f"{image.id} -> {args.out}")


