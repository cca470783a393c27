"""BPF policy YAML: validation with line numbers, compilation into map entries, requirements."""

from __future__ import annotations

import struct
import sys

import pytest
from stockade.bpf import abi, maps
from stockade.bpf.policy import (
    F_DENY_MOUNT,
    F_DENY_USERNS,
    F_EGRESS_DENY,
    FAMILIES,
    builtin_policies,
    compile_policy,
    load_policy,
    parse_policy,
    requirements,
)
from stockade.runtime.errors import SpecError


def test_the_builtin_policies_are_found():
    assert {"default", "audit", "network-only"} <= set(builtin_policies())


@pytest.mark.parametrize("name", builtin_policies())
def test_shipped_policies_load_and_compile(name):
    policy = load_policy(name)
    compiled = compile_policy(policy)
    assert compiled.name == policy.name
    assert len(maps.policy_value("c" * 80, compiled, "t" * 40)) == 776  # sizeof(struct stk_policy)


def test_default_policy_blocks_the_escape_classes():
    p = load_policy("default")
    c = compile_policy(p)
    assert p.mode == "enforce"
    assert c.flags & F_DENY_MOUNT and c.flags & F_DENY_USERNS
    assert not c.families & (1 << FAMILIES["packet"])
    assert c.families & (1 << FAMILIES["inet"]) and c.families & (1 << FAMILIES["unix"])
    assert c.sock_type_deny & (1 << 3)  # SOCK_RAW
    assert any(r.network == "169.254.169.254/32" and r.action == "deny" for r in c.net_rules)
    assert requirements(p) == {"lsm", "cgroup_sock", "cgroup_sock_addr", "cgroup_sysctl"}
    assert load_policy("audit").mode == "audit"


def test_network_only_policy_needs_no_lsm():
    assert "lsm" not in requirements(load_policy("network-only"))


def test_empty_policy_needs_nothing():
    p = parse_policy("name: open\n")
    assert requirements(p) == set()
    c = compile_policy(p)
    assert c.flags == 0 and c.families == (1 << 64) - 1 and c.cap_deny == 0


def test_egress_rules_compile_to_prefixes_and_ports():
    c = compile_policy(
        parse_policy("""
name: egress
network:
  egress:
    default: deny
    rules:
      - {to: 10.0.0.0/8, ports: 53, action: allow}
      - {to: "2001:db8::/32", ports: 1024-2048, action: allow}
""")
    )
    assert c.flags & F_EGRESS_DENY
    assert maps.NetRule("10.0.0.0/8", "allow", 53, 53) in c.net_rules
    assert maps.NetRule("2001:db8::/32", "allow", 1024, 2048) in c.net_rules
    key = maps.net_key(7, "10.0.0.0/8")
    assert int.from_bytes(key[:4], "little") == 64 + 96 + 8


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("name: x\nbogus: 1\n", 2, "unknown key 'bogus'"),
        ("name: x\nmode: loud\n", 2, "mode must be one of enforce, audit"),
        ("name: x\nnetwork:\n  families: [inet, carrier-pigeon]\n", 3, "unknown socket family"),
        (
            "name: x\nnetwork:\n  egress:\n    rules:\n      - {to: 10.0.0.300/8, action: deny}\n",
            5,
            "not an address or CIDR",
        ),
        ("name: x\nnetwork:\n  egress:\n    rules:\n      - {to: 10.0.0.0/8}\n", 5, "needs 'action'"),
        (
            "name: x\nnetwork:\n  egress:\n    rules:\n      - {to: 10.0.0.0/8, action: deny}\n"
            "      - {to: 10.1.0.0/8, action: allow}\n",
            6,
            "already has a rule at line 5",
        ),
        ("name: x\nnetwork:\n  bind_ports: 70000\n", 3, "outside 0-65535"),
        ("name: x\nfile:\n  deny:\n    - {path: etc/shadow}\n", 4, "absolute path"),
        ("name: x\nfile:\n  deny:\n    - {path: /etc/shadow, access: [chew]}\n", 4, "read, write or exec"),
        ("name: x\ncapability:\n  deny: [SYS_MODULE, FLY]\n", 3, "unknown capability 'FLY'"),
        ("name: x\nprocess: {ptrace: never}\n", 2, "process.ptrace must be one of"),
        ("name: x\nname: y\n", 2, "duplicate key"),
        ("mode: audit\n", 1, "needs a 'name'"),
        ("name: x\nkernel: [1, 2\n", 3, "invalid YAML"),
    ],
)
def test_errors_name_file_and_line(text, line, message):
    with pytest.raises(SpecError) as info:
        parse_policy(text, "p.yaml")
    assert info.value.where == f"p.yaml:{line}", info.value.render()
    assert message in info.value.what


def test_unknown_policy_name_lists_the_builtin_ones():
    with pytest.raises(SpecError, match="built-in policies: .*default"):
        load_policy("no-such-policy")


