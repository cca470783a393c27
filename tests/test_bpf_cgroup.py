"""cgroup-BPF enforcement on this host: agent, pins, map client, sock_create, connect/sendmsg,
sysctl, device filter, events, audit mode, restart. Processes run in a test cgroup below a
private Stockade parent and in network namespaces the tests create."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from bpf_helpers import (
    PYTHON,
    cleanup_agent,
    in_cgroup,
    make_agent,
    no_bcc_imported,
    op_connect,
    op_open,
    op_sendto,
    op_socket,
    op_sysctl_read,
    op_sysctl_write,
)
from kernel import needs_root, require  # noqa: F401 (needs_root: a fixture, used by name)
from stockade.bpf import maps
from stockade.bpf.policy import compile_policy, parse_policy
from stockade.runtime.resources import DeviceRule

pytestmark = pytest.mark.usefixtures("needs_root")  # bpf(2) and cgroups

NET_POLICY = """
name: test-net
mode: {mode}
kernel: {{sysctl_write: deny}}
network:
  families: [unix, inet, netlink]
  raw_sockets: deny
  egress:
    default: deny
    rules:
      - {{to: 127.0.0.1/32, action: allow}}
      - {{to: "::1/128", action: allow}}
"""


def compiled(mode: str = "enforce"):
    return compile_policy(parse_policy(NET_POLICY.format(mode=mode), "test-net.yaml"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = make_agent(tmp_path_factory.mktemp("agent"))
    proc = a.run("--load-only", "--no-lsm", check=False)
    require(proc.returncode == 0, f"cgroup BPF programs do not load here: {proc.stderr.strip()}")
    yield a
    cleanup_agent(a)


@pytest.fixture
def container(agent, request):
    """A container cgroup under the agent's parent; policy entries and the cgroup go afterwards."""
    path, cgid = agent.container_cgroup(f"ctr-{request.node.name[:40]}")
    yield path, cgid
    maps.remove_policy(cgid, agent.pin_dir)
    assert maps.entries_for(cgid, agent.pin_dir) == {"stk_policies": 0, "stk_net": 0, "stk_files": 0}
    os.rmdir(path)


def net_ops(ports):
    return {
        "connect_allowed": op_connect("127.0.0.1", ports["tcp"]),
        "connect_denied": op_connect("127.0.0.2", ports["tcp"]),
        "sendmsg_allowed": op_sendto("127.0.0.1", 9),
        "sendmsg_denied": op_sendto("127.0.0.2", 9),
        "raw": op_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        "inet_stream": op_socket(socket.AF_INET, socket.SOCK_STREAM),
        "unix": op_socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "sysctl_write": op_sysctl_write("net.ipv4.ping_group_range"),
        "sysctl_read": op_sysctl_read("net.ipv4.ping_group_range"),
    }


def test_agent_pins_everything_and_never_the_root_cgroup(agent):
    assert maps.agent_running(agent.pin_dir)
    assert {"cgroup_sock", "cgroup_sock_addr", "cgroup_sysctl"} <= maps.loaded_layers(agent.pin_dir)
    assert agent.cgroup_root != os.path.dirname(agent.cgroup_root) and os.path.basename(agent.cgroup_root)
    from stockade.bpf import agent as agent_mod

    with pytest.raises(Exception, match="below the cgroup2 root"):
        agent_mod.cgroup_level(agent_mod.unified_mount())
    # the runtime prunes empty parents; the agent's keeper child keeps its attach point alive
    with pytest.raises(OSError):
        os.rmdir(agent.cgroup_root)
    # the egress programs are pinned, not attached at the parent: they go on container cgroups
    assert maps.egress_attached(agent.cgroup_root) == 0


