"""`stockade agent`: load Stockade's BPF programs once per boot, pin them, stream events.

What the agent leaves in the kernel outlives it: maps and programs pinned under the pin
directory, cgroup programs attached (BPF_F_ALLOW_MULTI) to the Stockade parent cgroup, BPF-LSM
links pinned as link_lsm_<hook>. A restarted agent finds the pins and re-uses them (policies
in the maps stay in force throughout); `stockade agent --stop` undoes everything it made.

Never attaches to the root cgroup: the parent cgroup must be a real directory below it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from stockade.bpf import maps
from stockade.bpf.attach import (  # noqa: F401 - the library's names, also reachable from here
    _BPFFS_OWN_ENTRIES,
    BPFFS,
    BPFFS_SOURCE,
    _bpffs_source,
    _release_bpffs,
    cgroup_level,
    default_cgroup_root,
    setup,
    teardown,
    unified_mount,
)
from stockade.bpf.events import EVENTS_FILE
from stockade.runtime.errors import StockadeError
from stockade.runtime.files import write_atomic

STATE_FILE = Path(os.environ.get("STOCKADE_AGENT_STATE", "/run/stockade/agent.json"))


# -- state and process -----------------------------------------------------------------------

def read_state() -> dict:
    try:
        return json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(state: dict) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(STATE_FILE, json.dumps(state, indent=2), mode=0o644)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_process(state: dict) -> bool:
    pid = state.get("pid")
    if not pid or pid == os.getpid() or not _alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return True


def _daemonize(log_path: Path) -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stockade agent", description=__doc__.splitlines()[0])
    ap.add_argument("--foreground", action="store_true", help="stay in front and stream events")
    ap.add_argument("--stop", action="store_true", help="stop the agent, detach and unpin everything")
    ap.add_argument("--status", action="store_true", help="print what is loaded as JSON")
    ap.add_argument("--load-only", action="store_true", help="load, attach, pin and exit (no event loop)")
    ap.add_argument("--no-lsm", action="store_true", help="do not try the BPF-LSM programs")
    ap.add_argument("--no-cache", action="store_true", help="recompile even if the cache has bytecode")
    ap.add_argument("--pin-dir", default=maps.PIN_DIR)
    ap.add_argument("--cgroup-root", default=None, help="Stockade parent cgroup in the unified tree")
    ap.add_argument("--events-file", default=str(EVENTS_FILE))
    args = ap.parse_args(argv)
    try:
        cgroup_root = args.cgroup_root or read_state().get("cgroup_root") or default_cgroup_root()
        if args.status:
            print(json.dumps(status(args.pin_dir), indent=2))
            return 0
        if args.stop:
            state = read_state()
            _stop_process(state)
            for line in teardown(args.pin_dir, cgroup_root):
                print(line)
            if state.get("created_cgroup") and os.path.isdir(cgroup_root):
                try:
                    os.rmdir(cgroup_root)
                except OSError:
                    pass  # containers still live there; leave it
            STATE_FILE.unlink(missing_ok=True)
            return 0
        previous = read_state()
        if not args.load_only:
            _stop_process(previous)  # one event reader at a time
        report = setup(args.pin_dir, cgroup_root, with_lsm=not args.no_lsm, use_cache=not args.no_cache)
        report["created_cgroup"] = report["created_cgroup"] or previous.get("created_cgroup", False)
        report["events_file"] = args.events_file
        print(json.dumps(report), flush=True)
        if args.load_only:
            report["pid"] = None
            _write_state(report)
            return 0
        if not args.foreground:
            _daemonize(Path(args.events_file).with_suffix(".log"))
        report["pid"] = os.getpid()
        _write_state(report)
        from stockade.bpf import events

        return events.pump(args.pin_dir, Path(args.events_file))
    except StockadeError as e:
        print(f"stockade agent: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"stockade agent: {e}", file=sys.stderr)
        return 1


def status(pin_dir: str) -> dict:
    state = read_state()
    running = maps.agent_running(pin_dir)
    return {
        "pinned": running,
        "layers": sorted(maps.loaded_layers(pin_dir)),
        "event_reader_pid": state.get("pid") if state.get("pid") and _alive(state["pid"]) else None,
        "lsm": state.get("lsm", False),
        "lsm_reason": state.get("lsm_reason", ""),
        "cgroup_root": state.get("cgroup_root"),
        "policies": len(maps.all_policies(pin_dir)) if running else 0,
    }


if __name__ == "__main__":
    sys.exit(main())
