"""Pod sandboxes through the CRI, as kubelet runs them (critest's "PodSandbox" areas: lifecycle,
idempotent stop/remove, status, list filters, bad input), on a real `stockade cri serve`: the
pod's namespaces are real, pinned, owned by its tenant's user namespace, and gone after remove."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kernel import needs_root  # noqa: F401 - a fixture, used by name
from leftovers import new_since, snapshot

from cri import Server, fast_tmp, pb, status_code, stop_and_remove

pytestmark = pytest.mark.usefixtures("needs_root")

CONFIG = """
[stockade]
default_handler = "stockade"
[stockade.handlers.stockade]
user_namespace = true
[stockade.handlers.host]
user_namespace = false
host_namespaces = true
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    before = snapshot()
    config = tmp_path / "stockade.toml"
    config.write_text(CONFIG)
    base = fast_tmp()
    srv = Server(base, config=config)
    try:
        yield srv
    finally:
        stop_and_remove(srv)
        assert new_since(before) == {}


def pod_config(name: str = "web", namespace: str = "team-a", **extra) -> pb.PodSandboxConfig:  # noqa: ANN003
    security = pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(
        network=extra.pop("network", pb.POD), pid=pb.CONTAINER, ipc=pb.POD))
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=f"uid-{namespace}-{name}"),
        hostname=extra.pop("hostname", name),
        labels=extra.pop("labels", {"app": name}),
        dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=[f"{namespace}.svc.cluster.local"],
                                options=["ndots:5"]),
        linux=pb.LinuxPodSandboxConfig(security_context=security, sysctls=extra.pop("sysctls", {})),
        **extra,
    )


def run_pod(server: Server, config: pb.PodSandboxConfig, handler: str = "") -> str:
    request = pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return server.runtime.RunPodSandbox(request).pod_sandbox_id


def pod_status(server: Server, pod_id: str) -> pb.PodSandboxStatusResponse:
    return server.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))


def in_pod(pin_dir: Path, *argv: str, kinds: tuple[str, ...] = ("user", "net", "uts")) -> str:
    flags = [f"--{k}={pin_dir / ('network' if k == 'net' else k)}" for k in kinds]
    done = subprocess.run(["nsenter", *flags, *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_pod_lifecycle_namespaces_are_the_pods_own(server: Server) -> None:
    config = pod_config(sysctls={"net.ipv4.ip_unprivileged_port_start": "80", "kernel.shmmni": "1024"})
    pod_id = run_pod(server, config)
    status = pod_status(server, pod_id)
    s = status.status
    assert (s.id, s.state) == (pod_id, pb.SANDBOX_READY)
    assert (s.metadata.name, s.metadata.namespace) == ("web", "team-a")
    assert s.created_at > 0 and s.runtime_handler == "stockade" and s.labels == {"app": "web"}
    assert s.linux.namespaces.options.pid == pb.CONTAINER
    pins = Path(json.loads(status.info["info"])["namespaces"]["network"]).parent
    assert in_pod(pins, "hostname") == "web\n"
    links = in_pod(pins, "ip", "-o", "link")
    assert links.count("\n") == 1 and "lo:" in links and "UP" in links  # loopback only, up
    assert in_pod(pins, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start") == "80\n"
    assert in_pod(pins, "cat", "/proc/sys/kernel/shmmni", kinds=("user", "ipc")) == "1024\n"
    uid_map = in_pod(pins, "cat", "/proc/self/uid_map", kinds=("user",)).split()
    assert uid_map[0] == "0" and int(uid_map[1]) >= 100000 and uid_map[2] == "65536"
    host_net = Path("/proc/self/ns/net").resolve()
    assert in_pod(pins, "readlink", "/proc/self/ns/net") != f"{host_net}\n"
    pod_dir = pins.parent
    resolv = "nameserver 10.96.0.10\nsearch team-a.svc.cluster.local\noptions ndots:5\n"
    assert (pod_dir / "resolv.conf").read_text() == resolv
    assert "127.0.1.1\tweb" in (pod_dir / "hosts").read_text()


def test_tenants_get_distinct_id_ranges(server: Server) -> None:
    maps = []
    for namespace in ("team-a", "team-b"):
        pod_id = run_pod(server, pod_config(namespace=namespace))
        maps.append(json.loads(pod_status(server, pod_id).info["info"])["uid_map"])
    assert maps[0] != maps[1] and all(m[1] == 65536 for m in maps)


def test_stop_and_remove_are_idempotent_and_leave_nothing(server: Server) -> None:
    pod_id = run_pod(server, pod_config())
    for _ in range(2):
        server.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    status = server.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert status.status.state == pb.SANDBOX_NOTREADY
    for _ in range(2):
        server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    code, _ = status_code(server.runtime.PodSandboxStatus, pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert code == grpc.StatusCode.NOT_FOUND
    unknown = "0" * 64
    server.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=unknown))
    server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=unknown))
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    assert not [line for line in mounts if str(server.base) in line]