def test_egress_socket_and_sysctl_rules_apply_inside_only(agent, container):
    path, cgid = container
    maps.install_policy(cgid, "ctr-net", compiled(), pin_dir=agent.pin_dir)
    inside = in_cgroup(path, net_ops)
    assert inside["connect_allowed"] == "ok"
    assert inside["connect_denied"] == "EPERM"
    assert inside["sendmsg_allowed"] == "ok"
    assert inside["sendmsg_denied"] == "EPERM"
    assert inside["raw"] == "EPERM"
    assert inside["inet_stream"] == "ok" and inside["unix"] == "ok"
    assert inside["sysctl_write"] == "EPERM" and inside["sysctl_read"] == "ok"
    outside = in_cgroup(None, net_ops)
    assert all(v == "ok" for v in outside.values()), outside


def test_ipv6_rules_and_v4_mapped_addresses(agent, container):
    path, cgid = container

    def ops(ports):
        return {
            "v6_allowed": op_connect("::1", ports["tcp6"], socket.AF_INET6),
            "v6_denied": op_connect("::2", 80, socket.AF_INET6),
            "mapped_denied": op_connect("::ffff:127.0.0.2", ports["tcp"], socket.AF_INET6),
            "udp6_denied": op_sendto("::2", 9, socket.AF_INET6),
        }

    policy = compile_policy(
        parse_policy(
            NET_POLICY.format(mode="enforce").replace(
                "families: [unix, inet, netlink]", "families: [unix, inet, inet6, netlink]"
            ),
            "v6.yaml",
        )
    )
    maps.install_policy(cgid, "ctr-v6", policy, pin_dir=agent.pin_dir)
    result = in_cgroup(path, ops)
    assert result == {
        "v6_allowed": "ok",
        "v6_denied": "EPERM",
        "mapped_denied": "EPERM",
        "udp6_denied": "EPERM",
    }


def test_socket_family_rule_for_inet6(agent, container):
    path, cgid = container
    maps.install_policy(cgid, "ctr-fam", compiled(), pin_dir=agent.pin_dir)
    result = in_cgroup(path, lambda ports: {"inet6": op_socket(socket.AF_INET6, socket.SOCK_STREAM)})
    assert result["inet6"] == "EPERM"


def test_port_ranges_in_rules(agent, container):
    path, cgid = container
    policy = compile_policy(
        parse_policy(
            """
name: ports
network:
  egress:
    default: allow
    rules:
      - {to: 127.0.0.2/32, ports: 1-1023, action: deny}
""",
            "ports.yaml",
        )
    )
    maps.install_policy(cgid, "ctr-ports", policy, pin_dir=agent.pin_dir)
    result = in_cgroup(
        path, lambda ports: {"low": op_sendto("127.0.0.2", 53), "high": op_sendto("127.0.0.2", 5353)}
    )
    assert result == {"low": "EPERM", "high": "ok"}


def test_two_containers_with_different_policies(agent):
    a_path, a_id = agent.container_cgroup("ctr-a")
    b_path, b_id = agent.container_cgroup("ctr-b")
    try:
        maps.install_policy(a_id, "ctr-a", compiled(), pin_dir=agent.pin_dir)
        open_policy = compile_policy(parse_policy("name: open\n", "open.yaml"))
        maps.install_policy(b_id, "ctr-b", open_policy, pin_dir=agent.pin_dir)
        def ops(ports):
            return {"denied": op_connect("127.0.0.2", ports["tcp"]),
                    "raw": op_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)}

        assert in_cgroup(a_path, ops) == {"denied": "EPERM", "raw": "EPERM"}
        assert in_cgroup(b_path, ops) == {"denied": "ok", "raw": "ok"}
        # a cgroup without any policy under the parent is untouched as well
        c_path, _ = agent.container_cgroup("ctr-none")
        try:
            assert in_cgroup(c_path, ops) == {"denied": "ok", "raw": "ok"}
        finally:
            os.rmdir(c_path)
    finally:
        for cgid, path in ((a_id, a_path), (b_id, b_path)):
            maps.remove_policy(cgid, agent.pin_dir)
            os.rmdir(path)


def test_nested_cgroup_inherits_the_container_policy(agent, container):
    path, cgid = container
    maps.install_policy(cgid, "ctr-nested", compiled(), pin_dir=agent.pin_dir)
    inner = os.path.join(path, "inner")
    os.mkdir(inner)
    try:
        result = in_cgroup(inner, lambda ports: {"denied": op_connect("127.0.0.2", ports["tcp"])})
        assert result == {"denied": "EPERM"}
    finally:
        os.rmdir(inner)


