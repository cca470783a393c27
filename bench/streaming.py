"""Streaming through the CRI: `stockade cri serve` against containerd + runc (Debian's), one client
(tests/streamclient.py, SPDY/3.1 as kubectl and crictl speak it), the same run, alternating.

- exec round trip of `true`: the Exec call plus its stream to the exit status, median and p90;
- port-forward: MB/s of a --mib MiB TCP download from a listener on the pod's 127.0.0.1 through
  a SPDY port-forward, against a direct connection into the pod's network namespace (ratio), and
  containerd's port-forward of the same download.

containerd runs as bench/cri.py runs it (in a network namespace of its own, its pods on that
namespace's network); its streaming server listens there, so the client connects from there.
Run as root after setup: `bench/streaming.py [--execs 50] [--mib 64] [--json FILE]`.
"""

from __future__ import annotations

import importlib.util
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import as_root, parser, report  # bench/report.py (this directory is the script's path)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from cri_api.v1 import api_pb2 as pb  # noqa: E402
from stockade.cri import spdy  # noqa: E402
from stockade.cri.nspin import socket_in  # noqa: E402
from streamclient import Spdy, spdy_exec  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_cri", HERE / "cri.py")
bench_cri = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_cri)  # bench/cri.py: its engines, pod and container configs
PORT = 18180


def exec_round_trips(engines: list, count: int) -> dict:
    samples: dict[str, list[float]] = {e.name: [] for e in engines}
    for i in range(count + 3):
        for e in engines if i % 2 else engines[::-1]:
            began = time.perf_counter()
            url = e.runtime.Exec(pb.ExecRequest(container_id=e.cid, cmd=["true"], stdout=True, stderr=True),
                                 timeout=30).url
            _, _, status = spdy_exec(url, netns=e.netns)
            took = time.perf_counter() - began
            assert status.get("status") == "Success", status
            if i >= 3:
                samples[e.name].append(took * 1000)
    return {name: {"median_ms": round(statistics.median(v), 1), "runs": len(v),
                   "p90_ms": round(sorted(v)[int(len(v) * .9) - 1], 1)} for name, v in samples.items()}


def direct(netns: str, mib: int) -> float:
    sock = socket_in(netns, socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.connect(("127.0.0.1", PORT))
        began, got = time.perf_counter(), 0
        sock.sendall(f"d{mib}\n".encode())
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
        assert got == mib << 20, got
        return mib * 1.048576 / (time.perf_counter() - began)


def forwarded(engine, mib: int, request_id: int) -> float:  # noqa: ANN001
    """MB/s of a download through the engine's port-forward (no half-close: containerd's ends
    a forward when either direction does)."""
    url = engine.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=engine.pod_id, port=[PORT]),
                                     timeout=30).url
    c = Spdy(url, ("portforward.k8s.io",), netns=engine.netns)
    try:
        assert c.code == 101, c.code
        error = c.open(streamType="error", port=str(PORT), requestID=str(request_id))
        data = c.open(streamType="data", port=str(PORT), requestID=str(request_id))
        assert c.replied[data].wait(30)
        began, got = time.perf_counter(), 0
        c.send(spdy.Data(data, f"d{mib}\n".encode()))
        while (chunk := c.data[data].get(timeout=60)) is not None:
            got += len(chunk)
        assert got == mib << 20, (engine.name, got, c.read_all(error, timeout=5))
        return mib * 1.048576 / (time.perf_counter() - began)
    finally:
        c.close()


def port_forward(engines: list, mib: int, rounds: int) -> dict:
    runs: dict[str, list[float]] = {}
    for r in range(rounds):
        for e in engines if r % 2 else engines[::-1]:
            runs.setdefault(e.name, []).append(forwarded(e, mib, r))
        runs.setdefault("direct into the pod's namespace", []).append(direct(engines[0].pod_netns, mib))
    out = {name: round(statistics.median(v), 1) for name, v in runs.items()}
    out["stockade / direct"] = round(out["stockade"] / out["direct into the pod's namespace"], 2)
    out["stockade / containerd+runc"] = round(out["stockade"] / out["containerd+runc"], 2)
    return {"MB_per_s": out, "mib": mib, "rounds": rounds}


def prepare(work: Path, containerd, engines: list) -> list[subprocess.Popen]:  # noqa: ANN001
    """A pod with a `sleep` container per engine, where the client reaches each streaming server
    from, and a sink listening on PORT in each pod's network; the sinks, to stop."""
    engines[0].netns = None  # its streaming server is on this namespace's 127.0.0.1
    engines[1].netns = f"/proc/{containerd.proc.pid}/ns/net"
    subprocess.run(["nsenter", f"--net={engines[1].netns}", "ip", "link", "set", "lo", "up"], check=True)
    for e in engines:
        _, e.pod_id = e.start_pod("stream")
        mine = pb.ContainerFilter(pod_sandbox_id=e.pod_id)
        e.cid = e.runtime.ListContainers(pb.ListContainersRequest(filter=mine)).containers[0].id
    engines[0].pod_netns = str(work / "stockade/state/pods" / engines[0].pod_id / "ns/network")
    sinks = []
    for netns in (engines[0].pod_netns, engines[1].netns):
        argv = ["nsenter", f"--net={netns}", sys.executable, str(HERE / "netload.py"), "sink", str(PORT)]
        sinks.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
        assert sinks[-1].stdout.readline().strip() == "ready"
    return sinks


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--execs", type=int, default=50)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = as_root(p)
    result: dict = {}
    with bench_cri.both("stockade-bench-stream-") as (work, containerd, _, engines):
        sinks = prepare(work, containerd, engines)
        try:
            result["exec_true_round_trip"] = exec_round_trips(engines, args.execs)
            ratio = (result["exec_true_round_trip"]["stockade"]["median_ms"]
                     / result["exec_true_round_trip"]["containerd+runc"]["median_ms"])
            result["exec_true_round_trip"]["stockade / containerd+runc"] = round(ratio, 2)
            result["port_forward"] = port_forward(engines, args.mib, args.rounds)
        finally:
            for sink in sinks:
                sink.kill()
                sink.wait()
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
