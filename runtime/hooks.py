"""OCI hooks: run each with the container's state JSON on stdin, as the runtime-spec says.

prestart/createRuntime/createContainer/startContainer failures abort the lifecycle step;
poststart/poststop failures are reported as warnings and the remaining hooks still run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

from .errors import StockadeError

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    from typing import Any

FATAL_HOOKS = ("prestart", "createRuntime", "createContainer", "startContainer")


def run_hooks(kind: str, hooks: Sequence[Any], state: dict, in_container: bool = False) -> None:
    """Run the hooks of one kind in order. `hooks` are spec Hook objects (path, args, env, timeout).
    `in_container`: run by the container init, through the exec trampoline (see trampoline.py)."""
    payload = json.dumps(state).encode()
    for index, hook in enumerate(hooks):
        where = f"config.json: hooks.{kind}[{index}]"
        try:
            _run_one(hook, payload, where, in_container)
        except StockadeError as err:
            if kind in FATAL_HOOKS:
                raise
            print(f"stockade: warning: {err}", file=sys.stderr)


def _run_one(hook: Any, payload: bytes, where: str, in_container: bool) -> None:
    args = list(hook.args or [hook.path])
    env = dict(item.split("=", 1) for item in (hook.env or []) if "=" in item)
    executable = hook.path
    try:
        if in_container:
            if not os.path.isfile(hook.path):  # the trampoline would only say "cannot execute"
                raise FileNotFoundError(hook.path)
            from .trampoline import argv

            # The trampoline's memfd is close-on-exec, and so is every other descriptor of the
            # init while hooks run (see the caller): the hook inherits stdio only.
            executable, args = argv(hook.path, args)
        done = subprocess.run(
            args,
            executable=executable,
            close_fds=not in_container,
            input=payload,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=hook.timeout or None,
            check=False,
        )
    except FileNotFoundError:
        raise StockadeError(f"hook {hook.path} not found", where=where, hint="fix the hook's path") from None
    except subprocess.TimeoutExpired:
        raise StockadeError(f"hook {hook.path} timed out after {hook.timeout}s", where=where) from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()[-500:]
        raise StockadeError(f"hook {hook.path} exited with {done.returncode}: {detail}", where=where)
