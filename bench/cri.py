"""Pods through the CRI: `stockade cri serve` against containerd + runc (Debian's), one client,
the same run, alternating, image already in each store.

- pod start: RunPodSandbox -> CreateContainer -> StartContainer returned (the container's
  process is running), median and p90 over --pods pods per runtime;
- throughput: pods started (and removed) per second by 10 concurrent clients;
- memory Stockade owns per running pod: the server's PSS growth plus every conmon's PSS, with
  --idle pods running, divided by their number (containerd: its shims' PSS, the same way).

containerd runs as tests/test_containerd.py runs it (own root, socket and state, in a network
namespace of its own, runc as the runtime); its pods use that namespace's network (no CNI),
Stockade's get their own pinned network namespace (loopback only). Both get RuntimeDefault
seccomp in the container; Stockade's handler adds its user namespace. Run as root after setup.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from report import as_root, parser, report  # bench/report.py (this directory is the script's path)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' engines, image builder and CRI client

from cri_api.v1 import api_pb2 as pb  # noqa: E402
from images import busybox_image  # noqa: E402
from stockade.runtime.images.archive import import_archive  # noqa: E402
from stockade.runtime.images.store import Store  # noqa: E402
from test_containerd import IMAGE, Containerd  # noqa: E402

from cri import Server  # noqa: E402

STOCKADE_CONFIG = """
[stockade]
default_handler = "bench"
[stockade.handlers.bench]
profile = "runtime-default"
user_namespace = true
"""


def pod_config(name: str, logs: Path, host_network: bool) -> pb.PodSandboxConfig:
    mode = pb.NODE if host_network else pb.POD
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=f"uid-{name}"),
        log_directory=str(logs / name),
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(network=mode, pid=pb.CONTAINER, ipc=pb.POD))))


def container_config() -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image=IMAGE), command=["sleep", "3600"],
        log_path="c.log", linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
            namespace_options=pb.NamespaceOption(pid=pb.CONTAINER),
            seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault))))


class Engine:
    def __init__(self, name: str, runtime, logs: Path, host_network: bool) -> None:  # noqa: ANN001
        self.name, self.runtime, self.logs, self.host_network = name, runtime, logs, host_network

    def start_pod(self, name: str) -> tuple[float, str]:
        """(seconds from RunPodSandbox to StartContainer returned, pod id)."""
        config = pod_config(name, self.logs, self.host_network)
        began = time.perf_counter()
        pod_id = self.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
        cid = self.runtime.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container_config(), sandbox_config=config), timeout=60).container_id
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        return time.perf_counter() - began, pod_id

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)


def latency(engines: list[Engine], pods: int) -> dict:
    samples: dict[str, list[float]] = {e.name: [] for e in engines}
    for i in range(pods + 3):
        for engine in engines if i % 2 else engines[::-1]:
            seconds, pod_id = engine.start_pod(f"lat-{i}")
            engine.remove_pod(pod_id)
            if i >= 3:  # warm-up
                samples[engine.name].append(seconds * 1000)
    return {name: {"median_ms": round(statistics.median(v), 1),
                   "p90_ms": round(sorted(v)[int(len(v) * 0.9) - 1], 1), "runs": len(v)}
            for name, v in samples.items()}


def throughput(engine: Engine, clients: int, per_client: int) -> float:
    def client(n: int) -> None:
        for i in range(per_client):
            _, pod_id = engine.start_pod(f"tp-{n}-{i}")
            engine.remove_pod(pod_id)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(clients * per_client / (time.perf_counter() - began), 2)


def pss_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))


def processes(pattern: str) -> list[int]:
    done = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()]


def memory_per_pod(engine: Engine, server_pid: int, helpers: str, count: int) -> dict:
    before = pss_kib(server_pid)
    pods = [engine.start_pod(f"mem-{i}")[1] for i in range(count)]
    time.sleep(1)
    server = pss_kib(server_pid) - before
    helper = sum(pss_kib(p) for p in processes(helpers))
    for pod_id in pods:
        engine.remove_pod(pod_id)
    per_pod = round((server + helper) / count)
    return {"server_growth_kib": server, "helpers_kib": helper, "per_pod_kib": per_pod}


@contextlib.contextmanager
def both(prefix: str) -> Iterator[tuple[Path, Containerd, Server, list[Engine]]]:
    """containerd + runc and `stockade cri serve` under a work directory of their own, busybox in
    both stores; (work, containerd, server, [stockade, containerd+runc]); everything removed after."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    work.chmod(0o711)
    containerd = server = None
    try:
        (work / "containerd").mkdir()
        containerd = Containerd(work / "containerd", binary=shutil.which("runc") or "runc")
        config = work / "stockade.toml"
        config.write_text(STOCKADE_CONFIG)
        (work / "stockade/images").mkdir(parents=True)
        import_archive(Store(str(work / "stockade/images")), str(busybox_image(work / "bb.tar", IMAGE)))
        server = Server(work / "stockade", config=config)
        yield work, containerd, server, [Engine("stockade", server.runtime, work / "logs-s", False),
                                         Engine("containerd+runc", containerd.cri, work / "logs-c", True)]
    finally:
        if server is not None:
            for item in server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
                server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=item.id))
            server.stop()
        if containerd is not None:
            containerd.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--pods", type=int, default=50)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--idle", type=int, default=20)
    args = as_root(p)
    result: dict = {}
    with both("stockade-bench-cri-") as (work, containerd, server, engines):
        result["pod_start"] = latency(engines, args.pods)
        result["pods_per_second"] = {e.name: throughput(e, args.clients, args.per_client) for e in engines}
        result["memory_per_pod"] = {
            "stockade": memory_per_pod(engines[0], server.proc.pid, f"conmon.*{work}", args.idle),
            "containerd+runc": memory_per_pod(engines[1], containerd.proc.pid, f"containerd-shim.*{work}",
                                              args.idle),
        }
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
