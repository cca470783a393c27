"""config.json parsing: every bad input is a SpecError naming its JSON path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bundles import default_config, make_bundle, remove_bundle, userns_config, write_config  # noqa: E402
from kernel import require  # noqa: E402
from stockade.runtime.errors import SpecError  # noqa: E402
from stockade.runtime.spec import SUPPORTED, load_bundle, parse_process, parse_spec, sysctl_path  # noqa: E402


@pytest.fixture
def bundle():
    b = make_bundle(["true"])
    yield b
    remove_bundle(b)


def test_default_config_parses(bundle: Path) -> None:
    spec = load_bundle(bundle)
    assert spec.process.args == ["true"]
    assert spec.root.readonly and spec.hostname == "stockade"
    assert [ns.type for ns in spec.linux.namespaces] == ["pid", "network", "ipc", "uts", "mount", "cgroup"]
    proc = spec.mounts[0]
    assert (proc.destination, proc.type) == ("/proc", "proc")
    devpts = spec.mounts[2]
    assert "newinstance" in devpts.data and devpts.flags & 2  # nosuid
    assert spec.process.rlimits[0].type == "RLIMIT_NOFILE"
    assert spec.rootfs(bundle) == str((bundle / "rootfs").resolve())


def test_bind_mount_forms() -> None:
    cfg = default_config()
    cfg["mounts"] = [
        {"destination": "/a", "type": "bind", "source": "/etc", "options": ["ro", "rprivate"]},
        {"destination": "/b", "type": "none", "source": "/etc", "options": ["rbind", "nosuid"]},
        {"destination": "/c", "source": "/etc", "options": ["bind"]},
    ]
    spec = parse_spec(cfg)
    assert [m.type for m in spec.mounts] == ["bind"] * 3
    assert spec.mounts[0].flags & 1 and spec.mounts[0].propagation
    assert spec.mounts[1].flags & 16384  # MS_REC for rbind


def test_supported_lists() -> None:
    assert "network" in SUPPORTED["namespaces"] and "CAP_SYS_ADMIN" in SUPPORTED["capabilities"]
    assert "tmpfs" in SUPPORTED["mountTypes"] and "nosuid" in SUPPORTED["mountOptions"]


def test_sysctl_path() -> None:
    assert sysctl_path("net.ipv4.ip_forward") == "/proc/sys/net/ipv4/ip_forward"
    assert sysctl_path("net/ipv4/conf/eth0.100/forwarding") == "/proc/sys/net/ipv4/conf/eth0.100/forwarding"


def _set(path: str, value):
    """Mutation: set cfg[a][b]... = value (list indexes allowed)."""

    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _both(*mutations):
    def mutate(cfg: dict) -> None:
        for m in mutations:
            m(cfg)

    return mutate


BAD = [
    (
        "namespace type",
        _set("linux.namespaces.2.type", "foo"),
        "linux.namespaces[2].type",
        "unknown namespace",
    ),
    ("duplicate ns", _set("linux.namespaces.2.type", "pid"), "linux.namespaces[2].type", "twice"),
    ("mount type", _set("mounts.0.type", "nfs"), "mounts[0].type", "unknown mount type"),
    (
        "mount option",
        _set("mounts.1.options", ["nosuid", "bogus"]),
        "mounts[1].options[1]",
        "unknown mount option",
    ),
    (
        "data option on proc",
        _set("mounts.0.options", ["size=1m"]),
        "mounts[0].options[0]",
        "unknown mount option",
    ),
    ("idmap option", _set("mounts.1.options", ["idmap"]), "mounts[1].options[0]", "idmapped"),
    (
        "idmapped mount",
        _set("mounts.0.uidMappings", [{"containerID": 0, "hostID": 1, "size": 1}]),
        "mounts[0].uidMappings",
        "idmapped",
    ),
    ("relative destination", _set("mounts.0.destination", "proc"), "mounts[0].destination", "absolute"),
    (
        "bind without source",
        _set("mounts.0", {"destination": "/x", "type": "bind"}),
        "mounts[0].source",
        "source",
    ),
    (
        "capability",
        _set("process.capabilities.bounding", ["CAP_FLY"]),
        "process.capabilities.bounding[0]",
        "unknown capability",
    ),
    (
        "effective not permitted",
        _set("process.capabilities.effective", ["CAP_KILL", "CAP_SYS_ADMIN"]),
        "process.capabilities.effective",
        "permitted",
    ),
    (
        "ambient not inheritable",
        _both(_set("process.capabilities.ambient", ["CAP_KILL"]), _set("process.user.uid", 1000)),
        "process.capabilities.ambient",
        "inheritable",
    ),
    (
        "rlimit",
        _set("process.rlimits", [{"type": "RLIMIT_FOO", "soft": 1, "hard": 1}]),
        "process.rlimits[0].type",
        "unknown rlimit",
    ),
    (
        "rlimit soft > hard",
        _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]),
        "process.rlimits[0].soft",
        "above",
    ),
    ("username", _set("process.user.username", "nobody"), "process.user.username", "Windows"),
    ("uid type", _set("process.user.uid", "0"), "process.user.uid", "expected an integer"),
    ("args type", _set("process.args", "sh"), "process.args", "expected an array"),
    ("empty args", _set("process.args", []), "process.args", "program"),
    ("relative cwd", _set("process.cwd", "tmp"), "process.cwd", "absolute"),
    ("env", _set("process.env", ["PATH"]), "process.env[0]", "KEY=VALUE"),
    ("terminal type", _set("process.terminal", "yes"), "process.terminal", "true or false"),
    ("oom range", _set("process.oomScoreAdj", 5000), "process.oomScoreAdj", "outside"),
    (
        "selinux",
        _set("process.selinuxLabel", "system_u:system_r:container_t:s0"),
        "process.selinuxLabel",
        "SELinux",
    ),
    ("apparmor", _set("process.apparmorProfile", "docker-default"), "process.apparmorProfile", "AppArmor"),
    ("scheduler", _set("process.scheduler", {"policy": "SCHED_FIFO"}), "process.scheduler", "not supported"),
    ("mountLabel", _set("linux.mountLabel", "x"), "linux.mountLabel", "SELinux"),
    ("intelRdt", _set("linux.intelRdt", {"closID": "x"}), "linux.intelRdt", "Intel RDT"),
    ("personality", _set("linux.personality", {"domain": "LINUX64"}), "linux.personality.domain", "unknown"),
    (
        "personality flags",
        _set("linux.personality", {"domain": "LINUX", "flags": ["x"]}),
        "linux.personality.flags",
        "not supported",
    ),
    (
        "timeOffsets without ns",
        _set("linux.timeOffsets", {"monotonic": {"secs": 1}}),
        "linux.timeOffsets",
        "new time namespace",
    ),
    (
        "time clock",
        _set("linux.timeOffsets", {"realtime": {"secs": 1}}),
        "linux.timeOffsets.realtime",
        "unknown clock",
    ),
    (
        "host sysctl",
        _set("linux.sysctl", {"kernel.pid_max": "100"}),
        "linux.sysctl.kernel.pid_max",
        "not namespaced",
    ),
    (
        "propagation",
        _set("linux.rootfsPropagation", "sideways"),
        "linux.rootfsPropagation",
        "unknown propagation",
    ),
    ("masked relative", _set("linux.maskedPaths", ["proc/kcore"]), "linux.maskedPaths[0]", "absolute"),
    (
        "device type",
        _set("linux.devices", [{"path": "/dev/x", "type": "q"}]),
        "linux.devices[0].type",
        "unknown device type",
    ),
    (
        "device outside dev",
        _set("linux.devices", [{"path": "/etc/x", "type": "c", "major": 1, "minor": 3}]),
        "linux.devices[0].path",
        "under /dev",
    ),
    ("hook relative", _set("hooks.prestart", [{"path": "hook"}]), "hooks.prestart[0].path", "absolute"),
    (
        "hook timeout",
        _set("hooks.poststop", [{"path": "/bin/true", "timeout": 0}]),
        "hooks.poststop[0].timeout",
        "greater than zero",
    ),
    ("windows section", _set("windows", {}), "windows", "not supported"),
    ("oci version", _set("ociVersion", "2.0.0"), "ociVersion", "unsupported OCI version"),
    ("missing process", lambda c: c.pop("process"), "process", "missing"),
    ("missing root", lambda c: c.pop("root"), "root", "missing"),
    ("no mount ns", _set("linux.namespaces", [{"type": "pid"}]), "linux.namespaces", "mount namespace"),
    ("hostname without uts", _set("linux.namespaces", [{"type": "mount"}]), "hostname", "UTS"),
    (
        "maps without userns",
        _set("linux.uidMappings", [{"containerID": 0, "hostID": 1000, "size": 1}]),
        "linux.uidMappings",
        "without a new user namespace",
    ),
]


@pytest.mark.parametrize("mutate,where,what", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec(mutate, where: str, what: str) -> None:
    cfg = default_config()
    mutate(cfg)
    with pytest.raises(SpecError) as info:
        parse_spec(cfg, "config.json")
    assert info.value.where == f"config.json: {where}", str(info.value)
    assert what in str(info.value)


def test_userns_needs_mappings_and_mapped_user() -> None:
    cfg = userns_config()
    cfg["linux"].pop("uidMappings")
    with pytest.raises(SpecError, match="needs mappings"):
        parse_spec(cfg)
    cfg = userns_config(size=10)
    cfg["process"]["user"]["uid"] = 1000
    with pytest.raises(SpecError, match="uid 1000 is not mapped"):
        parse_spec(cfg)


def test_username_checked_against_rootfs(bundle: Path) -> None:
    cfg = default_config()
    cfg["process"]["user"]["username"] = "user"
    write_config(bundle, cfg)
    with pytest.raises(SpecError, match='"uid": 1000, "gid": 1000'):
        load_bundle(bundle)
    cfg["process"]["user"]["username"] = "ghost"
    write_config(bundle, cfg)
    with pytest.raises(SpecError, match="does not exist in the rootfs /etc/passwd"):
        load_bundle(bundle)


def test_json_errors_and_missing_files(bundle: Path) -> None:
    (bundle / "config.json").write_text('{\n  "ociVersion": "1.2.0",\n  "process": {,}\n}')
    with pytest.raises(SpecError) as info:
        load_bundle(bundle)
    assert info.value.where == "config.json:3:15"
    (bundle / "config.json").unlink()
    with pytest.raises(SpecError, match="no config.json"):
        load_bundle(bundle)
    cfg = default_config()
    cfg["root"]["path"] = "nope"
    write_config(bundle, cfg)
    with pytest.raises(SpecError, match="is not a directory") as info:
        load_bundle(bundle)
    assert info.value.where == "config.json: root.path"


def test_parse_process_for_exec() -> None:
    p = parse_process(
        json.loads('{"args": ["sh"], "cwd": "/", "env": ["A=1"], "terminal": false}'), "process.json"
    )
    assert p.args == ["sh"] and p.env == ["A=1"]
    with pytest.raises(SpecError) as info:
        parse_process({"args": ["sh"], "rlimits": [{"type": "RLIMIT_NPROC"}]}, "process.json")
    assert info.value.where == "process.json: rlimits[0].soft"


def test_runc_spec_output_parses(tmp_path: Path) -> None:
    """`runc spec` lists ambient capabilities without inheritable: fine for uid 0."""
    import shutil
    import subprocess

    require(shutil.which("runc") is not None, "runc is not installed (scripts/setup installs it)")
    subprocess.run(["runc", "spec"], cwd=tmp_path, check=True)
    spec = parse_spec(json.loads((tmp_path / "config.json").read_text()))
    assert spec.process.terminal and spec.process.capabilities.ambient
    assert any(m.type == "cgroup" for m in spec.mounts)


def test_username_hint_reads_the_bundles_passwd_never_the_hosts() -> None:
    """process.user.username is refused with the ids to use instead, looked up in the rootfs's
    /etc/passwd; a symlink there pointing at the host's file resolves inside the rootfs."""
    import os

    bundle = make_bundle()
    try:
        config = default_config()
        config["process"]["user"]["username"] = "user"
        write_config(bundle, config)
        with pytest.raises(SpecError, match='use "uid": 1000, "gid": 1000'):
            load_bundle(bundle)
        passwd = bundle / "rootfs/etc/passwd"
        passwd.unlink()
        os.symlink("/etc/passwd", passwd)  # the host has root; the rootfs now has no passwd at all
        config["process"]["user"]["username"] = "root"
        write_config(bundle, config)
        with pytest.raises(SpecError, match="does not exist in the rootfs /etc/passwd"):
            load_bundle(bundle)
    finally:
        remove_bundle(bundle)