def test_list_filters_by_id_state_and_labels(server: Server) -> None:
    web = run_pod(server, pod_config("web", labels={"app": "web", "tier": "front"}))
    db = run_pod(server, pod_config("db", labels={"app": "db"}))
    server.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=db))

    def listed(**f) -> list[str]:  # noqa: ANN003
        items = server.runtime.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(**f))).items
        return sorted(i.id for i in items)

    assert listed() == sorted([web, db])
    assert listed(id=web[:12]) == [web]
    assert listed(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY)) == [web]
    assert listed(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY)) == [db]
    assert listed(label_selector={"tier": "front"}) == [web]
    assert listed(label_selector={"app": "none"}) == []


@pytest.mark.parametrize(("change", "code", "words"), [
    ({"name": ""}, grpc.StatusCode.INVALID_ARGUMENT, "config.metadata.name"),
    ({"handler": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown runtime handler 'nope'"),
    ({"network": pb.NODE}, grpc.StatusCode.INVALID_ARGUMENT, "not allowed by handler 'stockade'"),
    ({"sysctls": {"kernel.panic": "1"}}, grpc.StatusCode.INVALID_ARGUMENT, "would change the node"),
    ({"namespace": "Bad_NS"}, grpc.StatusCode.INVALID_ARGUMENT, "not a Kubernetes namespace name"),
])
def test_bad_pods_are_refused_with_the_field_named(server: Server, change: dict, code: grpc.StatusCode,
                                                   words: str) -> None:
    handler = change.pop("handler", "")
    config = pod_config(**{k: v for k, v in change.items() if k in ("network", "sysctls")})
    if "name" in change:
        config.metadata.name = change["name"]
    if "namespace" in change:
        config.metadata.namespace = change["namespace"]
    got, message = status_code(server.runtime.RunPodSandbox,
                               pb.RunPodSandboxRequest(config=config, runtime_handler=handler))
    assert got == code and words in message, message
    assert server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


def test_a_duplicate_pod_is_already_exists(server: Server) -> None:
    run_pod(server, pod_config())
    code, message = status_code(run_pod, server, pod_config())
    assert code == grpc.StatusCode.ALREADY_EXISTS and "team-a/web" in message


def test_a_host_network_pod_under_a_handler_that_allows_it(server: Server) -> None:
    pod_id = run_pod(server, pod_config(network=pb.NODE), handler="host")
    status = pod_status(server, pod_id)
    assert status.status.linux.namespaces.options.network == pb.NODE
    namespaces = json.loads(status.info["info"])["namespaces"]
    assert "network" not in namespaces and "user" not in namespaces


def test_pods_survive_a_server_restart_and_a_killed_run_is_cleaned_up(tmp_path: Path) -> None:
    """A server stopped (SIGTERM) finds its pods again; one killed in the middle of a
    RunPodSandbox (its record still "creating", namespaces already pinned) is cleaned up at the
    next start."""
    from stockade.cri import nspin

    before = snapshot()
    config = tmp_path / "stockade.toml"
    config.write_text(CONFIG)
    base = fast_tmp()
    try:
        srv = Server(base, config=config)
        kept = run_pod(srv, pod_config())
        assert srv.stop() == 0
        half = base / "state/pods" / ("f" * 64)
        half.mkdir(mode=0o711)
        nspin.pin(str(half / "ns"), ["uts", "network"])
        (half / "pod.json").write_text(json.dumps({"id": "f" * 64, "spec": {}, "handler": "stockade",
                                                   "tenant": "team-a", "state": "creating"}))
        srv = Server(base, config=config)
        items = srv.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert [(i.id, i.state) for i in items] == [(kept, pb.SANDBOX_READY)]
        assert not half.exists() and "removed pod " + "f" * 64 in srv.log.read_text()
        srv.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=kept))
        assert srv.stop() == 0
        assert new_since(before) == {}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_dead_pod_helper_is_replaced(server: Server) -> None:
    """Pods' namespaces come from a single-threaded forker the server keeps; if it dies, the
    next pod gets a new one."""
    import os
    import signal
    import time

    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    forkers = [int(p) for p in children if b"stockade.cri.forker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(forkers) == 1
    os.kill(forkers[0], signal.SIGKILL)
    time.sleep(0.2)
    pod_id = run_pod(server, pod_config())
    assert pod_status(server, pod_id).status.state == pb.SANDBOX_READY
