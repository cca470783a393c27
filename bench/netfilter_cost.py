"""Where a node's loopback sendto cost lies once a netfilter table is loaded (bench/README.md).

    .venv/bin/python bench/netfilter_cost.py [--rounds 7] [--json OUT]     # as root

In a network namespace made for the run (loopback only), bench/bpf_loop.c's UDP sendto to
127.0.0.1, with the tables below loaded in turn, round by round: none; Stockade's tenant table
(netrules.ruleset, one tenant, no hostPorts); the same without its NAT chains; without NAT and
raw chains; one stateless input chain; one input chain that asks for conntrack state. Medians
of rounds and their ratios to no table. The namespace is removed at exit.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import bpf_overhead  # bench/bpf_overhead.py: the C loop and its builder
from report import as_root, parser, report  # bench/report.py
from stockade.cri import netrules

OP = "sendto(udp)"


def tables() -> dict[str, list]:
    """Case name -> libnftables JSON commands (empty: no table)."""
    tenant = netrules.Tenant("a", "10.9.0.0/24")
    full = netrules.ruleset([tenant], ["10.9.0.0/16"], [], [])

    def chain_of(cmd: dict) -> str:
        added = cmd.get("add", {})
        return added["chain"]["name"] if "chain" in added else added.get("rule", {}).get("chain", "")

    nat = {"postrouting", "prerouting", "output"}  # the NAT chains' names (hostPorts add the other two)
    no_nat = [c for c in full if chain_of(c) not in nat]
    no_raw = [c for c in no_nat if not chain_of(c).startswith("raw_")]
    table = {"add": {"table": {"family": "inet", "name": netrules.TABLE}}}
    chain = {"add": {"chain": {"family": "inet", "table": netrules.TABLE, "name": "input", "type": "filter",
                               "hook": "input", "prio": -1, "policy": "accept"}}}

    def rule(*expr: dict) -> dict:
        return {"add": {"rule": {"family": "inet", "table": netrules.TABLE, "chain": "input",
                                 "expr": list(expr)}}}

    from_pods = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "stkt-*"}}
    replies = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
    return {"none": [], "stockade": full, "without NAT": no_nat, "without NAT and raw": no_raw,
            "one stateless input chain": [table, chain, rule(from_pods, {"drop": None})],
            "one input chain with ct state": [table, chain, rule(replies, {"accept": None}),
                                              rule(from_pods, {"drop": None})]}


def load(netns: str, cmds: list) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", netrules.TABLE],
                   stderr=subprocess.DEVNULL, check=False)
    if cmds:
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "-f", "-"], check=True, text=True,
                       input=json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *cmds]}))


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iterations", type=int, default=200_000)
    args = as_root(p)
    netns, work = f"stk-nfcost-{os.getpid()}", tempfile.mkdtemp(prefix="stockade-nfcost-")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        loop = bpf_overhead.build_loop(work)
        cases = tables()
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, cmds in cases.items():
                load(netns, cmds)
                took = bpf_overhead.measure(loop, f"/run/netns/{netns}", None, args.iterations,
                                            {OP: bpf_overhead.OPS[OP]})
                samples[name].append(took[OP])
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(samples["none"])
    result = {name: {"median_ns": statistics.median(s), "ratio": statistics.median(s) / base}
              for name, s in samples.items()}
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
