"""`stockade-oci` end to end on the real kernel: the OCI state machine, exit codes, exec, pause,
update, hooks, and bad input that leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundles import default_config, make_bundle, remove_bundle, userns_config, write_config
from kernel import require
from leftovers import new_since, snapshot

OCI = str(Path(sys.executable).parent / "stockade-oci")


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A private runtime root (the runtime needs root); afterwards no container, cgroup, mount or
    process may remain."""
    require(os.geteuid() == 0, "the runtime needs root")
    state_root = tmp_path / "state"
    before = snapshot()
    yield state_root
    for cid in json.loads(_oci(state_root, "list", "--format", "json").stdout or "[]"):
        _oci(state_root, "delete", "--force", cid["id"])
    assert new_since(before) == {}
    assert not state_root.exists() or not any(state_root.iterdir())


@pytest.fixture
def bundle(tmp_path: Path) -> Iterator[Path]:
    b = make_bundle(["sh", "-c", "exit 0"], parent=str(tmp_path))
    yield b
    remove_bundle(b)


def _oci(root: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run stockade-oci. Output goes through files: a created container's init keeps the
    runtime's stdio open (as with runc), so pipes would never reach end-of-file."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        done = subprocess.run(
            [OCI, "--root", str(root), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            timeout=timeout,
        )
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            done.args, done.returncode, out.read().decode(), err.read().decode()
        )


def _set_args(bundle: Path, args: list[str], **changes) -> dict:  # noqa: ANN003
    config = default_config(args)
    for key, value in changes.items():
        config[key] = value
    write_config(bundle, config)
    return config


def _sh(script: str, *caps: str) -> dict:
    """A config running `sh -c SCRIPT` with exactly CAPS."""
    config = default_config(["sh", "-c", script])
    config["process"]["capabilities"] = {k: list(caps) for k in ("bounding", "effective", "permitted")}
    return config


def _state(root: Path, cid: str) -> dict:
    done = _oci(root, "state", cid)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_state_machine_create_start_kill_delete(root: Path, bundle: Path, tmp_path: Path) -> None:
    _set_args(bundle, ["sleep", "300"])
    pid_file = tmp_path / "init.pid"
    done = _oci(root, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), "c1")
    assert done.returncode == 0, done.stderr
    state = _state(root, "c1")
    assert state["status"] == "created" and state["id"] == "c1"
    assert state["pid"] == int(pid_file.read_text()) > 0
    assert state["bundle"] == str(bundle.resolve())
    assert _oci(root, "start", "c1").returncode == 0
    assert _state(root, "c1")["status"] == "running"
    assert "cannot start" in _oci(root, "start", "c1").stderr
    refused = _oci(root, "delete", "c1")
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert _oci(root, "kill", "c1", "KILL").returncode == 0
    _wait_status(root, "c1", "stopped")
    assert _oci(root, "delete", "c1").returncode == 0
    gone = _oci(root, "state", "c1")
    assert gone.returncode != 0 and "does not exist" in gone.stderr


