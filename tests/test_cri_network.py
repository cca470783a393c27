"""Tenant networking (network = "bridge"), tested inside a "node" network namespace of the test's
own: the server runs there with its bridges and nft table, an "ext" namespace behind it stands
for the world beyond the node (an egress target and the cloud metadata address), and every
probe runs in a pod's or the node's namespace. The host's own namespace is never touched;
deleting the two namespaces removes every kernel object the server made there."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from kernel import needs_root, require  # noqa: F401 (needs_root: a fixture, used by name)

from cri import STOCKADE, Server, fast_tmp

pytestmark = pytest.mark.usefixtures("needs_root")

PROBE = str(Path(__file__).parent / "netprobe.py")
TCP, UDP = 8080, 8081
POD_CIDR, POD_CIDR6 = "10.213.0.0/16", "fd00:213::/64"  # dual-stack: tenants get /24 and /72
EXT_ALLOWED, EXT_OTHER, METADATA = ("192.0.2.2", 9000), ("192.0.2.2", 9001), "169.254.169.254"
# the same seen over IPv6, with the node's address on the ext link
EXT6 = {"ext": "fd00:2::2", "node": "fd00:2::1", "metadata": "fd00:ec2::254"}


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Node:
    """The node namespace, the ext namespace behind it, and listeners started in either or in pods."""

    def __init__(self) -> None:
        tag = os.urandom(3).hex()
        self.name, self.ext = f"stk-node-{tag}", f"stk-ext-{tag}"
        self.listeners: list[subprocess.Popen] = []
        for ns in (self.name, self.ext):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.name, "link", "add", "to-ext", "type", "veth", "peer", "name", "to-node",
           "netns", self.ext)
        sh("ip", "-n", self.name, "addr", "add", "192.0.2.1/24", "dev", "to-ext")
        sh("ip", "-n", self.name, "link", "set", "to-ext", "up")
        sh("ip", "-n", self.ext, "addr", "add", "192.0.2.2/24", "dev", "to-node")
        sh("ip", "-n", self.ext, "addr", "add", f"{METADATA}/32", "dev", "lo")
        sh("ip", "-n", self.ext, "link", "set", "to-node", "up")
        sh("ip", "-n", self.name, "route", "add", f"{METADATA}/32", "via", "192.0.2.2")
        sh("ip", "-n", self.name, "addr", "add", f"{EXT6['node']}/64", "dev", "to-ext", "nodad")
        sh("ip", "-n", self.ext, "addr", "add", f"{EXT6['ext']}/64", "dev", "to-node", "nodad")
        sh("ip", "-n", self.ext, "addr", "add", f"{EXT6['metadata']}/128", "dev", "lo")
        sh("ip", "-n", self.name, "route", "add", f"{EXT6['metadata']}/128", "via", EXT6["ext"])
        self.path = f"/run/netns/{self.name}"

    def listen(self, netns: str, tcp: int = TCP, udp: int = UDP) -> None:
        if [f"--net={netns}", str(tcp), str(udp)] in [[p.args[1], *p.args[-2:]] for p in self.listeners]:
            return  # one answers already (a pod's path is never reused: only the node's and ext's)
        argv = ["nsenter", f"--net={netns}", sys.executable, PROBE, "serve", str(tcp), str(udp)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        self.listeners.append(proc)

    def remove(self) -> None:
        for proc in self.listeners:
            proc.kill()
            proc.wait()
        for ns in (self.name, self.ext):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def reach(netns: str, targets: list[tuple[str, str, int]]) -> list[bool]:
    out = sh("nsenter", f"--net={netns}", sys.executable, PROBE, "probe", json.dumps(targets))
    return json.loads(out)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    require(shutil.which("conmon"), "conmon (setup)")
    require(shutil.which("nsenter"), "nsenter (util-linux)")
    n = Node()
    yield n
    n.remove()
    assert n.name not in sh("ip", "netns", "list")


@pytest.fixture(scope="module")
def server(node: Node) -> Iterator[Server]:
    base = fast_tmp()
    policies = base / "tenants"
    write_policies(policies)
    config = base / "stockade.toml"
    config.write_text(f'[stockade]\nnetwork = "bridge"\ndefault_handler = "plain"\n'
                      f'[stockade.handlers.plain]\nprofile = "runtime-default"\nallow_degraded = true\n'
                      f'[stockade.pod_network]\npod_cidr = "{POD_CIDR}"\npod_cidr6 = "{POD_CIDR6}"\n'
                      f'policy_dir = "{policies}"\n')
    srv = Server(base, config=config, netns=node.path, env=own_events(base))
    yield srv
    srv.stop()
    shutil.rmtree(base, ignore_errors=True)


def own_events(base: Path) -> dict:
    """The server's events file (denials) in the test's directory, not the node's."""
    return dict(os.environ, STOCKADE_EVENTS_FILE=str(base / "events.jsonl"))


