"""Tenant networking (network = "bridge"), all inside network namespaces of the benchmark's own:

- pod network setup: RunPodSandbox with the bridge backend (IPv4, and dual-stack) against one
  without a network, the same run, alternating (median; the difference is the network's share
  of a pod's start);
- TCP throughput and request latency between two pods of one tenant, against two namespaces
  joined by a plain veth pair;
- socket+connect and UDP sendto cost for a process outside every container, with Stockade
  running (server, BPF programs, nft table) against Stockade stopped;
- the same inside a pod (a process in a container's cgroup and the pod's namespace) against a
  bare namespace.

Run as root after setup: `bench/network.py [--pods 30] [--json FILE]`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bpf_overhead  # bench/bpf_overhead.py: the C loop and its builder
from report import as_root, parser, report  # bench/report.py (this directory is the script's path)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from cri_api.v1 import api_pb2 as pb  # noqa: E402
from images import busybox_image  # noqa: E402
from stockade.runtime.images.archive import import_archive  # noqa: E402
from stockade.runtime.images.store import Store  # noqa: E402

from cri import STOCKADE, Server, remove_cgroup_everywhere  # noqa: E402

LOAD = str(HERE / "netload.py")
LOOP = ""  # bpf_loop, built into the work directory
IMAGE = "localhost/bench/busybox:1"
CONFIG = """[stockade]
network = "{network}"
default_handler = "bench"
cgroup_parent = "stockade-bench"
[stockade.handlers.bench]
profile = "runtime-default"
allow_degraded = true
[stockade.pod_network]
pod_cidr = "10.218.0.0/16"
pod_cidr6 = "{cidr6}"
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def load(netns: str, *args: str) -> float:
    return float(sh("nsenter", f"--net={netns}", sys.executable, LOAD, *args))