def _wait_status(root: Path, cid: str, wanted: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while _state(root, cid)["status"] != wanted:
        assert time.monotonic() < deadline, f"{cid} never became {wanted}"
        time.sleep(0.02)


def test_run_returns_exit_code_and_output(root: Path, bundle: Path) -> None:
    _set_args(bundle, ["sh", "-c", "echo pid=$$ host=$(hostname); exit 3"])
    done = _oci(root, "run", "--bundle", str(bundle), "c2")
    assert done.returncode == 3
    assert "pid=1 host=stockade" in done.stdout


def test_run_reports_signal_as_128_plus_n(root: Path, bundle: Path) -> None:
    _set_args(bundle, ["sleep", "300"])
    proc = subprocess.Popen([OCI, "--root", str(root), "run", "--bundle", str(bundle), "c3"])
    _wait_until(
        lambda: _oci(root, "state", "c3").returncode == 0 and _state(root, "c3")["status"] == "running"
    )
    assert _oci(root, "kill", "c3", "SIGKILL").returncode == 0
    assert proc.wait(timeout=15) == 128 + signal.SIGKILL


def _wait_until(check, seconds: float = 15) -> None:  # noqa: ANN001
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def test_exec_ps_pause_resume_update_list(root: Path, bundle: Path) -> None:
    _set_args(bundle, ["sleep", "300"])
    assert _oci(root, "run", "--detach", "--bundle", str(bundle), "c4").returncode == 0
    done = _oci(root, "exec", "c4", "sh", "-c", "echo $$ $(cat /proc/1/comm)")
    assert done.returncode == 0, done.stderr
    exec_pid, init_comm = done.stdout.split()
    assert init_comm == "sleep" and int(exec_pid) > 1  # same PID namespace as the init
    assert _oci(root, "exec", "c4", "sh", "-c", "exit 5").returncode == 5
    pids = json.loads(_oci(root, "ps", "--format", "json", "c4").stdout)
    assert _state(root, "c4")["pid"] in pids
    assert _oci(root, "pause", "c4").returncode == 0
    assert _state(root, "c4")["status"] == "paused"
    assert _oci(root, "resume", "c4").returncode == 0
    assert _state(root, "c4")["status"] == "running"
    assert _oci(root, "update", "--pids-limit", "42", "c4").returncode == 0
    assert Path("/sys/fs/cgroup/pids/stockade/c4/pids.max").read_text().strip() == "42"
    listed = _oci(root, "list", "--format", "json")
    assert [c["id"] for c in json.loads(listed.stdout)] == ["c4"]
    assert _oci(root, "delete", "--force", "c4").returncode == 0


def test_exec_with_process_file(root: Path, bundle: Path, tmp_path: Path) -> None:
    _set_args(bundle, ["sleep", "300"])
    assert _oci(root, "run", "--detach", "--bundle", str(bundle), "c5").returncode == 0
    process = default_config(["sh", "-c", "id -u; grep NoNewPrivs /proc/self/status"])["process"]
    process["user"] = {"uid": 1000, "gid": 1000}
    (tmp_path / "process.json").write_text(json.dumps(process))
    done = _oci(root, "exec", "--process", str(tmp_path / "process.json"), "c5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1000", "NoNewPrivs:", "1"]


def test_hooks_get_state_and_run_in_order(root: Path, bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$1 $(cat)" >> {log}\n')
    hook.chmod(0o755)
    hooks = {
        kind: [{"path": str(hook), "args": ["hook.sh", kind]}]
        for kind in ("createRuntime", "poststart", "poststop")
    }
    _set_args(bundle, ["true"], hooks=hooks)
    assert _oci(root, "run", "--bundle", str(bundle), "c6").returncode == 0
    lines = log.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["createRuntime", "poststart", "poststop"]
    created = json.loads(lines[0].split(" ", 1)[1])
    assert created["id"] == "c6" and created["pid"] > 0


def test_failing_create_runtime_hook_leaves_nothing(root: Path, bundle: Path) -> None:
    _set_args(bundle, ["true"], hooks={"createRuntime": [{"path": "/bin/false"}]})
    done = _oci(root, "create", "--bundle", str(bundle), "c7")
    assert done.returncode != 0 and "hooks.createRuntime[0]" in done.stderr


def test_features_is_oci_json() -> None:
    done = subprocess.run([OCI, "features"], capture_output=True, text=True, check=True)
    features = json.loads(done.stdout)
    assert "user" in features["linux"]["namespaces"]
    assert features["linux"]["seccomp"]["enabled"] is True
    assert "SCMP_ACT_ERRNO" in features["linux"]["seccomp"]["actions"]


def test_json_log_for_shims(root: Path, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    done = subprocess.run(
        [OCI, "--root", str(root), "--log", str(log), "--log-format", "json", "state", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "does not exist" in entry["msg"]


def test_error_reaches_the_log_when_stderr_is_read_only(root: Path, tmp_path: Path) -> None:
    """containerd's runc shim gives sandboxes a read-only /dev/null as stderr and reads --log."""
    log = tmp_path / "log.json"
    with open("/dev/null") as read_only:
        done = subprocess.run(
            [OCI, "--root", str(root), "--log", str(log), "--log-format", "json", "kill", "nope"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=read_only, check=False,
        )
    assert done.returncode == 1
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "does not exist" in entry["msg"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("cid", ["../escape", "a/b", "x" * 200, "", ".hidden", "-flag"])
def test_bad_container_ids(root: Path, bundle: Path, cid: str) -> None:
    done = (
        _oci(root, "create", "--bundle", str(bundle), "--", cid)
        if cid.startswith("-")
        else _oci(root, "create", "--bundle", str(bundle), cid)
    )
    assert done.returncode != 0
    assert "container ID" in done.stderr or "invalid" in done.stderr


def test_duplicate_id_refused_and_first_kept(root: Path, bundle: Path) -> None:
    _set_args(bundle, ["sleep", "300"])
    assert _oci(root, "create", "--bundle", str(bundle), "dup").returncode == 0
    again = _oci(root, "create", "--bundle", str(bundle), "dup")
    assert again.returncode != 0 and "already exists" in again.stderr
    assert _state(root, "dup")["status"] == "created"
    assert _oci(root, "delete", "dup").returncode == 0


BAD_CONFIGS = {
    "unknown namespace": (
        lambda c: c["linux"]["namespaces"].append({"type": "time-travel"}),
        "linux.namespaces[6].type",
    ),
    "unknown mount type": (
        lambda c: c["mounts"].append({"destination": "/x", "type": "nfs9", "source": "x"}),
        "mounts[7]",
    ),
    "unknown seccomp action": (
        lambda c: c["linux"].update(seccomp={"defaultAction": "SCMP_ACT_EXPLODE"}),
        "SCMP_ACT_EXPLODE",
    ),
    "bad memory value": (
        lambda c: c["linux"].update(resources={"memory": {"limit": "lots"}}),
        "linux.resources.memory.limit",
    ),
    "missing rootfs": (lambda c: c["root"].update(path="no-such-dir"), "root.path"),
    "unknown capability": (
        lambda c: c["process"]["capabilities"]["bounding"].append("CAP_WIZARD"),
        "CAP_WIZARD",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_names_the_field(root: Path, bundle: Path, case: str) -> None:
    mutate, expected = BAD_CONFIGS[case]
    config = default_config(["true"])
    mutate(config)
    write_config(bundle, config)
    done = _oci(root, "create", "--bundle", str(bundle), "bad")
    assert done.returncode != 0
    assert expected in done.stderr, done.stderr


def test_malformed_and_missing_config(root: Path, bundle: Path) -> None:
    (bundle / "config.json").write_text('{"ociVersion": "1.2.0",\n  "process": }')
    done = _oci(root, "create", "--bundle", str(bundle), "bad")
    assert done.returncode != 0 and "config.json:2:" in done.stderr
    (bundle / "config.json").unlink()
    done = _oci(root, "create", "--bundle", str(bundle), "bad")
    assert done.returncode != 0 and "no config.json" in done.stderr


def test_missing_executable_fails_clearly(root: Path, bundle: Path) -> None:
    _set_args(bundle, ["/no/such/program"])
    done = _oci(root, "run", "--bundle", str(bundle), "noexec")
    assert done.returncode != 0
    assert "/no/such/program" in done.stderr


def test_commands_on_unknown_container(root: Path) -> None:
    for command in (
        ["start", "ghost"],
        ["kill", "ghost"],
        ["delete", "ghost"],
        ["pause", "ghost"],
        ["exec", "ghost", "true"],
    ):
        done = _oci(root, *command)
        assert done.returncode != 0 and "does not exist" in done.stderr, command
    done = _oci(root, "delete", "--force", "ghost")  # as runc: engines make sure it is gone
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_kill_of_an_exited_container_says_what_runc_says(root: Path, bundle: Path) -> None:
    """containerd's runc shim matches "container not running" to treat the container as exited."""
    _set_args(bundle, ["true"])
    assert _oci(root, "create", "--bundle", str(bundle), "gone").returncode == 0
    assert _oci(root, "start", "gone").returncode == 0
    _wait_status(root, "gone", "stopped")
    done = _oci(root, "kill", "gone", "KILL")
    assert done.returncode != 0 and "container not running" in done.stderr, done.stderr


def test_oom_kill_is_reported_and_exit_code_returned(root: Path, bundle: Path) -> None:
    hog = "x=a; while true; do x=$x$x$x$x; done"
    _set_args(bundle, ["sh", "-c", hog])
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["resources"] = {"memory": {"limit": 32 << 20, "swap": 32 << 20}}
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "hog", timeout=60)
    assert done.returncode == 128 + signal.SIGKILL
    assert "out of memory" in done.stderr


def test_fork_bomb_stops_at_pids_limit(root: Path, bundle: Path) -> None:
    # After the bomb, count with shell builtins only (a glob, `kill -1`): no fork is left to spend.
    script = (
        "(for i in $(seq 60); do sleep 30 & done) 2>/dev/null; set -- /proc/[0-9]*; "
        "echo running=$#; kill -9 -1; exit 0"
    )
    config = default_config(["sh", "-c", script])
    config["linux"]["resources"] = {"pids": {"limit": 20}}
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "bomb", timeout=60)
    running = int(done.stdout.split("running=")[1].split()[0])
    assert running <= 20, done.stdout


_CGROUP_VIEW = (
    "ls /sys/fs/cgroup | tr '\\n' ' '; echo; "
    "cat /sys/fs/cgroup/pids.max /sys/fs/cgroup/pids/pids.max 2>/dev/null; "
    "{ cat /sys/fs/cgroup/cgroup.procs || cat /sys/fs/cgroup/unified/cgroup.procs; } 2>/dev/null | head -n1; "
    "mkdir /sys/fs/cgroup/x 2>&1 | grep -c Read-only; "
    "{ grep :pids: /proc/self/cgroup || grep ^0:: /proc/self/cgroup; } | cut -d: -f3"
)


@pytest.mark.parametrize(
    "cgroupns", [True, False, pytest.param(True, marks=pytest.mark.lab, id="lab-cgroup2")]
)
def test_cgroup_mount_shows_only_the_container_cgroup(root: Path, bundle: Path, cgroupns: bool) -> None:
    """The `cgroup` mount is the container's own cgroup, read-only, with or without a cgroup
    namespace: never the host's hierarchy with every other tenant's cgroup in it."""
    config = default_config(["sh", "-c", _CGROUP_VIEW])
    config["linux"]["resources"] = {"pids": {"limit": 64}}
    config["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
    if not cgroupns:
        config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "cgroup"]
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "cgview")
    assert done.returncode == 0, done.stderr
    listing, pids_max, first_pid, read_only, own = done.stdout.splitlines()
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2: the directory itself
        assert "cgroup.procs" in listing.split() and "stockade" not in listing
    else:  # hybrid: the hierarchies the container is in, each its own directory
        assert listing.split() == ["pids", "unified"]
    assert (pids_max, first_pid, read_only) == ("64", "1", "1")
    # The pids hierarchy's cgroup (joined by the runtime while the init set up) is the namespace root.
    assert own == ("/" if cgroupns else "/stockade/cgview")


_ARGV_CORPUS = [
    ["run", "--bundle", "/b", "c1"],
    ["--root", "/r", "run", "-b", "/b", "-d", "c1"],
    ["--root=/r", "--log", "/l", "--log-format", "json", "create", "--bundle=/b", "--pid-file", "/p", "c1"],
    ["--debug", "--systemd-cgroup", "create", "c1", "--console-socket", "/s", "--no-pivot"],
    ["create", "--preserve-fds", "3", "c1"],
    ["--rootless", "false", "create", "--no-new-keyring", "--allow-degraded", "c1"],
    ["run", "--keep", "--detach", "c1"],
    ["start", "c1"],
    ["state", "c1"],
    ["kill", "c1"],
    ["kill", "-a", "c1", "KILL"],
    ["kill", "c1", "9"],
    ["delete", "-f", "c1"],
    ["delete", "c1", "--force"],
    ["pause", "c1"],
    ["resume", "c1"],
    ["--log-format", "text", "run", "-b", "", "c1"],
]


@pytest.mark.parametrize("argv", _ARGV_CORPUS, ids=" ".join)
def test_fast_argument_parsing_agrees_with_argparse(argv: list[str]) -> None:
    """Plain lifecycle invocations skip argparse; they must parse exactly as argparse does."""
    from stockade.runtime import oci_cli
    from stockade.runtime._lite.argparse import parse_simple

    fast = parse_simple(argv, oci_cli.GLOBAL_OPTIONS, oci_cli.LIFECYCLE)
    assert fast is not None
    assert vars(fast) == vars(oci_cli._parser(oci_cli._command_in(argv)).parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["run"], ["--help"], ["-v"], ["run", "--bundl", "/b", "c1"], ["run", "--bundle"],
        ["run", "-b/b", "c1"], ["run", "--", "c1"], ["kill", "c1", "-9"], ["run", "c1", "c2"],
        ["create", "--preserve-fds", "x", "c1"], ["--log-format", "xml", "run", "c1"],
        ["run", "--root", "/r", "c1"], ["exec", "c1", "sh"], ["list"],
    ],
    ids=" ".join,
)
def test_unusual_arguments_go_to_argparse(argv: list[str]) -> None:
    from stockade.runtime import oci_cli
    from stockade.runtime._lite.argparse import parse_simple

    assert parse_simple(argv, oci_cli.GLOBAL_OPTIONS, oci_cli.LIFECYCLE) is None


# Modules whose import would put milliseconds back on every container start (see ARCHITECTURE.md,
# "The start path"): each is kept off the path of a plain `stockade-oci run`.
_SLOW_MODULES = {
    "re", "enum", "argparse", "json", "typing", "pathlib", "contextlib", "collections", "dataclasses",
    "subprocess", "shutil", "logging", "socket", "_socket", "cgroupspy", "bcc", "seccomp", "yaml",
    "hashlib", "tempfile",
}


@pytest.mark.parametrize("case", ["plain", "seccomp-cached", "bpf-policy"])
def test_start_path_imports_stay_lean(root: Path, bundle: Path, case: str) -> None:
    config = default_config(["true"])
    if case == "seccomp-cached":  # what engines send: a filter (the first run compiles and caches it)
        from stockade.profiles import load_profile, profile_seccomp

        config["linux"]["seccomp"] = profile_seccomp(load_profile("runtime-default"))
    if case == "bpf-policy":  # a container under a BPF policy (the first run caches its entries)
        config["annotations"] = {"io.stockade.bpf-policy": "default"}
    write_config(bundle, config)
    if case != "plain":
        assert _oci(root, "run", "--allow-degraded", "--bundle", str(bundle), "warm").returncode == 0
    imported = _imports([OCI, "--root", str(root), "run", "--allow-degraded", "-b", str(bundle), "lean"])
    assert "stockade.runtime.container" in imported  # the log is the real one
    assert imported & _SLOW_MODULES == set()


def test_stockade_run_imports_stay_lean() -> None:
    """`stockade run` parses with argparse (and so pays for re, enum, pathlib) and sets a pids
    limit (cgroupspy's controllers on a v1 host, without its logging), but a cached profile keeps
    the profile package, YAML and the rest of the slow modules off its path."""
    command = [str(Path(OCI).parent / "stockade"), "run", "--allow-degraded", "--", "true"]
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0  # caches the profile
    imported = _imports(command)
    assert "stockade.runtime.sandbox" in imported
    allowed = {"re", "enum", "argparse", "pathlib", "contextlib", "collections", "cgroupspy"}
    assert imported & (_SLOW_MODULES - allowed) == set()
    assert not {m for m in imported if m.startswith("stockade.profiles")}


def _imports(command: list[str]) -> set[str]:
    """The modules COMMAND imports (python -X importtime)."""
    with tempfile.TemporaryFile() as err:
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=60,
            env=dict(os.environ, PYTHONPROFILEIMPORTTIME="1"),
        )
        err.seek(0)
        log = err.read().decode()
    assert done.returncode == 0, log[-2000:]
    lines = [line for line in log.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines}


@pytest.mark.parametrize("where", ["host", pytest.param("lab", marks=pytest.mark.lab)])
def test_device_rules_bind_the_container(root: Path, bundle: Path, where: str) -> None:
    """Only the allowed devices (the OCI defaults here) can be created or opened, on every cgroup
    mode: v1 devices on pure v1, the cgroup-device BPF program on hybrid and v2 hosts."""
    script = (
        "mknod /tmp/kmsg c 1 11 2>&1 | grep -c 'Operation not permitted'; "
        "mknod /tmp/sda b 8 0 2>&1 | grep -c 'Operation not permitted'; "
        "mknod /tmp/null c 1 3 && echo mknod-ok; echo x > /dev/null && echo null-ok"
    )
    config = _sh(script, "CAP_MKNOD")
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "devs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "mknod-ok", "null-ok"]


@pytest.mark.parametrize("user", [0, 1000])
def test_engine_default_filter_without_no_new_privs(root: Path, bundle: Path, user: int) -> None:
    """What podman, containerd's CRI plugin and Docker send by default: the RuntimeDefault filter,
    noNewPrivileges unset, no CAP_SYS_ADMIN. The filter goes in while the init may still load it."""
    from stockade.profiles import load_profile, profile_seccomp

    config = default_config(["sh", "-c", "id -u; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; exit 3"])
    config["process"]["noNewPrivileges"] = False
    config["process"]["user"] = {"uid": user, "gid": user}
    config["linux"]["seccomp"] = profile_seccomp(load_profile("runtime-default"))
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "nnp-off")
    assert done.returncode == 3, done.stderr
    assert done.stdout.split() == [str(user), "NoNewPrivs:", "0", "Seccomp:", "2"]


def test_containerd_slice_cgroups_path_with_cgroupfs(root: Path, bundle: Path) -> None:
    """containerd turns a pod cgroup parent ending in ".slice" into slice:prefix:name even with
    the cgroupfs driver; runc's cgroupfs driver takes it as one directory name, and so do we."""
    config = _set_args(bundle, ["sh", "-c", "cat /proc/self/cgroup"])
    config["linux"]["cgroupsPath"] = "stockade-test.slice:cri-containerd:stockade-slice"
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "stockade-slice")
    assert done.returncode == 0, done.stderr
    assert not any(Path("/sys/fs/cgroup").glob("*/stockade-test.slice:cri-containerd:stockade-slice"))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"user": {"uid": 1000, "gid": 1000}, "cwd": "/root"}, "cannot enter cwd '/root' as uid 1000"),
        ({"args": ["/bin/nothing-here"]}, "no such file"),
        ({"user": {"uid": 1000, "gid": 1000}, "args": ["/bin/root-only"]}, "permission denied"),
    ],
)
def test_a_process_that_cannot_start_fails_at_create(
    root: Path, bundle: Path, change: dict, reason: str
) -> None:
    """Everything but the exec itself happens before the init waits for `start` (runc's order)."""
    (bundle / "rootfs/root").chmod(0o700)
    shutil.copy(bundle / "rootfs/bin/busybox", bundle / "rootfs/bin/root-only")
    (bundle / "rootfs/bin/root-only").chmod(0o700)
    config = default_config(["true"])
    config["process"].update(change)
    write_config(bundle, config)
    done = _oci(root, "create", "--bundle", str(bundle), "cannot-start")
    assert done.returncode == 1 and reason in done.stderr, done.stderr
    assert _oci(root, "state", "cannot-start").returncode != 0  # nothing left behind