def write_policies(directory: Path) -> None:
    directory.mkdir()
    (directory / "team-a.yaml").write_text(
        f"egress:\n  - cidr: {EXT_ALLOWED[0]}/32\n    ports: [{EXT_ALLOWED[1]}]\n    protocol: tcp\n"
        f"  - cidr: {EXT6['ext']}/128\n    ports: [{EXT_ALLOWED[1]}]\n    protocol: tcp\n")


@pytest.fixture(scope="module")
def cni() -> Iterator[tuple[Server, Node]]:
    require(os.access("/usr/lib/cni/bridge", os.X_OK), "containernetworking-plugins (setup)")
    node = Node()
    base = fast_tmp()
    try:
        srv = Server(base, config=cni_config(base), netns=node.path, env=own_events(base))
        yield srv, node
        assert srv.stop() == 0
    finally:
        node.remove()
        shutil.rmtree(base, ignore_errors=True)


def cni_config(base: Path, cidr6: str = "fd00:221::/64") -> Path:
    """A dual-stack conflist (Debian's bridge, host-local, portmap) and the server's
    configuration for it in BASE, telling the server of its IPv6 range as CIDR6 ("": not)."""
    write_policies(base / "tenants")
    (base / "net.d").mkdir()
    (base / "net.d" / "10-pods.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "stockade-test", "plugins": [
            {"type": "bridge", "bridge": "stkcni0", "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local",
                      "ranges": [[{"subnet": "10.221.0.0/16"}], [{"subnet": "fd00:221::/64"}]],
                      "dataDir": str(base / "cni-ipam"), "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    config = base / "stockade.toml"
    config.write_text(f'[stockade]\nnetwork = "cni"\ndefault_handler = "plain"\n'
                      f'[stockade.handlers.plain]\nprofile = "runtime-default"\nallow_degraded = true\n'
                      f'[stockade.pod_network]\npod_cidr = "10.221.0.0/16"\npod_cidr6 = "{cidr6}"\n'
                      f'policy_dir = "{base / "tenants"}"\ncni_conf_dir = "{base / "net.d"}"\n')
    return config


def run_pod(server: Server, name: str, namespace: str, **config) -> tuple[str, str, str]:  # noqa: ANN003
    """(pod id, its address, its pinned network namespace)."""
    metadata = pb.PodSandboxMetadata(name=name, namespace=namespace, uid=f"uid-{name}")
    cfg = pb.PodSandboxConfig(metadata=metadata, hostname=name, **config)
    pod_id = server.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
    status = server.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    return pod_id, status.network.ip, str(server.base / "state/pods" / pod_id / "ns/network")


def ip6_of(server: Server, pod_id: str) -> str:
    """The pod's IPv6 address (PodSandboxStatus's additional_ips), "" for none."""
    status = server.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    return ",".join(ip.ip for ip in status.network.additional_ips)


def in_family(server: Server, pods: list[tuple[str, str, str]], family: int) -> list[tuple[str, str, str]]:
    """PODS with their addresses of FAMILY (4 or 6)."""
    return pods if family == 4 else [(pod_id, ip6_of(server, pod_id), netns) for pod_id, _, netns in pods]


def remove_pod(server: Server, pod_id: str) -> None:
    server.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


def every_protocol(pods: list[tuple[str, str, str]]) -> list[tuple[str, str, int]]:
    return [(p, ip, UDP if p == "udp" else TCP) for _, ip, _ in pods for p in ("tcp", "udp", "icmp")]


def rules(node: Node) -> str:
    return sh("nsenter", f"--net={node.path}", "nft", "list", "table", "inet", "stockade")


def links(node: Node) -> set[str]:
    listing = sh("ip", "-n", node.name, "-o", "link").splitlines()
    return {line.split(":")[1].strip().split("@")[0] for line in listing}


@pytest.mark.parametrize("family", [4, 6])
def test_network_ready_and_the_reachability_matrix(server: Server, node: Node, family: int) -> None:
    """Three pods in two tenants: TCP, UDP and ICMP allowed inside a tenant, refused across
    tenants and to the node; the metadata address refused; the node reaches every pod; the
    egress rule of team-a opens exactly 192.0.2.2:9000/tcp, and only for team-a. The same over
    IPv6 (dual-stack: every pod has both), with the metadata service at fd00:ec2::254."""
    reachability_matrix(server, node, family, expect_denials=True)


@pytest.mark.parametrize("family", [4, 6])
def test_the_cni_backend_passes_the_same_matrix(cni: tuple[Server, Node], family: int) -> None:
    """network = "cni": the node's conflist (Debian's bridge, host-local and portmap plugins)
    gives the pods their addresses, one bridge for all; the tenant rules on top hold the same."""
    server, node = cni
    reachability_matrix(server, node, family)
    if family == 6:
        return
    mapping = pb.PortMapping(protocol=pb.TCP, container_port=TCP, host_port=18090)
    pod_id, ip, netns = run_pod(server, "web", "team-d", port_mappings=[mapping])
    try:
        assert ip.startswith("10.221.")
        node.listen(netns)
        assert reach(node.path, [("tcp", "192.0.2.1", 18090)]) == [True]
    finally:
        remove_pod(server, pod_id)
    assert list((server.base / "cni-ipam").rglob("10.221.*")) == []  # host-local's lease given back
    assert list((server.base / "state/network/cni").iterdir()) == []  # and the cached result


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("backend", ["bridge", "cni"])
def test_a_pod_cannot_send_from_another_pods_address(backend: str, family: int,
                                                      request: pytest.FixtureRequest) -> None:
    """A pod that gives itself another pod's address and sends from it is dropped at its own
    port (the `bridge stockade` table), before any bridging or routing: a sibling's address
    would leave its own narrowed egress behind, and on the CNI bridge, where tenants are known
    by source, another tenant's address would pass for that tenant. The same datagram from the
    address's owner arrives. IPv4 and IPv6 alike."""
    server, node = _backend(backend, request)
    # on the bridge backend a sibling on the same bridge (another tenant's bridge routes through
    # the tenant rules, which go by bridge); on the CNI bridge, another tenant's pod
    spoofing = "team-sb" if backend == "bridge" else "team-sa"
    pods = [run_pod(server, name, ns) for name, ns in (("sa", spoofing), ("sb", "team-sb"),
                                                       ("st", "team-sb"))]
    try:
        (_, _, spoofer), (_, owned, owner), (_, target, inside) = in_family(server, pods, family)
        nodad = ["nodad"] if family == 6 else []
        sh("nsenter", f"--net={spoofer}", "ip", "addr", "add", owned, "dev", "eth0", *nodad)
        # the target's MAC known: no ARP or neighbour discovery (which would claim the address)
        mac = sh("nsenter", f"--net={inside}", "cat", "/sys/class/net/eth0/address").strip()
        sh("nsenter", f"--net={spoofer}", "ip", "neigh", "replace", target, "lladdr", mac, "dev", "eth0")
        assert _datagram(spoofer, owned, target, inside) is None
        assert _datagram(owner, owned, target, inside) == owned
        assert _guard_counted(node, "not its address"), _guard(node)
        if family == 6:  # nor may it tell its link that another's address is its own
            before = _guard_packets(node, "advertises another")
            _advertise(spoofer, owned)
            assert _guard_packets(node, "advertises another") == before + 1, _guard(node)
    finally:
        for pod_id, _, _ in pods:
            remove_pod(server, pod_id)


def test_pods_on_a_shared_bridge_send_each_other_nothing_but_unicast(cni: tuple[Server, Node]) -> None:
    """On the CNI bridge all tenants' pods share one link: a pod's broadcast, its multicast and
    its packets to link-local addresses would reach another tenant's pod without any routing
    (so without the tenant rules). Each is dropped at the sender's port; a unicast datagram
    from the node arrives."""
    server, node = cni
    pods = [run_pod(server, name, ns) for name, ns in (("ux", "team-ux"), ("uy", "team-uy"))]
    try:
        (_, x4, sender), (_, y4, receiver) = pods
        (_, x6, _), (_, y6, _) = in_family(server, pods, 6)
        y_link = _link_local(receiver)
        net = ipaddress.ip_interface(f"{y4}/16").network
        for source, target, rule in ((x4, str(net.broadcast_address), "IPv4 to many"),
                                     (x6, "ff02::1%eth0", "IPv6 to many"),
                                     (x6, f"{y_link}%eth0", "to link-local")):
            assert _datagram(sender, source, target, receiver) is None, target
            assert _guard_counted(node, rule), (rule, _guard(node))
        assert _datagram(node.path, "", y6, receiver) is not None
    finally:
        for pod_id, _, _ in pods:
            remove_pod(server, pod_id)


def _advertise(netns: str, address: str) -> None:
    """An unsolicited neighbour advertisement to all nodes, from NETNS: ADDRESS is at its MAC."""
    send = ("import socket, struct, ipaddress\n"
            "mac = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))\n"
            f"body = struct.pack('!BBHI', 136, 0, 0, 1 << 29) + ipaddress.IPv6Address('{address}').packed\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)\n"
            "s.sendto(body + bytes([2, 1]) + mac, ('ff02::1%eth0', 0))\n")
    sh("nsenter", f"--net={netns}", sys.executable, "-c", send)


def _backend(backend: str, request: pytest.FixtureRequest) -> tuple[Server, Node]:
    if backend == "cni":
        return request.getfixturevalue("cni")
    return request.getfixturevalue("server"), request.getfixturevalue("node")


def _guard(node: Node) -> str:
    return sh("nsenter", f"--net={node.path}", "nft", "list", "table", "bridge", "stockade")


def _guard_counted(node: Node, rule: str) -> bool:
    """Whether the port guard rules whose comments end in RULE have dropped a packet."""
    return _guard_packets(node, rule) > 0


def _guard_packets(node: Node, rule: str) -> int:
    lines = [line for line in _guard(node).splitlines() if f': {rule}"' in line]
    return sum(int(line.split("packets ")[1].split()[0]) for line in lines)


def _link_local(netns: str) -> str:
    """eth0's link-local address once it may be used (its duplicate detection over)."""
    deadline = time.monotonic() + 10
    while True:
        out = sh("nsenter", f"--net={netns}", "ip", "-6", "-o", "addr", "show", "eth0", "scope", "link")
        if out and "tentative" not in out:
            return out.split()[3].split("/")[0]
        assert time.monotonic() < deadline, out
        time.sleep(0.1)


def _datagram(sender: str, source: str, target: str, receiver: str) -> str | None:
    """Send a UDP datagram from SOURCE ("": the kernel's choice) in namespace SENDER to
    TARGET:9999; who arrived as its source in namespace RECEIVER (None: nothing)."""
    listen = ("import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
              "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
              "s.bind(('::', 9999))\nprint('ready', flush=True)\ns.settimeout(2)\n"
              "try:\n    print(s.recvfrom(64)[1][0].removeprefix('::ffff:'))\n"
              "except TimeoutError:\n    print('nothing')\n")
    proc = subprocess.Popen(["nsenter", f"--net={receiver}", sys.executable, "-c", listen],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    family = "AF_INET6" if ":" in target else "AF_INET"
    send = (f"import socket\ns = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)\n"
            + (f"s.bind(('{source}', 0))\n" if source else "") + f"s.sendto(b'x', ('{target}', 9999))\n")
    sh("nsenter", f"--net={sender}", sys.executable, "-c", send)
    got = proc.stdout.readline().strip()
    proc.wait()
    return None if got == "nothing" else got


def reachability_matrix(server: Server, node: Node, family: int, expect_denials: bool = False) -> None:
    conditions = server.runtime.Status(pb.StatusRequest()).status.conditions
    assert [(c.type, c.status) for c in conditions] == [("RuntimeReady", True), ("NetworkReady", True)]
    pods = [run_pod(server, name, ns) for name, ns in (("a1", "team-a"), ("a2", "team-a"), ("b1", "team-b"))]
    try:
        pods = in_family(server, pods, family)
        for _, ip, netns in pods:
            assert ip.startswith("10.2" if family == 4 else "fd00:2"), ip
            node.listen(netns)
        node.listen(node.path)  # the node's own addresses answer too, when anything reaches them
        node.listen(f"/run/netns/{node.ext}", EXT_ALLOWED[1], EXT_ALLOWED[1])
        node.listen(f"/run/netns/{node.ext}", EXT_OTHER[1], EXT_OTHER[1])
        if family == 4:
            gateway_a = pods[0][1].rsplit(".", 1)[0] + ".1"
            node_ip, metadata, ext = "192.0.2.1", METADATA, EXT_ALLOWED[0]
        else:
            gateway_a = str(ipaddress.ip_interface(f"{pods[0][1]}/72").network.network_address + 1)
            node_ip, metadata, ext = EXT6["node"], EXT6["metadata"], EXT6["ext"]
        for i, (_, _, netns) in enumerate(pods):
            got = reach(netns, every_protocol(pods))
            same = [j < 2 if i < 2 else j == 2 for j in range(3)]
            assert got == [s for s in same for _ in range(3)], (i, got)
            to_node = reach(netns, [("tcp", gateway_a, TCP), ("udp", node_ip, UDP),
                                    ("icmp", node_ip, 0), ("tcp", metadata, TCP), ("icmp", metadata, 0)])
            assert to_node == [False] * 5, (i, to_node)
            egress = reach(netns, [("tcp", ext, EXT_ALLOWED[1]), ("tcp", ext, EXT_OTHER[1]),
                                   ("udp", ext, EXT_ALLOWED[1])])
            assert egress == ([True, False, False] if i < 2 else [False, False, False]), (i, egress)
        assert reach(node.path, every_protocol(pods)) == [True] * 9
        if expect_denials:  # `stockade doctor` in the node's namespace: backend, tenants, denials
            out = sh("nsenter", f"--net={node.path}", STOCKADE, "doctor", "--json", "--cri-config",
                     str(server.base / "stockade.toml"))
            check = next(c for c in json.loads(out)["checks"] if c["name"] == "tenant network")
            assert check["status"] == "ok", check
            assert check["detail"].startswith("bridge, dual-stack: 2 tenants"), check
            parts = check["detail"].split("(", 1)[1].split(";")
            counts = {part.split(":")[0].strip(): part for part in parts}
            assert "packets denied" in counts["team-a"] and " 0 packets" not in counts["team-a"], counts
            # and each denial is an event in the stream `stockade events` reads
            b_ip = pods[2][1] if family == 4 else f"[{pods[2][1]}]"
            deadline = time.monotonic() + 5
            while True:
                lines = (server.base / "events.jsonl").read_text().splitlines()
                seen = [json.loads(line) for line in lines if f"{b_ip}:{TCP}/tcp" in line]
                if seen or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert seen and seen[0]["tenant"] == "team-a" and seen[0]["hook"] == "nftables", lines[-5:]
            assert seen[0]["pod_id"] in {pods[0][0], pods[1][0]} and "other tenants" in seen[0]["object"]
    finally:
        for pod_id, _, _ in pods:
            remove_pod(server, pod_id)


def test_a_pod_annotation_narrows_its_tenants_egress_and_never_widens_it(server: Server, node: Node) -> None:
    from cri import status_code

    (server.base / "tenants" / "team-n.yaml").write_text(
        "egress:\n  - cidr: 192.0.2.0/24\n    ports: [9100-9101]\n    protocol: tcp\n"
        "  - cidr: fd00:2::/64\n    ports: [9100-9101]\n    protocol: tcp\n")
    for port in (9100, 9101):
        node.listen(f"/run/netns/{node.ext}", port, port)
    key = "io.stockade.network/egress"
    plain = run_pod(server, "n1", "team-n")
    narrow = run_pod(server, "n2", "team-n",
                     annotations={key: "[{cidr: 192.0.2.2/32, ports: [9100], protocol: tcp}]"})
    try:
        targets = [("tcp", "192.0.2.2", 9100), ("tcp", "192.0.2.2", 9101)]
        assert reach(plain[2], targets) == [True, True]
        assert reach(narrow[2], targets) == [True, False]
        six = [("tcp", EXT6["ext"], 9100), ("tcp", EXT6["ext"], 9101)]
        assert reach(plain[2], six) == [True, True]
        assert reach(narrow[2], six) == [False, False]  # its own egress has no IPv6 rule
        before = links(node)
        for wider in ("[{cidr: 192.0.2.0/23}]", "[{cidr: 192.0.2.2/32, ports: [9102]}]",
                      "[{cidr: 192.0.2.2/32, ports: [9100], protocol: udp}]"):
            metadata = pb.PodSandboxMetadata(name="n3", namespace="team-n", uid="uid-n3")
            config = pb.PodSandboxConfig(metadata=metadata, annotations={key: wider})
            request = pb.RunPodSandboxRequest(config=config)
            code, message = status_code(server.runtime.RunPodSandbox, request)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "not within the tenant" in message, message
        assert links(node) == before
    finally:
        for pod_id, _, _ in (plain, narrow):
            remove_pod(server, pod_id)
        (server.base / "tenants" / "team-n.yaml").unlink()


def test_removing_a_pod_removes_its_link_address_and_rules(server: Server, node: Node) -> None:
    pod_id, ip, _ = run_pod(server, "gone", "team-c")
    before = links(node)
    assert any(n.startswith("stkp-") for n in before) and any(n.startswith("stkt-") for n in before)
    assert "tenant_" in rules(node)
    # StopPodSandbox reclaims the network (the CRI asks so); RemovePodSandbox then removes the rest
    server.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    status = server.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
    assert status.network.ip == "" and not (server.base / "state/network/addrs" / ip).exists()
    remove_pod(server, pod_id)
    remove_pod(server, pod_id)  # kubelet retries: fine
    after = links(node)
    assert not any(n.startswith(("stkp-", "stkt-")) for n in after), after
    assert not (server.base / "state/network/addrs" / ip).exists()
    assert "tenant_" not in rules(node)


def test_fifty_pods_get_fifty_addresses(server: Server, node: Node) -> None:
    pods = [run_pod(server, f"many-{i}", "team-many") for i in range(50)]
    try:
        addresses = [ip for _, ip, _ in pods]
        assert len(set(addresses)) == 50 and all(addresses)
        assert len({ip6_of(server, pod_id) for pod_id, _, _ in pods} - {""}) == 50
        leases = {p.name: p.read_text() for p in (server.base / "state/network/addrs").iterdir()}
        assert {leases[ip] for ip in addresses} == {pod_id for pod_id, _, _ in pods}
    finally:
        for pod_id, _, _ in pods:
            remove_pod(server, pod_id)
    assert list((server.base / "state/network/addrs").iterdir()) == []


def test_a_host_port_reaches_its_pod_from_the_nodes_loopback(server: Server, node: Node) -> None:
    mapping = pb.PortMapping(protocol=pb.TCP, container_port=TCP, host_port=18080)
    udp = pb.PortMapping(protocol=pb.UDP, container_port=UDP, host_port=18081)
    pod_id, _, netns = run_pod(server, "web", "team-d", port_mappings=[mapping, udp])
    try:
        node.listen(netns)
        assert reach(node.path, [("tcp", "127.0.0.1", 18080), ("udp", "127.0.0.1", 18081),
                                 ("tcp", "192.0.2.1", 18080), ("tcp", EXT6["node"], 18080),
                                 ("udp", EXT6["node"], 18081)]) == [True] * 5
    finally:
        remove_pod(server, pod_id)
    assert reach(node.path, [("tcp", "127.0.0.1", 18080), ("tcp", EXT6["node"], 18080)]) == [False, False]


def test_a_killed_server_keeps_every_rule_and_address(node: Node, server: Server) -> None:
    """SIGKILL, then a new server on the same state: the pods' addresses, links and rules are
    as they were (a cross-tenant probe is still refused, a same-tenant one still answered),
    and the next pod gets an address no other has."""
    a, b, c = (run_pod(server, name, ns) for name, ns in (("k1", "team-k"), ("k2", "team-k"),
                                                          ("k3", "team-l")))
    for _, _, netns in (a, b, c):
        node.listen(netns)
    table = rules(node)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    argv = json.loads(json.dumps(server.proc.args))
    restarted = Server(server.base, config=Path(argv[argv.index("--config") + 1]), netns=node.path,
                       env=own_events(server.base))
    server.__dict__.update(restarted.__dict__)  # the module's other tests go on with this one
    time.sleep(0.2)
    assert _without_counters(rules(node)) == _without_counters(table)
    assert reach(a[2], [("tcp", b[1], TCP), ("tcp", c[1], TCP)]) == [True, False]
    (_, b6, _), (_, c6, _) = in_family(server, [b, c], 6)
    assert reach(a[2], [("tcp", b6, TCP), ("tcp", c6, TCP)]) == [True, False]
    d = run_pod(server, "k4", "team-k")
    assert d[1] not in {a[1], b[1], c[1]}
    assert ip6_of(server, d[0]) not in {ip6_of(server, p[0]) for p in (a, b, c)}
    for pod_id, _, _ in (a, b, c, d):
        remove_pod(server, pod_id)


def _without_counters(text: str) -> str:
    import re

    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def test_kubelets_pod_cidr_is_taken_while_no_pod_has_an_address(server: Server, node: Node) -> None:
    """UpdateRuntimeConfig with the node's podCIDR: the next pod's address comes from it; back
    to the configured one afterwards (the module's other tests expect it)."""
    def update(cidr: str) -> None:
        config = pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr=cidr))
        server.runtime.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(runtime_config=config))

    assert list((server.base / "state/network/tenants").iterdir()) == []  # every tenant's subnet freed
    update("10.216.0.0/16,fd00:216::/64")
    pod_id, ip, _ = run_pod(server, "cidr", "team-cidr")
    try:
        assert ip.startswith("10.216."), ip
        assert ip6_of(server, pod_id).startswith("fd00:216::"), ip6_of(server, pod_id)
        update("10.217.0.0/16")  # a pod has an address: not taken
        other, ip2, _ = run_pod(server, "cidr2", "team-cidr2")
        assert ip2.startswith("10.216."), ip2
        remove_pod(server, other)
    finally:
        remove_pod(server, pod_id)
    update(f"{POD_CIDR},{POD_CIDR6}")


