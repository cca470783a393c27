"""`stockade run` on the built-in root filesystem: confinement, limits, exit codes, cleanup."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftovers import new_since, snapshot
from terminals import Pty

STOCKADE = str(Path(sys.executable).parent / "stockade")


@pytest.fixture(autouse=True)
def nothing_left(tmp_path: Path) -> Iterator[None]:
    before = snapshot()
    yield
    assert new_since(before) == {}
    assert not list(Path("/run").glob("stockade-rootfs-*"))


def run(
    *args: str, timeout: float = 60, env: dict | None = None, degraded: bool = True
) -> subprocess.CompletedProcess:
    """stockade run; by default with --allow-degraded, since this host lacks BPF-LSM (tested below)."""
    extra = ["--allow-degraded"] if degraded else []
    return subprocess.run(
        [STOCKADE, "run", *extra, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def sh(script: str, *opts: str, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    return run(*opts, "--", "/bin/sh", "-c", script, **kw)


def test_runs_in_user_namespace_as_unprivileged_host_ids() -> None:
    done = sh("cat /proc/self/uid_map; id -u; echo $$")
    assert done.returncode == 0, done.stderr
    mapping, uid, pid = done.stdout.split("\n")[:3]
    assert mapping.split() == ["0", "100000", "65536"]
    assert uid == "0" and pid == "1"


def test_tenants_get_distinct_id_ranges() -> None:
    a = sh("cat /proc/self/uid_map", "--tenant", "alpha").stdout.split()
    b = sh("cat /proc/self/uid_map", "--tenant", "beta").stdout.split()
    assert a[1] != b[1] and int(a[1]) >= 100000 and int(b[1]) >= 100000


def test_default_rootfs_is_read_only_private_and_offline() -> None:
    script = (
        "touch /usr/x 2>/dev/null && echo usr-writable; echo ok > /tmp/t && cat /tmp/t; "
        "ls /sys/class/net; ls -A /home /root | grep -v -e '^/' -e '^$' || echo no-home; "
        "ls /proc | grep -c '^[0-9]'; test -e /run/dbus/system_bus_socket || echo no-host-sockets"
    )
    done = sh(script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split()
    assert "usr-writable" not in lines
    assert lines[:2] == ["ok", "lo"]  # private /tmp; only loopback
    assert "no-home" in lines and "no-host-sockets" in lines
    assert int(lines[3]) <= 4  # sh, ls, grep (+ a subshell): no host processes


def test_restricted_profile_denies_escape_syscalls_with_eperm() -> None:
    done = sh("unshare -U true; echo unshare=$?")
    assert "unshare=1" in done.stdout
    assert "Operation not permitted" in done.stderr


def test_capabilities_and_no_new_privs() -> None:
    done = sh("grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status")
    fields = dict(line.split(":\t") for line in done.stdout.splitlines())
    assert fields["NoNewPrivs"] == "1"
    assert int(fields["CapEff"], 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN
    assert int(fields["CapBnd"], 16) & (1 << 13) == 0  # no CAP_NET_RAW


def test_user_env_workdir_and_bind() -> None:
    # The bind source must be reachable by the container's mapped root (pytest's tmp_path is 0700).
    tmp_path = Path(tempfile.mkdtemp(prefix="stockade-test-bind-"))
    tmp_path.chmod(0o755)
    (tmp_path / "data.txt").write_text("payload\n")
    done = sh(
        "id -u; echo $GREETING; pwd; cat /data/data.txt; touch /data/new 2>/dev/null || echo ro",
        "--user",
        "1000:1000",
        "--env",
        "GREETING=hi",
        "--workdir",
        "/tmp",
        "--bind",
        f"{tmp_path}:/data:ro",
    )
    assert done.returncode == 0, done.stderr
    shutil.rmtree(tmp_path)
    assert done.stdout.split() == ["1000", "hi", "/tmp", "payload", "ro"]


def test_exit_code_and_signal_come_back() -> None:
    assert sh("exit 42").returncode == 42
    # PID 1 cannot be killed from inside by a signal it has no handler for: use a child.
    assert sh("sh -c 'kill -9 $$'; exit $?").returncode == 128 + signal.SIGKILL


def test_memory_hog_is_oom_killed_and_reported() -> None:
    done = run(
        "--memory",
        "64M",
        "--",
        "python3",
        "-c",
        "b = bytearray(512 << 20); b[::4096] = b'x' * (len(b) // 4096)",
    )
    assert done.returncode == 128 + signal.SIGKILL
    assert "out of memory" in done.stderr


def test_pids_limit_stops_fork_bomb() -> None:
    script = "(for i in $(seq 80); do sleep 30 & done) 2>/dev/null; set -- /proc/[0-9]*; echo $#; kill -9 -1"
    done = sh(script, "--pids", "24")
    assert int(done.stdout.split()[0]) <= 24


def test_timeout_kills_everything_and_returns_124() -> None:
    start = time.monotonic()
    done = sh("sleep 300 & sleep 300", "--timeout", "1")
    assert done.returncode == 124
    assert "timed out" in done.stderr
    assert time.monotonic() - start < 20


def test_sigint_forwarded_and_cleaned_up(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            STOCKADE,
            "run",
            "--allow-degraded",
            "--",
            "/bin/sh",
            "-c",
            "trap 'exit 9' INT; echo ready; while :; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--memory", "12Q"], "--memory"),
        (["--cpus", "abc"], "--cpus"),
        (["--pids", "0"], "--pids"),
        (["--bind", "/no/such/dir:/x"], "does not exist"),
        (["--user", "bob"], "--user"),
        (["--net", "host"], "--net"),
        (["--profile", "no-such-profile"], "no-such-profile"),
        (["--rootfs", "/no/such/rootfs"], "--rootfs"),
    ],
)
def test_bad_input_is_refused_clearly(args: list[str], message: str) -> None:
    done = run(*args, "--", "true")
    assert done.returncode != 0
    assert message in done.stderr, done.stderr


def test_missing_command_is_refused() -> None:
    done = run()
    assert done.returncode != 0 and "no command" in done.stderr
    done = run("--", "/no/such/program")
    assert done.returncode != 0 and "/no/such/program" in done.stderr


METADATA_CONNECT = """
import errno, socket
s = socket.socket()
try:
    s.connect(("169.254.169.254", 80))