@pytest.mark.parametrize(("propagation", "back_to_host"), [("rshared", True), ("", False)])
def test_rootfs_propagation(
    root: Path, bundle: Path, tmp_path: Path, propagation: str, back_to_host: bool
) -> None:
    """rootfsPropagation rshared: a mount made inside a shared bind mount reaches the host, and one
    made on the host reaches the container (runc's behaviour). Without it, only the host's do."""
    shared = tmp_path / "shared"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stockade-test", str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(shared)], check=True)
        for d in ("in", "h"):
            (shared / d).mkdir()
        script = (
            "mount -t tmpfs c /mnt/shared/in && touch /mnt/shared/in/c /mnt/shared/ready; i=0; "
            "while [ ! -e /mnt/shared/h/h ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
            "[ -e /mnt/shared/h/h ] && echo saw-host; umount /mnt/shared/in"
        )
        config = _sh(script, "CAP_SYS_ADMIN")
        config["mounts"].append(
            {"destination": "/mnt/shared", "type": "bind", "source": str(shared),
             "options": ["rbind", "rshared"]}
        )
        if propagation:
            config["linux"]["rootfsPropagation"] = propagation
        write_config(bundle, config)
        with open(tmp_path / "out", "w+") as out:
            proc = subprocess.Popen(
                [OCI, "--root", str(root), "run", "--bundle", str(bundle), "propagation"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
            _wait_until(lambda: (shared / "ready").exists() or proc.poll() is not None)
            seen_on_host = (shared / "in" / "c").exists()
            subprocess.run(["mount", "-t", "tmpfs", "h", str(shared / "h")], check=True)
            (shared / "h" / "h").touch()
            assert proc.wait(timeout=30) == 0
            out.seek(0)
            assert out.read().split() == ["saw-host"]
        assert seen_on_host == back_to_host
    finally:
        subprocess.run(["umount", "-R", "-l", str(shared)], check=False)


@pytest.mark.parametrize("where", ["host", pytest.param("lab", marks=pytest.mark.lab)])
def test_linux_devices_are_created_and_the_filter_still_binds(root: Path, bundle: Path, where: str) -> None:
    """linux.devices are made although the device filter is attached before the init runs; the
    filter still decides who may open them (here: nobody, as the resources allow nothing more)."""
    script = (
        "stat -c '%t:%T:%a' /dev/kmsg /dev/loop-test; cat /dev/kmsg 2>&1 | grep -c 'not permitted'; "
        "mknod /tmp/sda b 8 0 2>&1 | grep -c 'not permitted'"
    )
    config = _sh(script, "CAP_MKNOD")
    config["linux"]["devices"] = [
        {"path": "/dev/kmsg", "type": "c", "major": 1, "minor": 11, "fileMode": 0o600, "uid": 0, "gid": 0},
        {"path": "/dev/loop-test", "type": "b", "major": 7, "minor": 200, "fileMode": 0o640},
    ]
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "linux-devices")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1:b:600", "7:c8:640", "1", "1"]


def test_no_op_fields_runc_tolerates_are_logged(root: Path, bundle: Path, tmp_path: Path) -> None:
    """Deprecated kernel memory limits and data options on a bind mount do nothing (in runc too):
    accepted, with a warning in the --log file the shims read; a misspelt flag is still refused."""
    data = tmp_path / "data"
    data.mkdir()
    config = default_config(["sh", "-c", "cat /proc/self/mountinfo | grep -c ' /data '"])
    config["linux"]["resources"] = {"memory": {"limit": 64 << 20, "kernel": 32 << 20, "kernelTCP": 8 << 20}}
    config["mounts"].append(
        {"destination": "/data", "type": "bind", "source": str(data), "options": ["rbind", "ro", "mode=755"]}
    )
    write_config(bundle, config)
    log = tmp_path / "log.json"
    done = _oci(root, "--log", str(log), "--log-format", "json", "run", "--bundle", str(bundle), "tolerated")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]
    warnings = [json.loads(line) for line in log.read_text().splitlines()]
    assert {w["level"] for w in warnings} == {"warning"}
    text = " | ".join(w["msg"] for w in warnings)
    assert "mode=755 ignored on a bind mount" in text
    assert "memory.kernel ignored" in text and "memory.kernelTCP ignored" in text

    config["mounts"][-1]["options"] = ["rbind", "nosiud"]
    write_config(bundle, config)
    done = _oci(root, "run", "--bundle", str(bundle), "typo")
    assert done.returncode == 1 and "unknown mount option 'nosiud'" in done.stderr