def sink(netns: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, LOAD, "sink", str(port)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def pod_config(name: str) -> pb.PodSandboxConfig:
    metadata = pb.PodSandboxMetadata(name=name, namespace="team-a", uid=f"uid-{name}")
    return pb.PodSandboxConfig(metadata=metadata)


def run_pod(server: Server, name: str) -> tuple[float, str, str]:
    """(seconds RunPodSandbox took, pod id, its address)."""
    cfg = pod_config(name)
    start = time.perf_counter()
    pod_id = server.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    took = time.perf_counter() - start
    ip = server.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status.network.ip
    return took, pod_id, ip


def setup_time(servers: dict[str, Server], pods: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in servers}
    for i in range(pods):
        for name, server in servers.items():
            took, pod_id, _ = run_pod(server, f"setup-{name}-{i}")
            times[name].append(took)
            server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    med = {name: statistics.median(t) * 1000 for name, t in times.items()}
    return {"run_pod_sandbox_ms": med, "network_ms": med["bridge"] - med["none"],
            "network_share": (med["bridge"] - med["none"]) / med["bridge"],
            "dual_stack_network_ms": med["dual"] - med["none"]}


def pair_traffic(a_ns: str, b_ns: str, b_ip: str, mib: int, trips: int) -> dict:
    proc = sink(b_ns, 5201)
    try:
        return {"mb_per_s": statistics.median(load(a_ns, "stream", b_ip, "5201", str(mib)) for _ in range(3)),
                "rtt_us": statistics.median(load(a_ns, "rtt", b_ip, "5201", str(trips)) for _ in range(3))}
    finally:
        proc.kill()
        proc.wait()


OPS = {name: bpf_overhead.OPS[name] for name in ("socket+connect(udp)+close", "sendto(udp)")}
ITERATIONS = 200_000


def socket_costs(netns: str, cgroup: str = "") -> dict:
    """ns per operation by the C loop (thread CPU time: preemption by other tenants left out)."""
    return bpf_overhead.measure(LOOP, netns, cgroup or None, ITERATIONS, OPS)


def alternate(rounds: int, **cases) -> dict:  # noqa: ANN003 - name -> (prepare, netns, cgroup)
    """Median ns per operation for each case, the cases taken in turn ROUNDS times (drift and
    noise then fall on all of them alike)."""
    samples: dict = {name: {op: [] for op in OPS} for name in cases}
    for _ in range(rounds):
        for name, (prepare, netns, cgroup) in cases.items():
            prepare()
            for op, value in socket_costs(netns, cgroup).items():
                samples[name][op].append(value)
    return {name: {op: {"median": statistics.median(v), "spread": _spread(v)} for op, v in ops.items()}
            for name, ops in samples.items()}


def _spread(values: list[float]) -> float:
    """(p75 - p25) / median: how far apart rounds of one case land (the noise a ratio is read against)."""
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / statistics.median(values)


def _ratio(a: dict, b: dict) -> dict:
    return {"ratio": a["median"] / b["median"], "noise": max(a["spread"], b["spread"])}


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--pods", type=int, default=30)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--trips", type=int, default=5000)
    args = as_root(p)
    tag = os.urandom(3).hex()
    nodes = {name: f"stk-bench-{name}-{tag}" for name in ("bridge", "dual", "none", "va", "vb")}
    for ns in nodes.values():
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    va, vb = (f"/run/netns/{nodes[side]}" for side in ("va", "vb"))
    sh("ip", "-n", nodes["va"], "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", vb)
    for side, ip in (("va", "10.219.0.1/24"), ("vb", "10.219.0.2/24")):
        sh("ip", "-n", nodes[side], "addr", "add", ip, "dev", side)
        sh("ip", "-n", nodes[side], "link", "set", side, "up")
    work = Path(tempfile.mkdtemp(prefix="stockade-bench-net-", dir="/var/tmp"))
    work.chmod(0o711)
    global LOOP
    LOOP = bpf_overhead.build_loop(str(work))
    env = dict(os.environ, STOCKADE_BPF_PIN_DIR=f"/sys/fs/bpf/stockade-bench-{tag}",
               STOCKADE_BPF_CGROUP_ROOT="/sys/fs/cgroup/unified/stockade-bench",
               STOCKADE_EVENTS_FILE=str(work / "events.jsonl"), STOCKADE_AGENT_STATE=str(work / "agent.json"))
    servers: dict[str, Server] = {}
    result: dict = {}
    try:
        images = work / "images"
        images.mkdir()
        import_archive(Store(str(images)), str(busybox_image(work / "bb.tar", IMAGE)))
        outside = f"/run/netns/{nodes['bridge']}"
        for name in ("bridge", "dual", "none"):
            network, cidr6 = ("bridge", "fd00:218::/64") if name == "dual" else (name, "")
            (work / f"{name}.toml").write_text(CONFIG.format(network=network, cidr6=cidr6))
            servers[name] = Server(work / name, "--image-store", str(images), config=work / f"{name}.toml",
                                   bpf_agent=name == "bridge", env=env, netns=f"/run/netns/{nodes[name]}")
        result["setup"] = setup_time(servers, args.pods)
        bridge = servers["bridge"]
        (_, a, _), (_, b, b_ip) = run_pod(bridge, "a"), run_pod(bridge, "b")
        pod_ns = [str(bridge.base / "state/pods" / pod / "ns/network") for pod in (a, b)]
        result["pods"] = pair_traffic(pod_ns[0], pod_ns[1], b_ip, args.mib, args.trips)
        result["plain_veth"] = pair_traffic(va, vb, "10.219.0.2", args.mib, args.trips)
        cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name="idle"), image=pb.ImageSpec(image=IMAGE),
                                 command=["sleep", "3600"])
        request = pb.CreateContainerRequest(pod_sandbox_id=a, config=cfg, sandbox_config=pod_config("a"))
        cid = bridge.runtime.CreateContainer(request).container_id
        bridge.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        cgroup = next(str(p) for p in Path("/sys/fs/cgroup/unified/stockade-bench").rglob(cid) if p.is_dir())
        result.update(alternate(5, in_pod_ns=(lambda: None, pod_ns[0], cgroup),
                                bare_netns_ns=(lambda: None, va, "")))

        def stopped() -> None:  # no server, no BPF programs, no nft table: Stockade absent
            if bridge.proc.poll() is None:
                bridge.stop()
            subprocess.run([STOCKADE, "agent", "--stop"], env=env, check=False, stdout=subprocess.DEVNULL)
            subprocess.run(["nsenter", f"--net={outside}", "nft", "delete", "table", "inet", "stockade"],
                           check=False, stderr=subprocess.DEVNULL)

        def running() -> None:  # the same server on the same state: its pods, programs and rules back
            if bridge.proc.poll() is not None:
                again = Server(bridge.base, "--image-store", str(images), config=work / "bridge.toml",
                               bpf_agent=True, env=env, netns=outside)
                bridge.__dict__.update(again.__dict__)

        result.update(alternate(5, outside_stopped_ns=(stopped, outside, ""),
                                outside_running_ns=(running, outside, "")))
        r = result
        r["ratios"] = {
            "pod_vs_veth_throughput": r["pods"]["mb_per_s"] / r["plain_veth"]["mb_per_s"],
            "pod_vs_veth_rtt": r["pods"]["rtt_us"] / r["plain_veth"]["rtt_us"],
            **{f"outside {op}: running/stopped": _ratio(r["outside_running_ns"][op],
                                                        r["outside_stopped_ns"][op]) for op in OPS},
            **{f"in pod {op}: pod/bare": _ratio(r["in_pod_ns"][op], r["bare_netns_ns"][op]) for op in OPS},
        }
    finally:
        for server in servers.values():
            for item in server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
                server.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=item.id))
                server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=item.id))
            server.stop()
        subprocess.run([STOCKADE, "agent", "--stop"], env=env, check=False, stdout=subprocess.DEVNULL)
        remove_cgroup_everywhere("stockade-bench")  # the parent, empty now
        for ns in nodes.values():
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(work, ignore_errors=True)
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