except OSError as e:
    print(errno.errorcode[e.errno])
"""


def test_missing_bpf_layer_refuses_without_opt_in() -> None:
    from stockade.bpf import maps, policy

    _, required = policy.load_compiled("default")
    missing = maps.missing_layers(required)
    done = run("--", "true", degraded=False)
    if not missing:  # a host with BPF-LSM and a running agent enforces everything
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode != 0
    assert "needs" in done.stderr and "--allow-degraded" in done.stderr
    done = run("--", "true")
    assert done.returncode == 0 and "running without bpf:" in done.stderr


def test_default_bpf_policy_enforced_through_the_agent(tmp_path: Path) -> None:
    """A private agent (own pins, own parent cgroup): the cloud-metadata address is unreachable
    (ENETUNREACH) in the container's namespace of its own, which has nothing but loopback, so no
    egress program is put on its cgroup (tests/test_bpf_cgroup.py has the cases that need one,
    refused with EPERM); the policy's map entries are gone after the run."""
    from bpf_helpers import cleanup_agent, make_agent

    agent = make_agent(tmp_path, "run")
    try:
        agent.run("--load-only", "--no-lsm")
        env = dict(agent.env, STOCKADE_CGROUP_PARENT=Path(agent.cgroup_root).name)
        done = run("--", "python3", "-c", METADATA_CONNECT, env=env)
        assert done.stdout.split() == ["ENETUNREACH"], done.stderr
        status = json.loads(agent.run("--status").stdout)
        assert status["policies"] == 0
    finally:
        cleanup_agent(agent)