def test_second_interrupt_kills_without_the_container_lock(root: Path, bundle: Path, tmp_path: Path) -> None:
    """A second Ctrl-C kills everything at once, even while the container's lock is held (by
    `start` or `delete` in the same process, which a handler taking the lock would deadlock on;
    here by the test)."""
    import fcntl

    _set_args(bundle, ["sh", "-c", "trap '' INT TERM; echo ready; sleep 100"])
    with open(tmp_path / "out", "w+") as out:
        proc = subprocess.Popen(
            [OCI, "--root", str(root), "run", "--bundle", str(bundle), "interrupted"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
        _wait_until(lambda: "ready" in (tmp_path / "out").read_text())
        pid = _state(root, "interrupted")["pid"]
        lock = os.open(root / "interrupted", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            _wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), seconds=10)
        finally:
            os.close(lock)
        assert proc.wait(timeout=30) == 128 + signal.SIGKILL


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_global_flags_do_what_they_say(root: Path, bundle: Path, tmp_path: Path) -> None:
    """--debug logs the steps; --rootless true (or a bad value) is refused, not ignored."""
    log = tmp_path / "debug.json"
    done = _oci(root, "--debug", "--log", str(log), "--log-format", "json", "run", "-b", str(bundle), "dbg")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert {line["level"] for line in lines} == {"debug"}
    text = " | ".join(line["msg"] for line in lines)
    assert f"stockade-oci --root {root} --debug" in text and "run: exit 0" in text
    assert "dbg: cgroup " in text and "dbg: init pid " in text
    refusals = (("true", "rootless mode is not supported"), ("maybe", "expected true, false or auto"))
    for value, message in refusals:
        done = _oci(root, "--rootless", value, "run", "--bundle", str(bundle), "rootless")
        assert done.returncode == 1 and message in done.stderr, done.stderr
    assert _oci(root, "--rootless", "false", "run", "--bundle", str(bundle), "rootful").returncode == 0


def test_a_filter_the_kernel_would_refuse_fails_at_create(root: Path, bundle: Path) -> None:
    """A filter longer than the kernel takes (BPF_MAXINSNS) is `create`'s error, said before
    the kernel would answer EINVAL, with what to do."""
    config = default_config(["true"])
    ioctls = [{"index": 1, "value": 0x10000 + i, "op": "SCMP_CMP_EQ"} for i in range(4500)]
    config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "args": [a]} for a in ioctls],
    }
    write_config(bundle, config)
    done = _oci(root, "create", "--bundle", str(bundle), "refused-filter")
    assert done.returncode == 1 and "more than the kernel's 4096" in done.stderr, done.stderr
    assert _oci(root, "state", "refused-filter").returncode != 0  # nothing left behind


def test_an_unmapped_user_fails_at_create(root: Path, bundle: Path) -> None:
    config = userns_config(["true"], size=1000)
    config["process"]["user"] = {"uid": 5000, "gid": 5000}
    write_config(bundle, config)
    done = _oci(root, "create", "--bundle", str(bundle), "unmapped")
    assert done.returncode == 1 and "uid 5000 is not mapped in the user namespace" in done.stderr, done.stderr
    assert _oci(root, "state", "unmapped").returncode != 0
