"""`stockade`: the everyday command line. Each subcommand is a thin shell over a library module."""

from __future__ import annotations

import argparse
import sys

from ._lite.argparse import formatter, lean_argparse
from .errors import StockadeError

VERSION = "0.1.0"

# Subcommands implemented elsewhere take their own argv (their parsers live with their code).
DELEGATED = {
    "doctor": (
        "stockade.runtime.doctor",
        "main",
        "what this host can enforce, and how to fix what it cannot",
    ),
    "profile": ("stockade.profiles.cli", "main", "record, generate, lint, test and export profiles"),
    "events": ("stockade.bpf.cli", "events_main", "BPF denials and audit events"),
    "policy": ("stockade.bpf.cli", "policy_main", "check, show, apply and remove BPF policies"),
    "agent": ("stockade.bpf.agent", "main", "load, attach and pin the BPF programs (long-lived)"),
    "oci": ("stockade.runtime.oci_cli", "main", "the OCI runtime command line (same as stockade-oci)"),
    "image": ("stockade.runtime.images.cli", "main", "images: pull, import, export, ls, inspect, rm, prune"),
    "cri": ("stockade.cri.cli", "main", "the CRI server kubelet uses (serve)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        module_name, func, _ = DELEGATED[argv[0]]
        module = __import__(module_name, fromlist=[func])
        return _guard(lambda: getattr(module, func)(argv[1:]))
    with lean_argparse():
        parser = _parser()
        args = parser.parse_args(argv)
    if args.subcommand == "run":
        from . import run

        return _guard(lambda: run.main(args))
    parser.print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    from . import run

    p = argparse.ArgumentParser(
        prog="stockade",
        description="Stockade: run untrusted code confined by the kernel",
        formatter_class=formatter,
    )
    p.add_argument("--version", action="version", version=f"stockade {VERSION}")
    sub = p.add_subparsers(dest="subcommand", metavar="COMMAND")
    run.add_arguments(
        sub.add_parser(
            "run", help="run a command in a sandbox (built-in root filesystem)", formatter_class=formatter
        )
    )
    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def _guard(call) -> int:  # noqa: ANN001 - any zero-argument callable returning an exit code
    try:
        return int(call() or 0)
    except StockadeError as err:
        print(f"stockade: {err.render()}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry. `stockade run` skips the interpreter's teardown like stockade-oci;
    long-lived or bcc-using commands (agent, profile record) keep their atexit cleanup."""
    short_lived = sys.argv[1:2] == ["run"]
    if short_lived:
        import gc

        gc.disable()  # as stockade-oci does (oci_cli.entry)
    code = main()
    if short_lived:
        from ._lite.argparse import fast_exit

        fast_exit(code)
    sys.exit(code)
