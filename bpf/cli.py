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
    who = event.get("container_id") or (f"pod:{event['pod_id']}" if event.get("pod_id")  # a network denial
                                        else f"cgroup:{event.get('cgroup_id')}")
    return (f"{when} {who[:12]:<12} {event['decision']:<7} {event['hook']:<20} "
            f"{event.get('comm', '')}[{event.get('pid')}] {event.get('object', '')}")


def events_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stockade events", description="show denials (BPF, network)")
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
    """`stockade policy check|show|apply|remove`: validate and show BPF policies; put one on a
    cgroup (or take it off) with plain map updates, as the runtime does for its containers."""
    ap = argparse.ArgumentParser(prog="stockade policy")
    ap.add_argument("action", choices=("check", "show", "apply", "remove"))
    ap.add_argument("policy", nargs="?", help="policy name (profiles/policy/NAME.yaml) or path")
    ap.add_argument("--cgroup", help="apply/remove: the cgroup directory in the unified hierarchy")
    ap.add_argument("--cgroup-id", type=int, help="apply/remove: the cgroup id instead of --cgroup")
    ap.add_argument("--container-id", default="", help="apply: the name events show")
    ap.add_argument("--tenant", default="")
    ap.add_argument("--pin-dir", default=None)
    args = ap.parse_args(argv)
    from stockade.bpf import maps
    from stockade.bpf import policy as pol
    from stockade.runtime._lite.dataclasses import asdict

    try:
        if args.action == "remove":
            maps.remove_policy(_cgroup_id(args), args.pin_dir)
            if args.cgroup and maps.egress_attached(args.cgroup):
                maps.detach_egress(args.cgroup, args.pin_dir)
            return 0
        if not args.policy:
            raise StockadeError("name a policy", hint="stockade policy check default")
        p = pol.load_policy(args.policy)
        compiled = pol.compile_policy(p)
        needs = pol.requirements(p)
        if args.action == "check":
            print(f"{p.source}: ok (needs {', '.join(sorted(needs)) or 'nothing'})")
        elif args.action == "show":
            out = asdict(compiled)
            out["requirements"] = sorted(needs)
            print(json.dumps(out, indent=2))
        else:
            cgid = _cgroup_id(args)
            missing = maps.missing_layers(needs, args.pin_dir)
            name = args.container_id or f"cgroup-{cgid}"
            maps.install_policy(cgid, name, compiled, args.tenant, args.pin_dir)
            if "cgroup_sock_addr" in needs and "cgroup_sock_addr" not in missing:
                # the CLI cannot know the cgroup's network: its egress rules are always enforced
                from stockade.bpf.attach import find_cgroup

                where = args.cgroup or find_cgroup(cgid, max_depth=8)
                if not where:
                    raise StockadeError("the egress rules need the cgroup's directory",
                                        where=f"cgroup id {cgid}", hint="name it with --cgroup")
                maps.attach_egress(where, args.pin_dir)
            if missing:
                print(f"warning: not enforced here: {', '.join(sorted(missing))}", file=sys.stderr)
    except StockadeError as e:
        print(f"stockade policy: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def _cgroup_id(args) -> int:
    import os

    if args.cgroup_id:
        return args.cgroup_id
    if not args.cgroup:
        raise StockadeError("say which cgroup",
                            hint="--cgroup /sys/fs/cgroup/unified/stockade/ID or --cgroup-id")
    try:
        return os.stat(args.cgroup).st_ino
    except OSError as e:
        raise StockadeError(f"no such cgroup: {e.strerror}", where=args.cgroup) from None


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
