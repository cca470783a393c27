"""What the short-lived command lines share: a lean argparse set-up and an exit without teardown."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse


class lean_argparse:  # noqa: N801 - used like a function: `with lean_argparse(): ...`
    """While active, argparse's messages are plain strings: it otherwise looks up translations
    (gettext imports locale and searches for catalogues) for every message it builds, and Python
    ships no catalogues for them, so users see the same text. The scope is explicit: argparse's
    own functions come back on exit (a daemon importing the CLIs' modules keeps them)."""

    def __enter__(self) -> None:
        import argparse

        self.saved = (argparse._, argparse.ngettext)  # type: ignore[attr-defined]
        argparse._ = str  # type: ignore[attr-defined]
        argparse.ngettext = _ngettext  # type: ignore[attr-defined]

    def __exit__(self, *_: object) -> None:
        import argparse

        argparse._, argparse.ngettext = self.saved  # type: ignore[attr-defined]


def _ngettext(singular: str, plural: str, n: int) -> str:
    return singular if n == 1 else plural


def formatter(prog: str) -> argparse.HelpFormatter:
    """A help formatter with a fixed width: no shutil import (help output is rare, starts are not)."""
    import argparse

    return argparse.HelpFormatter(prog, width=min(int(os.environ.get("COLUMNS", "100") or 100), 120))


def fast_exit(code: int) -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


class Parsed:
    """Parsed arguments as attributes, like argparse.Namespace (vars() gives the dict)."""

    def __init__(self, values: dict) -> None:
        self.__dict__.update(values)


# An option for `parse_simple`: (flags, dest, kind, default); kind is "bool" (store_true), "str",
# "int", or a tuple of allowed strings. A positional is a dest, or "dest?default" when optional.
Option = tuple[tuple[str, ...], str, "str | tuple[str, ...]", object]


def add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...], helps: dict[str, str]) -> None:
    """The argparse form of `options` (the reference grammar: help, usage and every error)."""
    for flags, dest, kind, default in options:
        extra: dict = {"dest": dest, "default": default, "help": helps.get(dest)}
        if kind == "bool":
            extra["action"] = "store_true"
        elif kind == "int":
            extra["type"] = int
        elif isinstance(kind, tuple):
            extra["choices"] = kind
        parser.add_argument(*flags, **extra)


def parse_simple(
    argv: list[str],
    global_options: tuple[Option, ...],
    commands: dict[str, tuple[tuple[Option, ...], tuple[str, ...]]],
) -> Parsed | None:
    """Parse `[global options] COMMAND [options and positionals]` without argparse (whose re and
    gettext imports would cost every container start), or None for anything but the plain forms
    (help, version, unknown or abbreviated flags, '--', a missing value): argparse then parses
    argv and says what is wrong. Agreement with argparse is tested on the commands' grammar."""
    values = {dest: default for _, dest, _, default in global_options}
    i = _options(argv, 0, global_options, values)
    if i is None or i >= len(argv) or argv[i] not in commands:
        return None
    options, positionals = commands[argv[i]]
    values["command"] = argv[i]
    values.update({dest: default for _, dest, _, default in options})
    rest: list[str] = []
    i += 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg != "-":
            i = _options(argv, i, options, values)
            if i is None:
                return None
        else:
            rest.append(arg)
            i += 1
    for name in positionals:
        dest, optional, default = name.partition("?")
        if rest:
            values[dest] = rest.pop(0)
        elif optional:
            values[dest] = default
        else:
            return None
    return None if rest else Parsed(values)


def _options(argv: list[str], i: int, options: tuple[Option, ...], values: dict) -> int | None:
    """Consume options from argv[i:] into values; the index of the first non-option, or None."""
    by_flag = {flag: (dest, kind) for flags, dest, kind, _ in options for flag in flags}
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        flag, eq, inline = argv[i].partition("=")
        if flag not in by_flag or flag == "--" or (eq and not flag.startswith("--")):
            return None
        dest, kind = by_flag[flag]
        if kind == "bool":
            if eq:
                return None
            values[dest] = True
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value, i = argv[i + 1], i + 2
        else:
            return None
        if kind == "int":
            if not value.isdigit():
                return None
            values[dest] = int(value)
        elif isinstance(kind, tuple) and value not in kind:
            return None
        else:
            values[dest] = value
    return i