def test_registered_nested_cgroup_cannot_shed_the_outer_policy(agent, container):
    path, cgid = container
    maps.install_policy(cgid, "ctr-outer", compiled(), pin_dir=agent.pin_dir)
    inner = os.path.join(path, "inner")
    os.mkdir(inner)
    inner_id = os.stat(inner).st_ino
    try:
        # a policy for the nested cgroup that allows everything: the outer one still decides
        open_policy = compile_policy(parse_policy("name: open\n", "open.yaml"))
        maps.install_policy(inner_id, "ctr-inner", open_policy, pin_dir=agent.pin_dir)
        ops = lambda ports: {"c": op_connect("127.0.0.2", ports["tcp"]),  # noqa: E731
                             "raw": op_socket(socket.AF_INET, socket.SOCK_RAW, 1)}
        assert in_cgroup(inner, ops) == {"c": "EPERM", "raw": "EPERM"}
    finally:
        maps.remove_policy(inner_id, agent.pin_dir)
        os.rmdir(inner)


def test_container_registered_below_an_unregistered_cgroup(agent):
    """A layout with a pod level: the walk goes on below the parent's child when it has no policy."""
    pod, _ = agent.container_cgroup("pod-x")
    ctr = os.path.join(pod, "ctr")
    os.mkdir(ctr)
    ctr_id = os.stat(ctr).st_ino
    try:
        maps.install_policy(ctr_id, "ctr-deep", compiled(), pin_dir=agent.pin_dir)
        ops = lambda ports: {"c": op_connect("127.0.0.2", ports["tcp"])}  # noqa: E731
        assert in_cgroup(ctr, ops) == {"c": "EPERM"}
        assert in_cgroup(pod, ops) == {"c": "ok"}
    finally:
        maps.remove_policy(ctr_id, agent.pin_dir)
        os.rmdir(ctr)
        os.rmdir(pod)


PREFIX_RULES = """
name: prefixes
network:
  families: [inet, inet6]
  egress:
    default: allow
    rules:
      - {to: 127.0.0.0/8, action: deny}
      - {to: 127.0.0.0/24, ports: 1-1000, action: allow}
      - {to: 127.0.0.2/32, ports: 53, action: deny}
      - {to: "::/0", action: deny}
      - {to: "::1/128", action: allow}
"""


def _prefix_ops(ports):
    return {
        "slash24_in_range": op_sendto("127.0.0.1", 9),
        # the longest prefix's ports do not cover it: the default decides, not the /8
        "slash24_out_of_range": op_sendto("127.0.0.1", 5353),
        "slash32_port": op_sendto("127.0.0.2", 53),
        "slash32_other_port": op_sendto("127.0.0.2", 54),
        "slash8": op_sendto("127.0.1.1", 9),
        "slash8_tcp": op_connect("127.0.1.1", ports["tcp"]),
        "v6_any": op_sendto("::2", 9, socket.AF_INET6),
        "v6_loopback": op_connect("::1", ports["tcp6"], socket.AF_INET6),
        "mapped": op_sendto("::ffff:127.0.1.1", 9, socket.AF_INET6),
    }


PREFIX_EXPECTED = {
    "slash24_in_range": "ok", "slash24_out_of_range": "ok", "slash32_port": "EPERM",
    "slash32_other_port": "ok", "slash8": "EPERM", "slash8_tcp": "EPERM", "v6_any": "EPERM",
    "v6_loopback": "ok", "mapped": "EPERM",
}


