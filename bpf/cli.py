"""`stockade events` and `stockade policy`: read denial events, check and show BPF policies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stockade.runtime.errors import StockadeError


def _events_file() -> Path:
    from stockade.bpf import agent

    state = agent.read_state()
    return Path(state.get("events_file") or agent.EVENTS_FILE)


def _format(event: dict) -> str:
    from datetime import datetime

    when = datetime.fromtimestamp(event["time"]).strftime("%H:%M:%S.%f")[:-3]
    who = event.get("container_id") or f"cgroup:{event.get('cgroup_id')}"
    return (f"{when} {who[:12]:<12} {event['decision']:<7} {event['hook']:<20} "
            f"{event.get('comm', '')}[{event.get('pid')}] {event.get('object', '')}")


def events_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stockade events", description="show BPF denial events")
    ap.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    ap.add_argument("--container", help="only this container (ID or unique prefix)")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--file", help="events file (default: the agent's)")
    args = ap.parse_args(argv)
    from stockade.bpf import events

    path = Path(args.file) if args.file else _events_file()
    try:
        for event in events.read_events(path, args.container, args.follow):
            print(json.dumps(event, sort_keys=True) if args.json else _format(event), flush=True)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


def policy_main(argv: list[str] | None = None) -> int:
    """`stockade policy check|show NAME_OR_PATH`: validate, print the compiled form and layers."""
    ap = argparse.ArgumentParser(prog="stockade policy")
    ap.add_argument("action", choices=("check", "show"))
    ap.add_argument("policy")
    args = ap.parse_args(argv)
    from dataclasses import asdict

    from stockade.bpf import policy as pol

    try:
        p = pol.load_policy(args.policy)
        compiled = pol.compile_policy(p)
    except StockadeError as e:
        print(f"stockade policy: {e}", file=sys.stderr)
        return e.exit_code
    if args.action == "check":
        print(f"{p.source}: ok (needs {', '.join(sorted(pol.requirements(p))) or 'nothing'})")
    else:
        out = asdict(compiled)
        out["requirements"] = sorted(pol.requirements(p))
        print(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("events", "policy", "agent"):
        print("usage: python -m stockade.bpf.cli {agent|events|policy} ...", file=sys.stderr)
        return 2
    if argv[0] == "agent":
        from stockade.bpf import agent

        return agent.main(argv[1:])
    return events_main(argv[1:]) if argv[0] == "events" else policy_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
