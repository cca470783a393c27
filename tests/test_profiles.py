"""The profile model, formats and review commands (no kernel needed beyond compile's load check)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from stockade.profiles import cli, load_profile, profile_seccomp
from stockade.profiles.analyze import diff, explain, lint, merge
from stockade.profiles.formats import read_profile_file
from stockade.profiles.model import BUILTIN_DIR, Context, Profile, Seccomp
from stockade.runtime.errors import SpecError
from stockade.runtime.seccomp import compile_program

# Every field of the Docker/moby format, including the deprecated single `name`, a null
# subArchitectures, valueTwo, comments, conditions of every kind and an unknown extension key.
MOBY_SAMPLE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 1,
    "archMap": [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
        {"architecture": "SCMP_ARCH_RISCV64", "subArchitectures": None},
    ],
    "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
    "listenerMetadata": "meta",
    "syscalls": [
        {"names": ["read", "write", "exit_group", "execve", "exit"], "action": "SCMP_ACT_ALLOW"},
        {"name": "getpid", "action": "SCMP_ACT_ALLOW", "comment": "legacy single name"},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            "excludes": {"caps": ["CAP_SYS_ADMIN"], "arches": ["s390", "s390x"]},
        },
        {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "4.8"}},
        {"names": ["unshare"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32"]}},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38, "excludes": {}},
    ],
    "x-vendor": {"kept": True},
}


def test_builtin_profiles_round_trip_exactly():
    for name in ("runtime-default", "restricted", "unconfined"):
        p = load_profile(name)
        with open(p.source) as f:
            assert p.to_dict() == json.load(f), name


def test_moby_format_round_trip_without_loss(tmp_path):
    sec = Seccomp.from_dict(copy.deepcopy(MOBY_SAMPLE))
    assert sec.to_dict() == MOBY_SAMPLE
    path = tmp_path / "moby.json"
    path.write_text(json.dumps(MOBY_SAMPLE))
    p = load_profile(str(path))
    assert p.name == "moby" and p.seccomp.to_dict() == MOBY_SAMPLE
    # through a Stockade profile file and back
    out = tmp_path / "wrapped.json"
    out.write_text(json.dumps(p.to_dict()))
    assert load_profile(str(out)).seccomp.to_dict() == MOBY_SAMPLE


def test_conditions_resolve_by_capability_arch_and_kernel():
    sec = Seccomp.from_dict(MOBY_SAMPLE)
    plain = sec.resolve(Context(kernel="6.1.0"))
    names = {n for r in plain["syscalls"] for n in r["names"]}
    assert "unshare" not in names and {"ptrace", "arch_prctl", "getpid", "clone"} <= names
    assert plain["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    admin = sec.resolve(Context(caps=("CAP_SYS_ADMIN",), kernel="6.1.0"))
    admin_rules = {n: r for r in admin["syscalls"] for n in r["names"]}
    assert "unshare" in admin_rules and "clone" not in admin_rules  # the clone arg rule is excluded
    old = sec.resolve(Context(kernel="4.4.0"))
    assert "ptrace" not in {n for r in old["syscalls"] for n in r["names"]}
    arm = sec.resolve(Context(arch="arm64"))
    assert "arch_prctl" not in {n for r in arm["syscalls"] for n in r["names"]}


def test_profile_seccomp_for_builtins():
    assert profile_seccomp(load_profile("unconfined")) is None
    assert load_profile("unconfined").unconfined
    restricted = profile_seccomp(
        load_profile("restricted"), caps=["CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_BPF"]
    )
    allowed = {
        n
        for r in restricted["syscalls"]
        if r["action"] == "SCMP_ACT_ALLOW" and not r.get("args")
        for n in r["names"]
    }
    # no capability brings back namespaces, BPF, perf, ptrace, keyrings, io_uring or modules
    for name in (
        "unshare",
        "setns",
        "bpf",
        "perf_event_open",
        "ptrace",
        "keyctl",
        "io_uring_setup",
        "init_module",
        "kexec_load",
        "userfaultfd",
        "clone",
    ):
        assert name not in allowed, name
    assert restricted["defaultErrnoRet"] == 1
    rd = profile_seccomp(load_profile("runtime-default"), caps=["CAP_SYS_ADMIN"])
    assert "unshare" in {n for r in rd["syscalls"] for n in r["names"]}


@pytest.mark.parametrize(
    "text, suffix, needle",
    [
        ('{"kind": "StockadeProfile",\n  "name": "x",, }', ".json", ":2:"),
        ("kind: StockadeProfile\nname: [x\n", ".yaml", ":3:"),
        ('{"hello": "world"}', ".json", "not a profile"),
        (
            '{"kind": "StockadeProfile", "name": "x", "seccomp": {"defaultAction": "SCMP_ACT_YES"}}',
            ".json",
            "unknown or missing defaultAction",
        ),
        (
            '{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_PDP11"]}',
            ".json",
            "unknown architecture",
        ),
        ("\x89PNG\r\n", ".json", "malformed JSON"),
    ],
)
def test_bad_profile_files(tmp_path, text, suffix, needle):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(SpecError) as e:
        load_profile(str(path))
    assert needle in str(e.value) and str(path) in str(e.value)


def test_unknown_profile_name_and_missing_file():
    with pytest.raises(SpecError, match="unknown profile"):
        load_profile("no-such-profile")
    with pytest.raises(SpecError, match="does not exist"):
        load_profile("/nonexistent/profile.json")


def test_yaml_profile_loads(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "StockadeProfile",
                "name": "y",
                "version": "2",
                "seccomp": MOBY_SAMPLE,
                "bpf": {"network": {"egress": "deny"}},
            }
        )
    )
    p = load_profile(str(path))
    assert p.version == "2" and p.bpf_policy == {"network": {"egress": "deny"}}
    assert p.seccomp.to_dict() == MOBY_SAMPLE


def _lint_codes(seccomp: dict) -> set[str]:
    return {f.code for f in lint(Profile(name="t", seccomp=Seccomp.from_dict(seccomp)))}


def test_lint_finds_each_problem():
    ok = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ["read", "execve", "exit", "exit_group"], "action": "SCMP_ACT_ALLOW"}],
    }
    assert _lint_codes(ok) == set()
    unknown = copy.deepcopy(ok)
    unknown["syscalls"][0]["names"].append("opne")
    assert "unknown-syscall" in _lint_codes(unknown)
    contra = copy.deepcopy(ok)
    contra["syscalls"].append({"names": ["read"], "action": "SCMP_ACT_KILL"})
    assert "contradiction" in _lint_codes(contra)
    no_arch = {k: v for k, v in ok.items() if k != "architectures"}
    assert "missing-arch" in _lint_codes(no_arch)
    danger = copy.deepcopy(ok)
    danger["syscalls"][0]["names"] += ["bpf", "keyctl"]
    findings = lint(Profile(name="t", seccomp=Seccomp.from_dict(danger)))
    bpf = [f for f in findings if f.code == "dangerous" and f.message.startswith("bpf")]
    assert bpf and "kernel" in bpf[0].message  # says why
    assert any(f.message.startswith("keyctl") and "keyring" in f.message for f in findings)
    no_exec = copy.deepcopy(ok)
    no_exec["syscalls"][0]["names"].remove("execve")
    assert "blocks-essential" in _lint_codes(no_exec)
    no_exit = copy.deepcopy(ok)
    no_exit["syscalls"][0]["names"].remove("exit_group")
    assert "blocks-essential" in _lint_codes(no_exit)


def test_lint_of_builtins_has_no_errors():
    for name in ("restricted", "runtime-default"):
        assert not [f for f in lint(load_profile(name)) if f.severity == "error"], name
    restricted = lint(load_profile("restricted"))
    assert not [f for f in restricted if f.severity == "warning"]
    # runtime-default keeps Docker's ptrace on kernels >= 4.8, and lint says so
    assert any(f.code == "dangerous" and "ptrace" in f.message for f in lint(load_profile("runtime-default")))


def test_explain_puts_risky_first():
    e = explain(load_profile("runtime-default"))
    assert [r["syscall"] for r in e["risky"]][:1] and "ptrace" in [r["syscall"] for r in e["risky"]]
    assert e["default"] == "SCMP_ACT_ERRNO(EPERM)"
    assert any(g["group"] == "file-io" for g in e["groups"])
    assert {r["how"] for r in explain(load_profile("restricted"))["risky"]} <= {"with argument checks"}


def test_diff_and_merge():
    rd, rs = load_profile("runtime-default"), load_profile("restricted")
    d = diff(rd, rs)
    changed = {c["syscall"]: c["change"] for c in d["changes"]}
    assert changed["ptrace"] == "denied" and changed["process_vm_readv"] == "denied"
    assert diff(rs, rs)["changes"] == []
    a = Profile(
        name="a",
        seccomp=Seccomp.from_dict(
            {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}
        ),
        recorded={"commands": [["a"]], "syscalls": {"read": 2}},
    )
    b = Profile(
        name="b",
        seccomp=Seccomp.from_dict(
            {
                "defaultAction": "SCMP_ACT_ERRNO",
                "syscalls": [{"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}],
            }
        ),
        recorded={"commands": [["b"]], "syscalls": {"read": 1, "write": 1}},
    )
    m = merge([a, b], name="ab")
    assert m.seccomp.names() == {"read", "write"}
    assert m.recorded == {"commands": [["a"], ["b"]], "syscalls": {"read": 3, "write": 1}}
    assert merge([a, load_profile("unconfined")]).unconfined


def test_export_formats_load_back(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STOCKADE_CACHE_DIR", str(tmp_path / "cache"))
    oci_path, docker_path = tmp_path / "oci.json", tmp_path / "docker.json"
    assert cli.main(["export", "restricted", "--format", "oci", "-o", str(oci_path)]) == 0
    assert cli.main(["export", "restricted", "--format", "docker", "-o", str(docker_path)]) == 0
    assert cli.main(["export", "restricted", "--format", "k8s", "--output-dir", str(tmp_path / "k8s")]) == 0
    restricted = load_profile("restricted")
    oci_back = read_profile_file(str(oci_path))
    assert oci_back.seccomp.to_dict() == profile_seccomp(restricted)
    assert read_profile_file(str(docker_path)).seccomp.to_dict() == restricted.seccomp.to_dict()
    spo = read_profile_file(str(tmp_path / "k8s" / "seccompprofile-restricted.yaml"))
    assert spo.name == "restricted"
    assert spo.seccomp.resolve() == profile_seccomp(restricted)
    local = read_profile_file(str(tmp_path / "k8s" / "kubelet" / "seccomp" / "profiles" / "restricted.json"))
    assert local.seccomp.to_dict() == profile_seccomp(restricted)
    # and all of them compile to the same program
    program = compile_program(profile_seccomp(restricted))
    for p in (oci_back, spo, local):
        assert compile_program(profile_seccomp(p)) == program
    pod = yaml.safe_load((tmp_path / "k8s" / "pod-securitycontext.yaml").read_text())
    assert pod["securityContext"]["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "profiles/restricted.json",
    }


def test_cli_errors_leave_no_output_file(tmp_path, capsys):
    out = tmp_path / "out.json"
    assert cli.main(["export", "unconfined", "--format", "oci", "-o", str(out)]) == 1
    assert not out.exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "NOPE"}]}')
    assert cli.main(["merge", "restricted", str(bad), "-o", str(out)]) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".stockade-tmp")]
    err = capsys.readouterr().err
    assert "unknown seccomp action 'NOPE'" in err and "bad.json" in err


def test_cli_review_commands(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STOCKADE_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["list"]) == 0
    assert "restricted" in capsys.readouterr().out
    assert cli.main(["show", "restricted"]) == 0
    assert cli.main(["explain", "restricted"]) == 0
    assert cli.main(["lint", "restricted", "--strict"]) == 0
    assert cli.main(["diff", "restricted", "runtime-default"]) == 1
    capsys.readouterr()
    assert cli.main(["compile", "restricted", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["load"] == "ok" and data["instructions"] > 100
    assert cli.main(["lint", "--json", str(BUILTIN_DIR + "/runtime-default.json")]) == 0
    assert json.loads(capsys.readouterr().out)