@pytest.mark.parametrize("fillers", [0, maps.NET_INLINE])
def test_longest_prefix_decides_inline_and_in_the_trie(agent, container, fillers):
    """The same rules, once inline in the policy value, once (with unrelated extra rules) in the
    LPM trie: identical verdicts."""
    path, cgid = container
    text = PREFIX_RULES + "".join(f"      - {{to: 10.{i}.0.0/16, action: deny}}\n" for i in range(fillers))
    policy = compile_policy(parse_policy(text, "prefixes.yaml"))
    maps.install_policy(cgid, "ctr-prefix", policy, pin_dir=agent.pin_dir)
    installed = maps.lookup_policy(cgid, agent.pin_dir)
    in_trie = fillers > 0
    assert installed["egress_in_trie"] is in_trie
    assert maps.entries_for(cgid, agent.pin_dir)["stk_net"] == (5 + fillers if in_trie else 0)
    assert in_cgroup(path, _prefix_ops) == PREFIX_EXPECTED
    # and back: a reinstall with the small set leaves nothing in the trie
    small = compile_policy(parse_policy(PREFIX_RULES, "prefixes.yaml"))
    maps.install_policy(cgid, "ctr-prefix", small, pin_dir=agent.pin_dir)
    assert maps.entries_for(cgid, agent.pin_dir)["stk_net"] == 0
    assert in_cgroup(path, _prefix_ops) == PREFIX_EXPECTED


def test_remove_policy_restores_and_leaves_no_entry(agent, container):
    path, cgid = container
    maps.install_policy(cgid, "ctr-rm", compiled(), pin_dir=agent.pin_dir)
    # two egress rules: inline in the policy value, nothing in the trie
    assert maps.entries_for(cgid, agent.pin_dir) == {"stk_policies": 1, "stk_net": 0, "stk_files": 0}
    maps.remove_policy(cgid, agent.pin_dir)
    assert maps.entries_for(cgid, agent.pin_dir) == {"stk_policies": 0, "stk_net": 0, "stk_files": 0}
    assert in_cgroup(path, lambda ports: {"c": op_connect("127.0.0.2", ports["tcp"])}) == {"c": "ok"}
    maps.remove_policy(cgid, agent.pin_dir)  # idempotent


def test_start_path_is_bcc_free(agent, container):
    """Installing and removing a policy needs no bcc (how fast: bench/README.md, not a test)."""
    assert no_bcc_imported(["stockade.bpf.maps", "stockade.bpf.policy", "stockade.bpf.device_filter"])
    _, cgid = container
    policy = compiled()
    for _ in range(3):
        maps.install_policy(cgid, "ctr-fast", policy, pin_dir=agent.pin_dir)
        maps.remove_policy(cgid, agent.pin_dir)


def test_install_without_agent_is_refused(tmp_path):
    from stockade.runtime.errors import NotSupported

    with pytest.raises(NotSupported, match="not pinned"):
        maps.install_policy(12345, "x", compiled(), pin_dir=str(tmp_path / "no-agent"))