def test_a_cgroup_outside_the_agents_root_is_not_called_covered(tmp_path: Path) -> None:
    """The cgroup-BPF programs run only below the agent's cgroup root: a container elsewhere has
    its policy's cgroup layers reported missing (refused without --allow-degraded), never
    counted as enforced because the agent is up."""
    from bpf_helpers import cleanup_agent, make_agent

    agent = make_agent(tmp_path, "cover")
    try:
        agent.run("--load-only", "--no-lsm")
        inside = dict(agent.env, STOCKADE_CGROUP_PARENT=Path(agent.cgroup_root).name)
        outside = dict(agent.env, STOCKADE_CGROUP_PARENT=f"stockade-elsewhere-{tmp_path.name[-6:]}")
        refused_inside = run("--", "true", env=inside, degraded=False)
        refused_outside = run("--", "true", env=outside, degraded=False)
        assert refused_inside.returncode != 0 and "cgroup_sock" not in refused_inside.stderr  # lsm only
        assert refused_outside.returncode != 0 and "cgroup_sock, cgroup_sock_addr" in refused_outside.stderr
        degraded = run("--", "python3", "-c", METADATA_CONNECT, env=outside)
        assert "running without bpf:cgroup_sock" in degraded.stderr and degraded.stdout.split() != ["EPERM"]
    finally:
        cleanup_agent(agent)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            for leftover in hierarchy.glob("stockade-elsewhere-*"):
                for child in sorted(leftover.rglob("*"), reverse=True):
                    if child.is_dir():
                        child.rmdir()
                leftover.rmdir()


def test_loopback_is_up_and_the_only_interface() -> None:
    script = (
        "import os, socket\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "socket.create_connection(s.getsockname(), timeout=2)\n"
        "print(' '.join(sorted(os.listdir('/sys/class/net'))), 'loopback-ok')\n"
    )
    done = run("--", "python3", "-c", script)
    assert done.stdout.split() == ["lo", "loopback-ok"], done.stderr


def test_container_variable_names_the_runtime() -> None:
    assert sh('echo "$container"').stdout.strip() == "stockade"
    assert sh('echo "$container"', "--env", "container=other").stdout.strip() == "other"


@pytest.fixture
def console_dirs() -> Iterator[None]:
    before = set(Path(tempfile.gettempdir()).glob("stockade-console-*"))
    yield
    assert set(Path(tempfile.gettempdir()).glob("stockade-console-*")) == before


def test_interactive_shell_with_pty_resize_and_job_control(console_dirs: None) -> None:
    """`stockade run -it -- bash`, as `podman run -it`: a pty of its own with the caller's size,
    resized on SIGWINCH; Ctrl-C and Ctrl-Z go to the container's foreground job; the exit code."""
    term = Pty([STOCKADE, "run", "--allow-degraded", "-it", "--", "bash", "--norc", "--noprofile", "-i"])
    try:
        term.expect("# ")
        term.type("stty size; tty; echo $container\r")
        out = term.expect("stockade\r\n")
        assert "30 100\r\n/dev/pts/0\r\n" in out
        term.resize(40, 120)
        term.proc.send_signal(signal.SIGWINCH)
        term.type("read x; stty size\r")
        time.sleep(0.5)  # the resize is done before the shell reads the line
        term.type("go\r")
        assert "40 120" in term.expect("40 120")
        term.type("sleep 60\r")
        time.sleep(0.5)
        term.type("\x03")  # Ctrl-C interrupts the container's job, not the run
        term.type("echo after-int\r")
        term.expect("after-int\r\n")
        term.type("sleep 60\r")
        time.sleep(0.5)
        term.type("\x1a")  # Ctrl-Z stops it: job control inside
        assert "Stopped" in term.expect("Stopped")
        # bash learns of the killed job from SIGCHLD: until then `exit` refuses ("There are stopped jobs")
        term.type("kill -9 %1; sleep 1; jobs; exit 5\r")
        assert term.proc.wait(timeout=30) == 5
    finally:
        term.close()


def test_stdin_only_with_interactive() -> None:
    """Without -i the workload reads /dev/null (as podman run); with -i the caller's stdin."""
    for opts, expect in (((), ""), (("-i",), "from-caller")):
        done = subprocess.run(
            [STOCKADE, "run", "--allow-degraded", *opts, "--", "cat"],
            input="from-caller", capture_output=True, text=True, timeout=60,
        )
        assert (done.returncode, done.stdout) == (0, expect), done.stderr