def test_bad_input_leaves_nothing(server: Server, node: Node) -> None:
    """A tenant policy that does not parse fails that tenant's new pod with the file and line,
    leaving no link, address, rule or record; a pod whose network namespace vanished is still
    removed, its address freed."""
    from cri import status_code

    bad = Path(server.base / "tenants" / "team-bad.yaml")
    bad.write_text("egress:\n  - cidr: 10.0.0.0/8\n    portz: [80]\n")
    before = links(node)
    metadata = pb.PodSandboxMetadata(name="bad", namespace="team-bad", uid="uid-bad")
    code, message = status_code(server.runtime.RunPodSandbox,
                                pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(metadata=metadata)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "team-bad.yaml:3" in message and "portz" in message
    assert links(node) == before and "team-bad" not in rules(node)
    assert server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    assert list((server.base / "state/network/addrs").iterdir()) == []
    bad.unlink()

    pod_id, ip, netns = run_pod(server, "vanish", "team-v")
    subprocess.run(["umount", netns], check=True)  # its namespace is gone (no process held it)
    remove_pod(server, pod_id)
    assert not (server.base / "state/network/addrs" / ip).exists()
    assert not any(n.startswith(("stkp-", "stkt-")) for n in links(node))


def test_a_cni_result_with_ipv6_the_server_was_not_told_of_is_refused() -> None:
    """A conflist that hands out IPv6 while pod_cidr6 is unset: the tenant rules could not tell
    those pods' IPv6 traffic apart, so the pod fails, naming the conflist and pod_cidr6, and
    CNI DEL gives everything back (host-local's leases, the cached result, the link)."""
    from cri import status_code

    node, base = Node(), fast_tmp()
    try:
        srv = Server(base, config=cni_config(base, cidr6=""), netns=node.path, env=own_events(base))
        try:
            before = links(node)
            metadata = pb.PodSandboxMetadata(name="v6", namespace="team-v6", uid="uid-v6")
            code, message = status_code(srv.runtime.RunPodSandbox,
                                        pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(metadata=metadata)))
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, message)
            assert "pod_cidr6 is not set" in message and "10-pods.conflist" in message, message
            assert srv.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
            leases = [p.name for p in (base / "cni-ipam").rglob("*") if p.is_file()]
            assert not [name for name in leases if ":" in name or name.startswith("10.")], leases
            assert list((base / "state/network/cni").iterdir()) == []
            assert {n for n in links(node) if n.startswith("veth")} <= before
        finally:
            assert srv.stop() == 0
    finally:
        node.remove()
        shutil.rmtree(base, ignore_errors=True)