def test_file_rules_resolve_to_inodes_at_install(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    c = compile_policy(
        parse_policy(
            f"name: f\nfile:\n  deny:\n    - {{path: {target}, access: [write]}}\n"
            f"exec:\n  deny: [{target}, /nonexistent/bin]\n"
        )
    )
    rules = {r.path: r for r in c.file_rules}
    assert rules[str(target)].deny == abi.ACC_WRITE | abi.ACC_EXEC
    assert maps._file_key(5, str(target)) is not None
    assert maps._file_key(5, "/nonexistent/bin") is None


def test_directory_rules_cover_what_the_directory_holds(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "key").write_text("k")
    (tmp_path / "top").write_text("t")
    keys = maps._file_keys(9, str(tmp_path))
    assert len(keys) == 4  # the directory, sub, sub/key, top
    assert maps._file_keys(9, str(tmp_path / "missing")) == []


def test_load_compiled_caches_by_content(tmp_path, monkeypatch):
    import subprocess

    from stockade.bpf import policy as pol

    monkeypatch.setenv("STOCKADE_BPF_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "p.yaml"
    src.write_text("name: p\nnetwork: {egress: {default: deny, rules: [{to: 10.0.0.0/8, action: allow}]}}\n")
    first = pol.load_compiled(str(src))
    assert first == (compile_policy(load_policy(str(src))), {"cgroup_sock_addr"})
    assert len(list((tmp_path / "cache").glob("policy-*.json"))) == 1
    assert pol.load_compiled(str(src)) == first  # from the cache
    src.write_text("name: p\nmode: audit\n")
    assert pol.load_compiled(str(src))[0].mode == 1  # content changed: recompiled
    # a warm start imports neither yaml nor bcc; -S as the launchers start Python (site's .pth
    # hooks of other packages, such as a CA bundle's, would import pathlib on their own)
    paths = [p for p in sys.path if p]
    code = (f"import sys; sys.path[:0] = {paths!r}; from stockade.bpf import policy, maps\n"
            f"policy.load_compiled({str(src)!r})\n"
            "print(*(m in sys.modules for m in ('yaml', 'bcc', 'dataclasses', 'pathlib')))")
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True)
    out = done.stdout
    assert out.split() == ["False", "False", "False", "False"]


def _inline(value: bytes) -> list[tuple]:
    count = struct.unpack_from("=I", value, 128)[0]
    return [struct.unpack_from("=4I4IHHI", value, 136 + 40 * i) for i in range(count)]


def test_egress_rules_travel_inline_longest_prefix_first():
    rules = (maps.NetRule("10.0.0.0/8", "deny"), maps.NetRule("10.1.2.3/32", "allow", 53, 53),
             maps.NetRule("::/0", "deny"), maps.NetRule("10.1.0.0/16", "allow"),
             maps.NetRule("10.0.0.0/8", "allow", 1, 2))  # the same network again: the last one wins
    value = maps.policy_value("c", maps.CompiledPolicy("p", 0, 0, 0, 0, 0, net_rules=rules))
    assert not maps.decode_policy(value)["egress_in_trie"]
    inline = _inline(value)
    masks = [int.from_bytes(struct.pack("=4I", *r[4:8]), "big") for r in inline]
    assert [bin(m).count("1") for m in masks] == [128, 112, 104, 0]  # v4 as ::ffff:a.b.c.d
    addr = struct.pack("=4I", *inline[0][:4])
    assert addr == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert inline[0][8:] == (53, 53, 0)
    assert inline[2][8:] == (1, 2, 0)  # 10.0.0.0/8: the later rule
    assert inline[3][8:] == (0, 65535, 1)
    # host bits in a rule's network are masked away
    odd = maps.policy_value("c", maps.CompiledPolicy("p", 0, 0, 0, 0, 0,
                                                     net_rules=(maps.NetRule("10.1.2.3/8", "deny"),)))
    assert struct.pack("=4I", *_inline(odd)[0][:4])[12:] == bytes([10, 0, 0, 0])


def test_more_egress_rules_than_fit_inline_go_to_the_trie():
    rules = tuple(maps.NetRule(f"10.{i}.0.0/16", "deny") for i in range(maps.NET_INLINE + 1))
    value = maps.policy_value("c", maps.CompiledPolicy("p", 0, 0, 0, 0, 0, net_rules=rules))
    decoded = maps.decode_policy(value)
    assert decoded["egress_in_trie"] and decoded["egress_inline"] == 0
    assert decoded["flags"] & maps.F_EGRESS_TRIE
    exactly = maps.policy_value("c", maps.CompiledPolicy("p", 0, 0, 0, 0, 0, net_rules=rules[:-1]))
    assert maps.decode_policy(exactly)["egress_inline"] == maps.NET_INLINE
