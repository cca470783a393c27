"""`stockade-oci`: the OCI runtime command line, with runc's grammar.

podman (--runtime), conmon and containerd's runc shim (BinaryName) drive it exactly as they
drive runc. Thin: parse arguments, call stockade.runtime.container, print, set the exit code.
"""

from __future__ import annotations

import os
import sys
import time

from ._lite.argparse import Option, add_options, fast_exit, formatter, lean_argparse, parse_simple
from .errors import StockadeError
from .state import DEFAULT_ROOT

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

VERSION = "0.1.0"

# The grammar of the global options and the lifecycle commands as data: argparse is built from it
# (help, usage, errors), and cliargs.parse_simple parses the plain forms engines send on every
# container start without importing argparse.
GLOBAL_OPTIONS: tuple[Option, ...] = (
    (("--root",), "root", "str", DEFAULT_ROOT),
    (("--log",), "log", "str", None),
    (("--log-format",), "log_format", ("text", "json"), "text"),
    (("--debug",), "debug", "bool", False),
    (("--systemd-cgroup",), "systemd_cgroup", "bool", False),
    (("--rootless",), "rootless", "str", "auto"),
)
CREATE_OPTIONS: tuple[Option, ...] = (
    (("-b", "--bundle"), "bundle", "str", "."),
    (("--pid-file",), "pid_file", "str", None),
    (("--console-socket",), "console_socket", "str", None),
    (("--no-pivot",), "no_pivot", "bool", False),
    (("--no-new-keyring",), "no_new_keyring", "bool", False),
    (("--preserve-fds",), "preserve_fds", "int", 0),
    (("--allow-degraded",), "allow_degraded", "bool", False),
)
RUN_OPTIONS = CREATE_OPTIONS + (
    (("-d", "--detach"), "detach", "bool", False),
    (("--keep",), "keep", "bool", False),
)
LIFECYCLE: dict[str, tuple[tuple[Option, ...], tuple[str, ...]]] = {
    "create": (CREATE_OPTIONS, ("id",)),
    "run": (RUN_OPTIONS, ("id",)),
    "start": ((), ("id",)),
    "state": ((), ("id",)),
    "kill": (((("-a", "--all"), "all", "bool", False),), ("id", "signal?SIGTERM")),
    "delete": (((("-f", "--force"), "force", "bool", False),), ("id",)),
    "pause": ((), ("id",)),
    "resume": ((), ("id",)),
}
HELP = {
    "root": "state directory (default %(default)s)",
    "log": "append errors, warnings and (with --debug) debug messages to this file",
    "debug": "log what the runtime does, step by step",
    "systemd_cgroup": "refused: Stockade manages cgroupfs directly",
    "rootless": "runc compatibility: 'auto' or 'false' as root; rootless mode is refused",
    "no_new_keyring": "accepted and ignored: every container and exec gets a fresh session keyring",
    "allow_degraded": "run even if a BPF layer the policy needs cannot be enforced (reported in state)",
    "keep": "do not delete the container when it exits",
}


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="stockade-oci",
        description="Stockade OCI runtime (runc-compatible CLI)",
        formatter_class=formatter,
    )
    add_options(p, GLOBAL_OPTIONS, HELP)
    p.add_argument("-v", "--version", action="version", version=f"stockade-oci {VERSION}\nspec: 1.2.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (text, flags) in SUBCOMMANDS.items():
        # Building every subparser is slow; a start only needs its own (help needs all).
        if only is None or name == only:
            flags(sub.add_parser(name, help=text, formatter_class=formatter))
    return p


def _no_flags(p: argparse.ArgumentParser) -> None:
    pass


def _lifecycle(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def flags(p: argparse.ArgumentParser) -> None:
        options, positionals = LIFECYCLE[name]
        add_options(p, options, HELP)
        for positional in positionals:
            dest, optional, default = positional.partition("?")
            p.add_argument(dest, nargs="?" if optional else None, default=default if optional else None)

    return flags


def _format_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--format", choices=("table", "json"), default="table")


def _ps_flags(p: argparse.ArgumentParser) -> None:
    _format_flag(p)
    p.add_argument("id")


def _list_flags(p: argparse.ArgumentParser) -> None:
    _format_flag(p)
    p.add_argument("-q", "--quiet", action="store_true")


GLOBAL_VALUE_FLAGS = {"--root", "--log", "--log-format", "--rootless"}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv (after runc's global flags), or None."""
    it = iter(argv)
    for arg in it:
        if arg in GLOBAL_VALUE_FLAGS:
            next(it, None)
        elif not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def _exec_flags(e: argparse.ArgumentParser) -> None:
    e.add_argument("-p", "--process", help="process.json with the OCI process to run")
    e.add_argument("-d", "--detach", action="store_true")
    e.add_argument("--pid-file")
    e.add_argument("-t", "--tty", action="store_true")
    e.add_argument("--console-socket")
    e.add_argument("--cwd")
    e.add_argument("-e", "--env", action="append", default=[])
    e.add_argument("-u", "--user", help="UID[:GID]")
    e.add_argument("--cap", action="append", default=[])
    e.add_argument("--no-new-privs", action="store_true")
    e.add_argument("--preserve-fds", type=int, default=0)
    e.add_argument("id")
    e.add_argument("args", nargs="...")  # argparse.REMAINDER


def _update_flags(u: argparse.ArgumentParser) -> None:
    u.add_argument("-r", "--resources", help="linux.resources JSON file ('-' for stdin)")
    from .resources import UPDATE_FLAGS

    for flag in UPDATE_FLAGS:
        u.add_argument(f"--{flag}")
    u.add_argument("id")


SUBCOMMANDS = {
    "create": ("create a container, leaving its process waiting for start", _lifecycle("create")),
    "run": ("create and start a container", _lifecycle("run")),
    "start": ("start a created container", _lifecycle("start")),
    "state": ("print the OCI state JSON", _lifecycle("state")),
    "kill": ("send a signal to the container's init (or all processes)", _lifecycle("kill")),
    "delete": ("remove a container and everything it holds", _lifecycle("delete")),
    "exec": ("run a process in a running container", _exec_flags),
    "ps": ("processes in the container", _ps_flags),
    "list": ("containers under --root", _list_flags),
    "pause": ("freeze all processes", _lifecycle("pause")),
    "resume": ("thaw all processes", _lifecycle("resume")),
    "update": ("change a container's resource limits", _update_flags),
    "features": ("print the OCI features JSON", _no_flags),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_simple(argv, GLOBAL_OPTIONS, LIFECYCLE)
    if args is None:
        with lean_argparse():
            args = _parser(_command_in(argv)).parse_args(argv)
    try:
        _check_globals(args)
        _log_debug(args, lambda: f"stockade-oci {' '.join(argv)}")
        code = COMMANDS[args.command](args) or 0
        _log_debug(args, lambda: f"{args.command}: exit {code}")
        return code
    except StockadeError as err:
        _log_error(args, err.render())
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def _check_globals(args: argparse.Namespace) -> None:
    if args.systemd_cgroup:
        raise StockadeError(
            "--systemd-cgroup is not supported",
            hint="use the cgroupfs manager "
            "(podman: --cgroup-manager=cgroupfs; containerd: SystemdCgroup = false)",
        )
    if args.rootless not in ("auto", "false", "true"):
        raise StockadeError(f"--rootless {args.rootless!r}: expected true, false or auto", where="--rootless")
    if args.rootless == "true" or os.geteuid() != 0:
        raise StockadeError(
            "rootless mode is not supported: Stockade runs as root and confines containers with "
            "user namespaces of its own",
            where="--rootless" if args.rootless == "true" else "euid",
            hint="run stockade-oci as root (podman: as root, or with another runtime when rootless)",
        )


def _log_debug(args: argparse.Namespace, message: Callable[[], str]) -> None:
    """--debug: what the runtime does, as debug lines in the log (stderr without --log)."""
    if not args.debug:
        return
    try:
        if args.log:
            _log_line(args, "debug", message())
        else:
            print(f"stockade-oci: debug: {message()}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # debug output never fails the command


def _log_error(args: argparse.Namespace, message: str) -> None:
    """The --log file first, always: containerd's shim hands the runtime a read-only /dev/null as
    stderr for sandboxes and reads the error from the log. A failing stderr hides nothing."""
    if args.log:
        try:
            _log_line(args, "error", message)
        except OSError as exc:
            message += f" (and the log {args.log} could not be written: {exc.strerror})"
    try:
        print(f"stockade-oci: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _log_warning(args: argparse.Namespace, message: str) -> None:
    """Warnings go to the --log file when there is one, as runc's do; else to stderr."""
    try:
        if args.log:
            _log_line(args, "warning", message)
        else:
            print(f"stockade-oci: warning: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # a warning never fails the command


def _log_line(args: argparse.Namespace, level: str, message: str) -> None:
    import json  # not at the top: json imports re and enum, slow on the start path

    if args.log_format == "json":
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        line = json.dumps({"level": level, "msg": message, "time": stamp})
    else:
        line = f"{level}: {message}"
    with open(args.log, "a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------- commands


def _create(args: argparse.Namespace) -> int:
    from . import container

    container.create(args.root, args.id, args.bundle, _create_options(args))
    return 0


def _create_options(args: argparse.Namespace):  # noqa: ANN202 - lazy import keeps start fast
    from .container import CreateOptions

    return CreateOptions(
        pid_file=args.pid_file or None,
        console_socket=args.console_socket,
        no_pivot=args.no_pivot,
        preserve_fds=args.preserve_fds,
        # A CRI server whose handler opted in sets this in its conmon's environment (conmon has
        # no way to pass create flags); the state still records every layer that is missing.
        allow_degraded=args.allow_degraded or os.environ.get("STOCKADE_ALLOW_DEGRADED") == "1",
        warn=lambda message: _log_warning(args, message),
        debug=(lambda message: _log_debug(args, lambda: message)) if args.debug else None,
    )


def _run(args: argparse.Namespace) -> int:
    if args.detach:
        from . import container

        container.create(args.root, args.id, args.bundle, _create_options(args))
        container.start(args.root, args.id)
        return 0
    from . import foreground

    return foreground.run(args.root, args.id, args.bundle, _create_options(args), keep=args.keep)


def _start(args: argparse.Namespace) -> int:
    from . import container

    container.start(args.root, args.id)
    return 0


def _state(args: argparse.Namespace) -> int:
    import json  # not at the top: json imports re and enum, slow on the start path

    from . import container

    print(json.dumps(container.status(args.root, args.id).oci(), indent=2))
    return 0


def parse_signal(text: str) -> int:
    name = text.upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    import signal  # names need the enum; not on the start path

    try:
        return int(signal.Signals[name])
    except KeyError:
        raise StockadeError(
            f"unknown signal {text!r}", hint="use a name like TERM or KILL, or a number"
        ) from None


def _kill(args: argparse.Namespace) -> int:
    from . import container

    container.kill(args.root, args.id, parse_signal(args.signal), all_processes=args.all)
    return 0


def _delete(args: argparse.Namespace) -> int:
    from . import container

    container.delete(args.root, args.id, force=args.force)
    return 0


def _exec(args: argparse.Namespace) -> int:
    from . import container

    process = _exec_process(args)
    result = container.exec_process(
        args.root,
        args.id,
        process,
        console_socket=args.console_socket,
        detach=args.detach,
        pid_file=args.pid_file or None,
        preserve_fds=args.preserve_fds,
    )
    return 0 if args.detach else result


def _exec_process(args: argparse.Namespace):  # noqa: ANN202
    """The OCI process to exec: from --process, or built from the arguments like runc does."""
    import json  # not at the top: json imports re and enum, slow on the start path

    from . import container, spec

    if args.process:
        where = args.process
        try:
            data = json.loads(_read(args.process))
        except OSError as err:
            raise StockadeError(f"cannot read process file: {err.strerror}", where=where) from None
        except json.JSONDecodeError as err:
            raise StockadeError(
                f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}", where=where
            ) from None
        return spec.parse_process(data, where=where)
    if not args.args:
        raise StockadeError("exec needs a command", hint="stockade-oci exec ID CMD [ARGS...] or --process F")
    argv = [a for a in args.args if a != "--"] if args.args[0] == "--" else args.args
    changes = container.ExecChanges(
        args=argv, tty=args.tty, cwd=args.cwd, env=args.env, user=args.user, no_new_privs=args.no_new_privs
    )
    return container.exec_process_of(args.root, args.id, changes)


def _ps(args: argparse.Namespace) -> int:
    import json  # not at the top: json imports re and enum, slow on the start path

    from . import container

    pids = container.processes(args.root, args.id)
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    import subprocess

    if pids:
        subprocess.run(["ps", "-f", "-p", ",".join(map(str, pids))], check=False)
    return 0


def _list(args: argparse.Namespace) -> int:
    import json  # not at the top: json imports re and enum, slow on the start path

    from . import container

    items = container.list_containers(args.root)
    if args.quiet:
        print("\n".join(s.state.id for s in items))
    elif args.format == "json":
        print(json.dumps([s.oci() for s in items], indent=2))
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [
            (s.state.id, str(s.oci()["pid"]), s.status, s.state.bundle, s.state.created, s.state.owner)
            for s in items
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _update(args: argparse.Namespace) -> int:
    from . import container

    container.update(args.root, args.id, update_resources(args))
    return 0


def update_resources(args: argparse.Namespace) -> dict:
    """linux.resources from --resources and/or the runc-style flags."""
    import json  # not at the top: json imports re and enum, slow on the start path

    from .resources import UPDATE_FLAGS, update_from_flags

    resources: dict = {}
    if args.resources:
        text = sys.stdin.read() if args.resources == "-" else _read(args.resources)
        try:
            resources = json.loads(text)
        except json.JSONDecodeError as err:
            raise StockadeError(
                f"invalid JSON at line {err.lineno} column {err.colno}: {err.msg}", where=args.resources
            ) from None
    flags = {flag: getattr(args, flag.replace("-", "_")) for flag in UPDATE_FLAGS}
    return update_from_flags(resources, flags)


def _pause(args: argparse.Namespace, freeze: bool) -> int:
    from . import container

    (container.pause if freeze else container.resume)(args.root, args.id)
    return 0


def _features(args: argparse.Namespace) -> int:
    import json  # not at the top: json imports re and enum, slow on the start path

    from .features import features

    print(json.dumps(features(), indent=2))
    return 0


COMMANDS = {
    "create": _create,
    "run": _run,
    "start": _start,
    "state": _state,
    "kill": _kill,
    "delete": _delete,
    "exec": _exec,
    "ps": _ps,
    "list": _list,
    "update": _update,
    "features": _features,
    "pause": lambda a: _pause(a, True),
    "resume": lambda a: _pause(a, False),
}

if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry: exit without the interpreter's teardown (module and object cleanup
    costs milliseconds on every short-lived command; nothing here needs it once output is out)."""
    import gc

    # A short-lived command: no cycle collection. It would walk every object of the interpreter,
    # also in the forked init (copying each page the parent shares with it).
    gc.disable()
    fast_exit(main())


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