def test_an_exhausted_range_and_an_overlapping_pod_cidr(tmp_path: Path) -> None:
    """tenant_prefix 29: five pods per tenant, the sixth RESOURCE_EXHAUSTED with nothing made;
    a pod_cidr (or pod_cidr6) over an address the node has keeps the server from starting,
    saying which."""
    from cri import status_code

    node = Node()
    base = fast_tmp()
    try:
        config = base / "stockade.toml"
        config.write_text('[stockade]\nnetwork = "bridge"\n'
                          '[stockade.pod_network]\npod_cidr = "10.214.0.0/24"\ntenant_prefix = 29\n')
        srv = Server(base, config=config, netns=node.path, env=own_events(base))
        try:
            pods = [run_pod(srv, f"p{i}", "team-x") for i in range(5)]
            metadata = pb.PodSandboxMetadata(name="p5", namespace="team-x", uid="uid-p5")
            code, message = status_code(srv.runtime.RunPodSandbox,
                                        pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(metadata=metadata)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "no free address" in message, message
            assert sum(n.startswith("stkp-") for n in links(node)) == 5
            for pod_id, _, _ in pods:
                remove_pod(srv, pod_id)
        finally:
            assert srv.stop() == 0
        sh("ip", "-n", node.name, "addr", "add", "10.214.0.77/24", "dev", "lo")
        with pytest.raises(AssertionError, match="pod_cidr 10.214.0.0/24 overlaps 10.214.0.77/24 on lo"):
            Server(base, config=config, netns=node.path, env=own_events(base))
        config.write_text('[stockade]\nnetwork = "bridge"\n[stockade.pod_network]\n'
                          'pod_cidr = "10.215.0.0/24"\npod_cidr6 = "fd00:214::/64"\n')
        sh("ip", "-n", node.name, "addr", "add", "fd00:214::77/64", "dev", "lo")
        with pytest.raises(AssertionError, match="pod_cidr6 fd00:214::/64 overlaps fd00:214::77/64 on lo"):
            Server(base, config=config, netns=node.path, env=own_events(base))
    finally:
        node.remove()
        shutil.rmtree(base, ignore_errors=True)


PROBE_METADATA = f"nc -w 2 {METADATA} 80 </dev/null 2>&1; echo rc=$?; sleep 30"


def test_egress_programs_only_for_pods_on_the_nodes_network(tmp_path: Path) -> None:
    """With the BPF agent in the server: a pod behind the tenant rules has no egress program on
    its container's cgroup (the rules refuse the metadata address: dropped, the probe times
    out); a hostNetwork pod shares the node's namespace, where only connect4 on its cgroup stands
    between it and the metadata address (EPERM). No egress program sits on the parent."""
    from bpf_helpers import cleanup_agent, make_agent
    from images import busybox_image
    from stockade.bpf import attach, maps
    from stockade.runtime.images.archive import import_archive
    from stockade.runtime.images.store import Store

    node, agent, base, srv = Node(), make_agent(tmp_path, "net-"), fast_tmp(), None
    image = "localhost/test/busybox:1"
    try:
        (base / "images").mkdir(parents=True)
        import_archive(Store(str(base / "images")), str(busybox_image(tmp_path / "bb.tar", image)))
        config = base / "stockade.toml"
        config.write_text(
            f'[stockade]\nnetwork = "bridge"\ndefault_handler = "plain"\n'
            f'cgroup_parent = "{Path(agent.cgroup_root).name}"\n'
            f'[stockade.handlers.plain]\nprofile = "runtime-default"\nbpf_policy = "network-only"\n'
            f'[stockade.handlers.hostnet]\nprofile = "runtime-default"\nbpf_policy = "network-only"\n'
            f'host_namespaces = true\n[stockade.pod_network]\npod_cidr = "{POD_CIDR}"\n')
        srv = Server(base, config=config, netns=node.path, bpf_agent=True,
                     env=dict(agent.env, STOCKADE_EVENTS_FILE=str(base / "events.jsonl")))
        seen = {}
        for handler, mode in (("plain", pb.POD), ("hostnet", pb.NODE)):
            options = pb.NamespaceOption(network=mode, pid=pb.CONTAINER)
            metadata = pb.PodSandboxMetadata(name=handler, namespace="team-a", uid=f"uid-{handler}")
            cfg = pb.PodSandboxConfig(metadata=metadata, hostname=handler, log_directory=str(base / handler),
                                      linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
                                          namespace_options=options)))
            pod_id = srv.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler)
                                               ).pod_sandbox_id
            container = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name="probe"), image=pb.ImageSpec(image=image),
                command=["sh", "-c", PROBE_METADATA], log_path="probe.log",
                linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=options)))
            cid = srv.runtime.CreateContainer(pb.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=container, sandbox_config=cfg)).container_id
            srv.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
            log = base / handler / "probe.log"
            deadline = time.monotonic() + 20
            while "rc=" not in (log.read_text() if log.exists() else ""):
                assert time.monotonic() < deadline, f"{handler}: no probe result"
                time.sleep(0.1)
            cgroup = next(Path(attach.unified_mount()).glob(f"{Path(agent.cgroup_root).name}/**/{cid}"))
            seen[handler] = (maps.egress_attached(str(cgroup)), log.read_text())
            state = json.loads((base / "state/oci" / cid / "state.json").read_text())
            seen[handler] = (*seen[handler], state["egress"])
            remove_pod(srv, pod_id)
        assert seen["plain"][0] == 0 and "Operation not permitted" not in seen["plain"][1], seen
        assert "rc=0" not in seen["plain"][1] and seen["plain"][2] == "network", seen  # the tenant rules
        assert seen["hostnet"][0] == len(maps.EGRESS_PROGRAMS) and seen["hostnet"][2] == "cgroup", seen
        assert "Operation not permitted" in seen["hostnet"][1], seen
        assert maps.egress_attached(agent.cgroup_root) == 0
    finally:
        if srv is not None:
            assert srv.stop() == 0
        cleanup_agent(agent)
        node.remove()
        shutil.rmtree(base, ignore_errors=True)