def test_events_audit_mode_and_cli(agent, container):
    path, cgid = container
    # the event reader runs as the agent would in production
    reader = subprocess.Popen(
        [PYTHON, "-m", "stockade.bpf.agent", "--foreground", "--no-lsm"],
        env=agent.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(reader.stdout.readline())["cgroup_programs"] == "pinned"
        maps.install_policy(
            cgid, "ctr-audit-0123456789", compiled("audit"), tenant="tenant-a", pin_dir=agent.pin_dir
        )
        result = in_cgroup(
            path,
            lambda ports: {
                "denied": op_connect("127.0.0.2", ports["tcp"]),
                "raw": op_socket(socket.AF_INET, socket.SOCK_RAW, 1),
            },
        )
        assert result == {"denied": "ok", "raw": "ok"}, "audit mode must not deny"
        maps.install_policy(
            cgid, "ctr-audit-0123456789", compiled("enforce"), tenant="tenant-a", pin_dir=agent.pin_dir
        )
        assert in_cgroup(path, lambda ports: {"c": op_sendto("127.0.0.2", 7)}) == {"c": "EPERM"}
        want = {("connect4", "audited"), ("sock_create", "audited"), ("sendmsg4", "denied")}
        ours = []
        for _ in range(50):
            if agent.events_file.exists():
                events = [json.loads(line) for line in agent.events_file.read_text().splitlines()]
                ours = [e for e in events if e["cgroup_id"] == cgid]
                if {(e["hook"], e["decision"]) for e in ours} >= want:
                    break
            time.sleep(0.1)
        assert {(e["hook"], e["decision"]) for e in ours} >= want, ours
        connect = next(e for e in ours if e["hook"] == "connect4")
        assert connect["container_id"] == "ctr-audit-0123456789" and connect["tenant"] == "tenant-a"
        assert connect["object"].startswith("127.0.0.2:")
        assert abs(connect["time"] - time.time()) < 60
        cli = subprocess.run(
            [PYTHON, "-m", "stockade.bpf.cli", "events", "--json", "--container", "ctr-audit"],
            env=agent.env,
            capture_output=True,
            text=True,
            check=True,
        )
        lines = [json.loads(line) for line in cli.stdout.splitlines()]
        assert len(lines) == len(ours)
        other = subprocess.run(
            [PYTHON, "-m", "stockade.bpf.cli", "events", "--container", "nope"],
            env=agent.env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert other.stdout == ""
    finally:
        reader.send_signal(signal.SIGTERM)
        reader.wait(timeout=10)
        reader.stdout.close()
        reader.stderr.close()
    assert reader.returncode == 0


def _connect_in(path: str) -> str:
    """What a TCP connect to 127.0.0.2 gives a process in cgroup PATH ("ok" or the errno name)."""
    return in_cgroup(path, lambda ports: {"c": op_connect("127.0.0.2", ports["tcp"])})["c"]


def test_restart_keeps_policies_and_stop_removes_everything(tmp_path):
    a = make_agent(tmp_path, "restart-")
    try:
        first = json.loads(a.run("--load-only", "--no-lsm").stdout)
        assert first["cgroup_programs"] in ("bcc", "cache")
        path, cgid = a.container_cgroup("ctr")
        try:
            maps.install_policy(cgid, "ctr", compiled(), pin_dir=a.pin_dir)
            again = json.loads(a.run("--load-only", "--no-lsm").stdout)
            assert again["cgroup_programs"] == "pinned"  # re-used, not reloaded
            assert _connect_in(path) == "EPERM"
            # stop: programs detached (the egress ones on the container's cgroup too), pins gone,
            # the container is no longer filtered
            a.run("--stop")
            assert not os.path.exists(a.pin_dir)
            assert maps.egress_attached(path) == 0
            assert _connect_in(path) == "ok"
            # a fresh start loads from the bytecode cache, without recompiling
            third = json.loads(a.run("--load-only", "--no-lsm").stdout)
            assert third["cgroup_programs"] == "cache"
            maps.install_policy(cgid, "ctr", compiled(), pin_dir=a.pin_dir)
            maps.attach_egress(path, a.pin_dir)  # what the runtime does when it installs a policy
            assert _connect_in(path) == "EPERM"
            maps.remove_policy(cgid, a.pin_dir)
        finally:
            os.rmdir(path)
    finally:
        cleanup_agent(a)


def test_maps_with_an_older_layout_are_replaced_and_programs_reloaded(tmp_path):
    """An agent upgraded to a new struct stk_policy re-creates the map and reloads the programs
    that still point at the old one, so policies written to the new map are enforced."""
    from stockade.bpf import bpfsys

    a = make_agent(tmp_path, "layout-")
    try:
        a.run("--load-only", "--no-lsm")
        old = maps.pin_path("stk_policies", a.pin_dir)
        os.unlink(old)
        fd = bpfsys.map_create(bpfsys.MAP_HASH, 8, 128, 16, 0, "stk_policies")  # the 128-byte layout
        try:
            bpfsys.obj_pin(fd, old)
        finally:
            os.close(fd)
        again = json.loads(a.run("--load-only", "--no-lsm").stdout)
        assert again["cgroup_programs"] in ("cache", "bcc")  # reloaded, not the stale pins
        path, cgid = a.container_cgroup("ctr")
        try:
            maps.install_policy(cgid, "ctr", compiled(), pin_dir=a.pin_dir)
            assert _connect_in(path) == "EPERM"
            maps.remove_policy(cgid, a.pin_dir)
        finally:
            os.rmdir(path)
    finally:
        cleanup_agent(a)


# -- device filter (cgroup v2 device control, hand-assembled program) ------------------------


def test_device_filter_allows_listed_devices_only(agent):
    from stockade.bpf.device_filter import (
        attach_device_filter,
        attached_device_programs,
        detach_device_filter,
    )

    path, _ = agent.container_cgroup("ctr-dev")
    try:
        rules = [
            DeviceRule(False, "a", access="rwm"),
            DeviceRule(True, "c", 1, 3, "rwm"),  # /dev/null
            DeviceRule(True, "c", 1, 5, "r"),  # /dev/zero read-only
            DeviceRule(True, "c", 1, None, "rw"),
            DeviceRule(False, "c", 1, 7, "w"),  # later deny wins
        ]
        attach_device_filter(path, rules, pin_dir=agent.pin_dir)
        attach_device_filter(path, rules, pin_dir=agent.pin_dir)  # replacing keeps exactly one
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert len(attached_device_programs(fd)) == 1
        finally:
            os.close(fd)
        ops = lambda ports: {  # noqa: E731
            "null_rw": op_open("/dev/null", os.O_RDWR),
            "zero_r": op_open("/dev/zero", os.O_RDONLY),
            "zero_rw": op_open("/dev/zero", os.O_RDWR),
            "full_r": op_open("/dev/full", os.O_RDONLY),
            "full_w": op_open("/dev/full", os.O_WRONLY),
            "random_r": op_open("/dev/urandom", os.O_RDONLY),
            "tty": op_open("/dev/tty", os.O_RDONLY),
        }
        inside = in_cgroup(path, ops, netns=False)
        assert inside["null_rw"] == "ok" and inside["zero_r"] == "ok" and inside["random_r"] == "ok"
        assert inside["zero_rw"] == "ok"  # the wildcard minor rule allows rw on major 1
        assert inside["full_r"] == "ok" and inside["full_w"] == "EPERM"
        assert inside["tty"] == "EPERM"
        # denials reach the agent's event ring
        from stockade.bpf import events

        events.pump(agent.pin_dir, agent.events_file, once=True)
        logged = [json.loads(x) for x in agent.events_file.read_text().splitlines()]
        cgid = os.stat(path).st_ino
        ours = {e["object"] for e in logged if e["hook"] == "device" and e["cgroup_id"] == cgid}
        assert {"c 1:7 w", "c 5:0 r"} <= ours, ours
        assert detach_device_filter(path) == 1
        assert in_cgroup(path, ops, netns=False)["full_w"] == "ok"
        # the kernel's verifier accepts the edge shapes: allow-all, deny-all, empty
        for edge in ([DeviceRule(True)], [DeviceRule(False)], []):
            attach_device_filter(path, edge, pin_dir=agent.pin_dir)
        assert in_cgroup(path, ops, netns=False)["null_rw"] == "EPERM"  # [] denies everything
        attach_device_filter(path, [DeviceRule(True)], pin_dir=agent.pin_dir)
        assert in_cgroup(path, ops, netns=False)["full_w"] == "ok"
        assert detach_device_filter(path) == 1
    finally:
        detach_device_filter(path) if os.path.isdir(path) else None
        os.rmdir(path)


def test_device_rules_are_validated_once_then_assembled():
    """runtime.resources validates a rule list (the one place); the assembler takes its rules."""
    from stockade.bpf.device_filter import assemble
    from stockade.runtime.errors import SpecError
    from stockade.runtime.resources import Resources

    with pytest.raises(SpecError, match=r"devices\[1\]"):
        Resources.from_oci({"devices": [{"allow": True}, {"allow": True, "type": "x"}]})
    with pytest.raises(SpecError, match="access"):
        Resources.from_oci({"devices": [{"allow": True, "access": "rwx"}]})
    rules = Resources.from_oci({"devices": [{"allow": False}, {"allow": True, "type": "c", "major": 1,
                                                                "minor": -1, "access": "rw"}]}).devices
    assert rules[1].minor is None and len(assemble(rules)) % 8 == 0
    assert len(assemble([])) % 8 == 0
    assert len(assemble([DeviceRule(True)])) % 8 == 0  # allow-all: no unreachable deny path
    assert len(assemble([DeviceRule(True)], events_fd=3)) % 8 == 0


def test_reinstall_replaces_the_rule_set(agent, container):
    path, cgid = container
    maps.install_policy(cgid, "ctr-up", compiled(), pin_dir=agent.pin_dir)
    assert maps.lookup_policy(cgid, agent.pin_dir)["egress_inline"] == 2
    narrower = compile_policy(parse_policy(
        "name: up\nnetwork:\n  egress:\n    default: allow\n    rules: [{to: 127.0.0.2/32, action: deny}]\n"))
    maps.install_policy(cgid, "ctr-up", narrower, pin_dir=agent.pin_dir)
    assert maps.entries_for(cgid, agent.pin_dir) == {"stk_policies": 1, "stk_net": 0, "stk_files": 0}
    assert maps.lookup_policy(cgid, agent.pin_dir)["egress_inline"] == 1
    result = in_cgroup(path, lambda ports: {"a": op_connect("127.0.0.2", ports["tcp"]),
                                            "raw": op_socket(socket.AF_INET, socket.SOCK_RAW, 1)})
    assert result == {"a": "EPERM", "raw": "ok"}


def test_policy_cli_applies_and_removes_with_map_updates(agent):
    """On a bare cgroup: the CLI cannot know its network, so egress rules bring the egress
    programs onto it, and remove takes them off again."""
    path = os.path.join(agent.cgroup_root, "ctr-cli")
    os.mkdir(path)
    cgid = os.stat(path).st_ino
    try:
        _cli_apply_and_remove(agent, path, cgid)
    finally:
        os.rmdir(path)


def _cli_apply_and_remove(agent, path: str, cgid: int) -> None:

    def cli(*args):
        return subprocess.run([PYTHON, "-m", "stockade.bpf.cli", "policy", *args, "--pin-dir", agent.pin_dir],
                              env=agent.env, capture_output=True, text=True)

    applied = cli("apply", "network-only", "--cgroup", path, "--container-id", "ctr-cli")
    assert applied.returncode == 0, applied.stderr
    assert maps.lookup_policy(cgid, agent.pin_dir)["container_id"] == "ctr-cli"
    raw = lambda ports: {"raw": op_socket(socket.AF_INET, socket.SOCK_RAW, 1)}  # noqa: E731
    assert in_cgroup(path, raw) == {"raw": "EPERM"}
    assert maps.egress_attached(path) == len(maps.EGRESS_PROGRAMS)
    metadata = lambda ports: {"m": op_connect("169.254.169.254", 80)}  # noqa: E731
    assert in_cgroup(path, metadata) == {"m": "EPERM"}
    assert cli("remove", "--cgroup", path).returncode == 0
    assert maps.entries_for(cgid, agent.pin_dir) == {"stk_policies": 0, "stk_net": 0, "stk_files": 0}
    assert maps.egress_attached(path) == 0
    assert in_cgroup(path, raw) == {"raw": "ok"}
    bad = cli("apply", "default", "--cgroup", "/sys/fs/cgroup/unified/no-such-cgroup")
    assert bad.returncode == 1 and "no such cgroup" in bad.stderr


def test_stop_unmounts_only_an_empty_bpffs_of_its_own(tmp_path):
    """The agent mounts bpffs where there is none; `--stop` takes it away again once nothing is
    pinned in it (another agent's pins, or a bpffs systemd mounted, stay)."""
    from stockade.bpf import agent as agentmod

    a = make_agent(tmp_path, "bpffs-")
    try:
        a.run("--load-only", "--no-lsm")
        assert agentmod._bpffs_source() is not None
        others = set(os.listdir(agentmod.BPFFS)) - {os.path.basename(a.pin_dir)}
        a.run("--stop")
    finally:
        cleanup_agent(a)
    source = agentmod._bpffs_source()
    if source == agentmod.BPFFS_SOURCE:  # still ours: only because something else is pinned there
        assert others - agentmod._BPFFS_OWN_ENTRIES, "an empty bpffs of the agent's was left mounted"


NC_METADATA = "nc -w 2 169.254.169.254 80 </dev/null 2>&1; true"


@pytest.mark.parametrize("case", ["own-netns", "node-netns", "vouched", "vouched-dual", "vouched-less",
                                  "unvouched", "hooks"])
def test_egress_programs_go_only_where_no_network_refuses_the_policys_denials(agent, tmp_path, case):
    """The runtime puts the egress programs on a container's cgroup, never on the parent, and
    only where nothing else refuses what the policy (network-only: the metadata addresses)
    refuses: a container with a new namespace of its own (nothing but loopback) is refused by
    having no route (ENETUNREACH) and costs nothing at the socket hooks; one sharing the
    runtime's namespace, or joining one that nobody vouches for, or one that vouches for less,
    or whose hooks may wire its namespace up, is refused by connect4 on its own cgroup (EPERM).
    vouched-dual: what the tenant network says of a dual-stack pod (the metadata service's IPv6
    address among what it refuses) covers the policy as well."""
    from bundles import default_config, make_bundle, remove_bundle
    from stockade.cri.netrules import refused_always

    netns = f"stk-egress-{os.getpid()}-{case[:6]}"
    config = default_config(["sh", "-c", NC_METADATA])
    config["linux"]["cgroupsPath"] = f"/{os.path.basename(agent.cgroup_root)}/{case}"
    config["annotations"] = {"io.stockade.bpf-policy": "network-only"}
    spaces = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    vouch = {"vouched": ",".join(refused_always(dual_stack=False)), "vouched-less": "10.0.0.0/8",
             "vouched-dual": ",".join(refused_always(dual_stack=True))}
    if case in ("vouched", "vouched-dual", "vouched-less", "unvouched"):
        subprocess.run(["ip", "netns", "add", netns], check=True)
        config["linux"]["namespaces"] = [*spaces, {"type": "network", "path": f"/run/netns/{netns}"}]
        if case in vouch:
            config["annotations"]["io.stockade.network-refuses"] = vouch[case]
    elif case == "node-netns":
        config["linux"]["namespaces"] = spaces
    elif case == "hooks":
        config["hooks"] = {"poststart": [{"path": "/bin/true"}]}
    bundle = make_bundle(config=config, parent=str(tmp_path))
    root = tmp_path / "state"
    # node-netns: the runtime itself runs in a namespace of the test's own, which the container shares
    prefix = ["unshare", "--net"] if case == "node-netns" else []
    oci = [*prefix, str(Path(PYTHON).parent / "stockade-oci"), "--root", str(root)]
    expected = "network" if case in ("own-netns", "vouched", "vouched-dual") else "cgroup"
    try:
        # the init keeps create's stdio: pipes would never end
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run([*oci, "create", "--bundle", str(bundle), "ctr"], env=agent.env, check=True,
                       timeout=30, **quiet)
        state = json.loads(subprocess.run([*oci, "state", "ctr"], env=agent.env, check=True,
                                          capture_output=True, text=True).stdout)
        assert state["stockade.egress"] == expected
        cgroup = os.path.join(agent.cgroup_root, case)
        attached = maps.egress_attached(cgroup)
        assert attached == (len(maps.EGRESS_PROGRAMS) if expected == "cgroup" else 0)
        assert maps.egress_attached(agent.cgroup_root) == 0
        subprocess.run([*oci, "delete", "--force", "ctr"], env=agent.env, check=True, timeout=30)
        done = subprocess.run([*oci, "run", "--bundle", str(bundle), "ctr"], env=agent.env, timeout=30,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        want = "Operation not permitted" if expected == "cgroup" else "Network is unreachable"
        assert want in done.stdout, (done.stdout, done.stderr)
        assert not os.path.exists(cgroup)
    finally:
        subprocess.run([*oci, "delete", "--force", "ctr"], env=agent.env, capture_output=True)
        remove_bundle(bundle)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
