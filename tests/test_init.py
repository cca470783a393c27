"""The container init on the real kernel: spawn(), a tiny start/wait driver, exec_process().

Each test builds a busybox bundle, creates the container with spawn(), releases it through the
exec fifo (what `start` does) and waits for it (spawn makes this process a child subreaper).
Output of the container goes to a pipe that replaces fds 1/2 while spawn() forks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from bundles import default_config, make_bundle, remove_bundle, userns_config, write_config  # noqa: E402
from kernel import needs_root, require  # noqa: E402, F401 (needs_root: a fixture, used by name)
from stockade.runtime import console  # noqa: E402
from stockade.runtime import spawn as spawning  # noqa: E402
from stockade.runtime.errors import NotSupported, SpecError, StockadeError  # noqa: E402
from stockade.runtime.exec_process import exec_process  # noqa: E402
from stockade.runtime.init import Launch, spawn  # noqa: E402
from stockade.runtime.spec import load_bundle, parse_process  # noqa: E402

pytestmark = pytest.mark.usefixtures("needs_root")


def _mounts() -> list[str]:
    """Host mounts, without /run/netns (`ip netns` makes it a mount point on first use)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        root, point = line.split()[3:5]
        if not point.startswith(("/run/netns", "/var/run/netns")) or "stockade" in point:
            out.append(f"{root} {point}")
    return out


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Nothing may survive a test: no host mount, no child process."""
    before = _mounts()
    yield
    leftover_children = []
    deadline = time.monotonic() + 2  # processes a pid namespace's end killed may still be exiting
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        elif pid == 0:  # a live child: kill it so later tests are not affected, then fail
            leftover_children.append(_children())
            for child in _children():
                os.kill(child, signal.SIGKILL)
    assert _mounts() == before, "host mount table changed"
    assert not leftover_children, f"processes left behind: {leftover_children}"


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                out.append(int(pid))
        except OSError:
            pass
    return out


@pytest.fixture
def bundle() -> Iterator[Path]:
    b = make_bundle(["true"])
    yield b
    remove_bundle(b)


@dataclass
class Created:
    pid: int
    fifo: Path
    out: int  # read end of the container's stdout+stderr

    def start(self) -> None:
        fd = os.open(self.fifo, os.O_RDONLY)
        try:
            assert os.read(fd, 1) == b"0"
        finally:
            os.close(fd)
            self.fifo.unlink()

    def wait(self) -> tuple[int, str]:
        _, status = os.waitpid(self.pid, 0)
        chunks = []
        while chunk := os.read(self.out, 65536):
            chunks.append(chunk)
        os.close(self.out)
        return os.waitstatus_to_exitcode(status), b"".join(chunks).decode(errors="replace")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.wait()


@contextlib.contextmanager
def _stdio_to(fd: int) -> Iterator[None]:
    """fds 0/1/2 of whatever forks inside: /dev/null in, `fd` out."""
    saved = [os.dup(n) for n in (0, 1, 2)]
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        for n, s in enumerate(saved):
            os.dup2(s, n)
            os.close(s)
        os.close(null)


def create(bundle: Path, config: dict, **launch_args) -> Created:
    write_config(bundle, config)
    spec = load_bundle(bundle)
    fifo = bundle / "exec.fifo"
    with contextlib.suppress(FileNotFoundError):
        fifo.unlink()
    os.mkfifo(fifo)
    os.chmod(fifo, 0o622)  # as container.create makes it
    r, w = os.pipe()
    try:
        with _stdio_to(w):
            launch = Launch(
                spec=spec,
                bundle=bundle,
                rootfs=Path(spec.rootfs(bundle)),
                exec_fifo=fifo,
                cgroup_procs=launch_args.pop("cgroup_procs", []),
                seccomp_program=launch_args.pop("seccomp_program", None),
                seccomp_flags=launch_args.pop("seccomp_flags", []),
                **launch_args,
            )
            pid = spawn(launch)
            launch.cgroup_move.wait()  # as container.create does before it returns
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return Created(pid, fifo, r)


def run(bundle: Path, config: dict, **launch_args) -> tuple[int, str]:
    c = create(bundle, config, **launch_args)
    c.start()
    return c.wait()


def sh(script: str, config: dict | None = None) -> dict:
    cfg = config or default_config()
    cfg["process"]["args"] = ["sh", "-c", script]
    return cfg


# --- isolation -------------------------------------------------------------------------------


def test_pid1_private_proc_and_hostname(bundle: Path) -> None:
    code, out = run(bundle, sh("echo $$; ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; hostname"))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "1"
    assert set(lines[1].split()) <= {"1", "2", "3", "4"}  # sh, ls, grep, tr only
    assert lines[2] == "stockade"
    assert socket.gethostname() != "stockade"


def test_exit_code_and_signal(bundle: Path) -> None:
    assert run(bundle, sh("exit 7"))[0] == 7
    assert run(bundle, sh("kill -9 $$; echo survived"))[1] == "survived\n"  # PID 1 ignores its own namespace
    c = create(bundle, default_config(["sleep", "30"]))
    c.start()
    os.kill(c.pid, signal.SIGKILL)
    assert c.wait()[0] == -9


def test_capabilities_and_no_new_privs(bundle: Path) -> None:
    code, out = run(bundle, sh("grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status"))
    assert code == 0, out
    status = dict(line.split(":\t") for line in out.splitlines())
    want = (1 << 29) | (1 << 5) | (1 << 10)  # AUDIT_WRITE, KILL, NET_BIND_SERVICE
    assert int(status["CapEff"], 16) == want
    assert int(status["CapBnd"], 16) == want
    assert status["NoNewPrivs"] == "1"


def test_non_root_user_with_ambient_capability(bundle: Path) -> None:
    cfg = sh("id -u; id -G; umask; grep -E '^(CapEff|CapAmb)' /proc/self/status")
    cfg["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [5], "umask": 0o27}
    caps = ["CAP_NET_RAW"]
    cfg["process"]["capabilities"] = {
        k: caps for k in ("bounding", "effective", "permitted", "inheritable", "ambient")
    }
    code, out = run(bundle, cfg)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "1000" and lines[1].split() == ["1000", "5"] and lines[2] == "0027"
    status = dict(line.split(":\t") for line in lines[3:])
    assert int(status["CapEff"], 16) == 1 << 13 == int(status["CapAmb"], 16)


def without_cap_sys_resource(attempt: Callable[[], object]) -> str:
    """ATTEMPT's outcome in a forked child whose bounding, permitted and effective sets lack
    CAP_SYS_RESOURCE (a runtime on a host that withholds it, whatever this host grants): "ok",
    or "<exception class> <where> <message>"."""
    import prctl

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports through the pipe and never returns into pytest
        os.close(r)
        try:
            prctl.capbset_drop(prctl.CAP_SYS_RESOURCE)
            prctl.cap_permitted.sys_resource = False  # and so from the effective set
            attempt()
            out = "ok"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as text
            out = f"{type(exc).__name__} {getattr(exc, 'where', '')} {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_capability_the_runtime_lacks_is_refused(bundle: Path) -> None:
    cfg = default_config(["true"])
    cfg["process"]["capabilities"]["bounding"].append("CAP_SYS_RESOURCE")
    out = without_cap_sys_resource(lambda: create(bundle, cfg).kill())
    assert out.startswith(f"{NotSupported.__name__} process.capabilities.bounding[3] "), out
    assert "CAP_SYS_RESOURCE" in out


def test_readonly_root_and_paths(bundle: Path) -> None:
    code, out = run(
        bundle, sh("touch /x 2>&1; echo 1 > /proc/sys/kernel/domainname 2>&1; touch /tmp/ok && echo tmp-ok")
    )
    assert code == 0, out
    assert out.count("Read-only file system") == 2, out
    assert "tmp-ok" in out


def test_masked_paths(bundle: Path) -> None:
    code, out = run(
        bundle, sh("wc -c < /proc/timer_list; ls -A /sys/firmware | wc -l; cat /proc/keys | wc -c")
    )
    assert code == 0, out
    assert out.split() == ["0", "0", "0"]
    assert Path("/proc/timer_list").stat().st_size or Path("/proc/timer_list").read_text()


def test_mount_destination_symlink_stays_in_rootfs(bundle: Path) -> None:
    # An image symlink pointing at the host's /etc must not redirect the tmpfs onto the host.
    os.symlink("/etc", bundle / "rootfs/escape")
    cfg = sh("mount | grep -c ' /etc/x type tmpfs'")
    cfg["mounts"].append({"destination": "/escape/x", "type": "tmpfs", "source": "tmpfs"})
    code, out = run(bundle, cfg)
    assert (code, out.strip()) == (0, "1"), out
    assert not Path("/etc/x").exists()
    assert (bundle / "rootfs/etc/x").is_dir()


def test_bind_mount_readonly(bundle: Path) -> None:
    data = bundle / "data"
    data.mkdir()
    (data / "f").write_text("hello")
    cfg = sh("cat /data/f; echo >> /data/f")
    cfg["mounts"].append(
        {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "ro"]}
    )
    code, out = run(bundle, cfg)
    assert out.startswith("hello") and "Read-only file system" in out and code != 0


def test_sysctl_rlimits_oom(bundle: Path) -> None:
    cfg = sh("cat /proc/sys/net/ipv4/ip_forward; ulimit -n; ulimit -Hn; cat /proc/self/oom_score_adj")
    cfg["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]
    cfg["process"]["oomScoreAdj"] = 500
    host_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    code, out = run(bundle, cfg)
    assert code == 0, out
    assert out.split() == ["1", "123", "456", "500"]
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forward


def test_negative_oom_score_is_reported(bundle: Path) -> None:
    cfg = default_config(["true"])
    cfg["process"]["oomScoreAdj"] = -500
    try:
        c = create(bundle, cfg)
    except StockadeError as exc:
        assert exc.where == "process.oomScoreAdj" and "CAP_SYS_RESOURCE" in exc.hint
    else:  # the host allows it (CAP_SYS_RESOURCE): then it must be applied
        c.start()
        c.wait()


def test_rlimit_above_hard_limit_is_reported(bundle: Path) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # never unlimited: fs.nr_open bounds it
    cfg = default_config(["true"])
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": hard + 1, "hard": hard + 1}]
    out = without_cap_sys_resource(lambda: create(bundle, cfg).kill())  # with it, the init may raise it
    assert out.startswith(f"{StockadeError.__name__} process.rlimits[0] "), out
    assert f"the runtime's own hard limit is {hard}" in out


def test_executable_not_found_fails_create(bundle: Path) -> None:
    with pytest.raises(StockadeError, match=r"executable file not found in \$PATH") as info:
        create(bundle, default_config(["no-such-program"]))
    assert info.value.where == "process.args[0]"


def test_bad_mount_fails_create_cleanly(bundle: Path) -> None:
    cfg = default_config(["true"])
    cfg["mounts"].append({"destination": "/x", "type": "bind", "source": "/nonexistent-stockade"})
    with pytest.raises(StockadeError) as info:
        create(bundle, cfg)
    assert info.value.where == f"mounts[{len(cfg['mounts']) - 1}]"


# --- user namespace --------------------------------------------------------------------------


def _userns_ok() -> bool:
    return Path("/proc/sys/user/max_user_namespaces").read_text().strip() != "0"


def test_user_namespace_binds_sources_its_root_cannot_reach(bundle: Path) -> None:
    """kubelet's volumes live below /var/lib/kubelet (0700): the container's mapped root could
    not look the source up, so the init takes it as host root before entering the user
    namespace. Directories and files, recursive and not, read-only honoured; a shared source
    stays a one-way street (a mount made inside does not reach the host)."""
    require(_userns_ok(), "user namespaces disabled")
    private = Path(tempfile.mkdtemp(prefix="stockade-test-private-", dir="/var/tmp"))
    vol = private / "vol"
    vol.mkdir()
    tmpfs = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0777"]
    subprocess.run([*tmpfs, "stockade-test-vol", str(vol)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(vol)], check=True)
        (vol / "data").write_text("from the volume\n")
        (private / "token").write_text("secret-token\n")
        script = ("cat /tmp/data /etc/group; touch /tmp/new && echo wrote; "
                  "touch /root/x 2>/dev/null || echo ro; "
                  "mkdir /tmp/m && mount -t tmpfs inner /tmp/m && echo mounted")
        cfg = sh(script, userns_config())
        caps = cfg["process"]["capabilities"]
        cfg["process"]["capabilities"] = {k: [*v, "CAP_SYS_ADMIN"] for k, v in caps.items()}
        # onto what the rootfs has: its root cannot make new mount points in a host-owned rootfs
        binds = (("/tmp", "vol", ["rbind", "rw"]), ("/etc/group", "token", ["bind", "ro"]),
                 ("/root", "vol", ["rbind", "ro"]))
        cfg["mounts"] += [{"destination": dest, "type": "bind", "source": str(private / src), "options": opts}
                          for dest, src, opts in binds]
        code, out = run(bundle, cfg)
        assert code == 0, out
        assert out.splitlines() == ["from the volume", "secret-token", "wrote", "ro", "mounted"], out
        assert (vol / "new").exists() and (vol / "m").is_dir()
        assert " inner " not in Path("/proc/self/mountinfo").read_text()
    finally:
        subprocess.run(["umount", "-R", str(vol)], check=False)
        shutil.rmtree(private)
    assert "stockade-test-private" not in Path("/proc/self/mountinfo").read_text()


def test_user_namespace_maps(bundle: Path) -> None:
    require(_userns_ok(), "user namespaces disabled")
    cfg = sh(
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; echo $$; ls -ln /bin/busybox", userns_config()
    )
    code, out = run(bundle, cfg)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["0", "100000", "65536"] and lines[1].split() == ["0", "100000", "65536"]
    assert lines[2:4] == ["0", "1"]
    assert lines[4].split()[2] == "65534"  # host root is unmapped: shows as the overflow uid


# --- joining namespaces by path --------------------------------------------------------------


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"stockade-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # A namespaced sysctl as the marker that we are in that netns.
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_default_ttl=77"], check=True
        )
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_join_netns_by_path(bundle: Path, netns: str) -> None:
    cfg = sh("cat /proc/sys/net/ipv4/ip_default_ttl")
    cfg["linux"]["namespaces"] = [ns for ns in cfg["linux"]["namespaces"] if ns["type"] != "network"]
    cfg["linux"]["namespaces"].append({"type": "network", "path": netns})
    cfg["mounts"] = [m for m in cfg["mounts"] if m["type"] != "sysfs"]
    code, out = run(bundle, cfg)
    assert code == 0, out
    assert out.strip() == "77"


# --- terminal --------------------------------------------------------------------------------


def test_terminal_over_console_socket(bundle: Path) -> None:
    path = str(bundle / "console.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    cfg = sh("tty; [ -t 0 ] && echo stdin-is-tty; stty size")
    cfg["process"]["terminal"] = True
    cfg["process"]["consoleSize"] = {"height": 33, "width": 111}
    try:
        c = create(bundle, cfg, console_socket=path)
        conn, _ = server.accept()
        name, master = console.recv_master(conn)
        conn.close()
        c.start()
        code, _ = c.wait()
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the slave side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
    finally:
        server.close()
    out = b"".join(chunks).decode()
    assert code == 0, out
    assert name.startswith("/dev/pts/")
    assert name in out and "stdin-is-tty" in out and "33 111" in out


def test_terminal_without_socket_is_refused(bundle: Path) -> None:
    cfg = default_config(["true"])
    cfg["process"]["terminal"] = True
    with pytest.raises(SpecError, match="console socket"):
        create(bundle, cfg)


# --- hooks callbacks -------------------------------------------------------------------------


def test_hook_callbacks_run_in_order(bundle: Path) -> None:
    """The callbacks run in the init: they report on its stdout (every other descriptor of the
    caller is closed there, see test_escapes)."""
    seen: dict[str, object] = {}

    def on_created(pid: int) -> None:
        seen["created"] = os.readlink(f"/proc/{pid}/ns/uts") != os.readlink("/proc/self/ns/uts")

    def create_container(_host_pid: int) -> None:  # in the init before pivot_root: the bundle is visible
        os.write(1, b"cc:" + str(Path(bundle, "config.json").exists()).encode() + b"\n")

    def start_container(host_pid: int) -> None:  # inside the init, after pivot_root
        os.write(1, b"sc:" + str(Path(bundle).exists()).encode() + f" {os.getpid()} {host_pid}\n".encode())

    c = create(
        bundle,
        default_config(["true"]),
        on_created=on_created,
        run_create_container_hooks=create_container,
        run_start_container_hooks=start_container,
    )
    assert seen == {"created": True}
    c.start()
    code, out = c.wait()
    assert code == 0, out
    assert out.split() == ["cc:True", "sc:False", "1", str(c.pid)]


def test_failing_on_created_kills_the_init(bundle: Path) -> None:
    def on_created(pid: int) -> None:
        raise StockadeError("prestart hook failed", where="hooks.prestart[0]")

    with pytest.raises(StockadeError, match="prestart hook failed"):
        create(bundle, default_config(["true"]), on_created=on_created)


# --- exec ------------------------------------------------------------------------------------


def test_exec_process_joins_the_container(bundle: Path) -> None:
    c = create(bundle, default_config(["sleep", "30"]))
    try:
        c.start()
        spec = load_bundle(bundle)
        proc = parse_process(
            {
                "args": ["sh", "-c", "hostname; ls /proc | grep -E '^[0-9]+$' | head -1; exit 3"],
                "env": ["PATH=/bin"],
                "cwd": "/tmp",
                "user": {"uid": 1000, "gid": 1000},
                "noNewPrivileges": True,
            },
            "process.json",
        )
        r, w = os.pipe()
        try:
            with _stdio_to(w):
                code = exec_process(
                    c.pid, spec, proc, cgroup_procs=[], seccomp_program=None, seccomp_flags=[]
                )
        finally:
            os.close(w)
        out = os.read(r, 4096).decode()
        os.close(r)
        assert code == 3, out
        assert out.split() == ["stockade", "1"]

        pid_file = bundle / "exec.pid"
        detached = exec_process(
            c.pid,
            spec,
            parse_process({"args": ["sleep", "0.1"]}),
            cgroup_procs=[],
            seccomp_program=None,
            seccomp_flags=[],
            detach=True,
            pid_file=pid_file,
        )
        assert int(pid_file.read_text()) == detached
        assert os.readlink(f"/proc/{detached}/ns/pid") == os.readlink(f"/proc/{c.pid}/ns/pid")
        _, status = os.waitpid(detached, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        c.kill()


# --- cgroups and seccomp hand-offs -----------------------------------------------------------


def test_joins_cgroup_before_namespaces(bundle: Path) -> None:
    unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    base = Path("/sys/fs/cgroup") if unified else Path("/sys/fs/cgroup/pids")
    require((base / "cgroup.procs").exists(), f"no cgroup hierarchy at {base}")
    cg = base / f"stockade-test-init-{os.getpid()}"
    cg.mkdir()
    try:
        c = create(bundle, sh("cat /proc/self/cgroup"), cgroup_procs=[str(cg / "cgroup.procs")])
        assert str(c.pid) in (cg / "cgroup.procs").read_text().split()
        c.start()
        code, out = c.wait()
        assert code == 0, out
        line = "0::/" if unified else next(x for x in out.splitlines() if ":pids:" in x)
        assert line.endswith(":/") and line in out.splitlines(), out  # the cgroup ns is rooted at our cgroup
    finally:
        cg.rmdir()


def test_seccomp_program_loaded_last(bundle: Path) -> None:
    from stockade.runtime import seccomp

    program = seccomp.compile_program(
        {
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
        }
    )
    code, out = run(bundle, sh("mkdir /tmp/d 2>&1; echo done"), seccomp_program=program, seccomp_flags=[])
    assert code == 0, out
    assert "Operation not permitted" in out and "done" in out


# --- more filesystem setups ------------------------------------------------------------------


def test_no_pivot_and_cgroup_mount(bundle: Path) -> None:
    cfg = sh(
        "grep -c ' /sys/fs/cgroup' /proc/self/mountinfo; ls /sys/fs/cgroup | head -3; touch /x 2>&1; echo end"
    )
    cfg["mounts"].append(
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "ro"]}
    )
    code, out = run(bundle, cfg, no_pivot=True)
    assert code == 0, out
    lines = out.splitlines()
    assert int(lines[0]) >= 1 and "Read-only file system" in out


def test_linux_devices(bundle: Path) -> None:
    cfg = sh("ls -ln /dev/stockade-null /dev/fuse | awk '{print $1, $3, $4, $5, $6}'")
    cfg["linux"]["devices"] = [
        {
            "path": "/dev/stockade-null",
            "type": "c",
            "major": 1,
            "minor": 3,
            "fileMode": 0o620,
            "uid": 7,
            "gid": 8,
        },
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
    ]
    code, out = run(bundle, cfg)
    assert code == 0, out
    assert out.splitlines() == ["crw-rw-rw- 0 0 10, 229", "crw--w---- 7 8 1, 3"]


def test_devices_in_user_namespace_are_host_binds(bundle: Path) -> None:
    require(_userns_ok(), "user namespaces disabled")
    cfg = sh(
        "echo >/dev/null && head -c4 /dev/zero | wc -c; head -c3 /dev/full | wc -c; ls -l /dev/full | cut -c1"
    )
    cfg["linux"]["devices"] = [{"path": "/dev/full", "type": "c", "major": 1, "minor": 7}]
    code, out = run(bundle, userns_config_with(cfg))
    assert code == 0, out
    assert out.split() == ["4", "3", "c"]


def userns_config_with(cfg: dict) -> dict:
    base = userns_config()
    for key in ("namespaces", "uidMappings", "gidMappings"):
        cfg["linux"][key] = base["linux"][key]
    return cfg


def test_exec_into_user_namespace_container(bundle: Path) -> None:
    require(_userns_ok(), "user namespaces disabled")
    c = create(bundle, userns_config(["sleep", "30"]))
    try:
        c.start()
        spec = load_bundle(bundle)
        proc = parse_process(
            {"args": ["sh", "-c", "cat /proc/self/uid_map; id -u"], "user": {"uid": 1000}}, "p"
        )
        r, w = os.pipe()
        try:
            with _stdio_to(w):
                code = exec_process(
                    c.pid, spec, proc, cgroup_procs=[], seccomp_program=None, seccomp_flags=[]
                )
        finally:
            os.close(w)
        out = os.read(r, 4096).decode()
        os.close(r)
        assert code == 0, out
        assert out.split() == ["0", "100000", "65536", "1000"]
    finally:
        c.kill()


def test_preserve_fds(bundle: Path) -> None:
    r, w = os.pipe()
    saved3 = os.dup(3)  # fd 3 belongs to pytest: lend it to the container and put it back
    os.dup2(w, 3)
    extra = os.open("/dev/null", os.O_RDONLY)  # above 3: must be closed in the container
    try:
        c = create(bundle, sh("echo via-fd3 >&3; ls /proc/self/fd | tr '\\n' ' '"), preserve_fds=1)
    finally:
        os.dup2(saved3, 3)
        os.close(saved3)
        os.close(extra)
        os.close(w)
    c.start()
    code, out = c.wait()
    data = os.read(r, 100)
    os.close(r)
    assert code == 0, out
    assert data == b"via-fd3\n"
    assert set(out.split()) <= {"0", "1", "2", "3", "4"}  # 4 at most: ls's own directory fd


def test_sysctl_in_host_netns_joined_by_path_is_refused(bundle: Path) -> None:
    cfg = default_config(["true"])
    cfg["linux"]["namespaces"] = [ns for ns in cfg["linux"]["namespaces"] if ns["type"] != "network"]
    cfg["linux"]["namespaces"].append({"type": "network", "path": f"/proc/{os.getpid()}/ns/net"})
    cfg["mounts"] = [m for m in cfg["mounts"] if m["type"] != "sysfs"]
    cfg["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1"}
    host_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    with pytest.raises(SpecError, match="host's") as info:
        create(bundle, cfg)
    assert info.value.where == "linux.sysctl.net.ipv4.ip_forward"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == host_forward


def test_rootfs_propagation_shared(bundle: Path) -> None:
    cfg = sh("awk '$5 == \"/\"' /proc/self/mountinfo")
    cfg["linux"]["rootfsPropagation"] = "rshared"
    code, out = run(bundle, cfg)
    assert code == 0, out
    assert "shared:" in out


def test_terminal_in_user_namespace_and_exec(bundle: Path) -> None:
    require(_userns_ok(), "user namespaces disabled")
    path = str(bundle / "console.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(2)
    cfg = userns_config(["sleep", "30"])
    cfg["process"]["terminal"] = True
    try:
        c = create(bundle, cfg, console_socket=path)
        conn, _ = server.accept()
        _, master = console.recv_master(conn)
        conn.close()
        os.close(master)
        c.start()
        spec = load_bundle(bundle)
        proc = parse_process({"args": ["sh", "-c", "tty"], "terminal": True}, "process.json")
        pid = exec_process(
            c.pid,
            spec,
            proc,
            cgroup_procs=[],
            seccomp_program=None,
            seccomp_flags=[],
            console_socket=path,
            detach=True,
        )
        conn, _ = server.accept()
        name, master = console.recv_master(conn)
        conn.close()
        _, status = os.waitpid(pid, 0)
        out = os.read(master, 100).decode()
        os.close(master)
        assert os.waitstatus_to_exitcode(status) == 0
        assert out.strip() == name
        c.kill()
    finally:
        server.close()


def test_init_killed_before_ready_is_reported(bundle: Path) -> None:
    def on_created(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    with pytest.raises(StockadeError, match="killed by signal 9 before it was ready"):
        create(bundle, default_config(["true"]), on_created=on_created)


def test_waiting_init_is_not_dumpable(bundle: Path) -> None:
    """In a user namespace a dumpable process's /proc files belong to its (mapped) uid; a
    non-dumpable one's stay root's, out of reach of the container."""
    require(_userns_ok(), "user namespaces disabled")
    c = create(bundle, userns_config(["sleep", "30"]))
    try:
        assert os.stat(f"/proc/{c.pid}/fd").st_uid == 0  # created, waiting: still the runtime's Python
        c.start()
        deadline = time.monotonic() + 5
        while not os.readlink(f"/proc/{c.pid}/exe").endswith("busybox") and time.monotonic() < deadline:
            time.sleep(0.001)  # execve makes the workload dumpable again
        assert os.stat(f"/proc/{c.pid}/fd").st_uid == 100000
    finally:
        c.kill()


def test_time_namespace_offsets_and_personality(bundle: Path) -> None:
    require(os.path.exists("/proc/self/ns/time"), "kernel without time namespaces")
    cfg = sh("cut -d. -f1 /proc/uptime; uname -m")
    cfg["linux"]["namespaces"].append({"type": "time"})
    cfg["linux"]["timeOffsets"] = {"boottime": {"secs": 86400 * 365}, "monotonic": {"secs": 1000}}
    cfg["linux"]["personality"] = {"domain": "LINUX32"}
    code, out = run(bundle, cfg)
    assert code == 0, out
    uptime, machine = out.split()
    host_uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert int(uptime) - host_uptime > 86400 * 364
    assert machine in ("i686", "i386") or machine != os.uname().machine


def test_exec_joins_time_namespace(bundle: Path) -> None:
    require(os.path.exists("/proc/self/ns/time"), "kernel without time namespaces")
    cfg = default_config(["sleep", "30"])
    cfg["linux"]["namespaces"].append({"type": "time"})
    cfg["linux"]["timeOffsets"] = {"boottime": {"secs": 86400 * 365}}
    c = create(bundle, cfg)
    try:
        c.start()
        proc = parse_process({"args": ["sh", "-c", "cut -d. -f1 /proc/uptime"]}, "process.json")
        r, w = os.pipe()
        try:
            with _stdio_to(w):
                code = exec_process(
                    c.pid, load_bundle(bundle), proc, cgroup_procs=[], seccomp_program=None, seccomp_flags=[]
                )
        finally:
            os.close(w)
        out = os.read(r, 100).decode()
        os.close(r)
        assert code == 0, out
        assert int(out) > 86400 * 364
    finally:
        c.kill()


def test_proc_destination_symlink_is_refused(bundle: Path) -> None:
    (bundle / "rootfs/proc").rmdir()
    os.symlink("/etc", bundle / "rootfs/proc")
    with pytest.raises(StockadeError, match="/proc is a symlink") as info:
        create(bundle, default_config(["true"]))
    assert info.value.where == "mounts[0]"


def test_a_threaded_runtime_forks_through_glibc_and_still_joins_the_cgroup(tmp_path: Path) -> None:
    """The CRI daemon creates containers from gRPC threads: no raw clone3 there (see spawning.fork_into),
    the child joins its cgroup by writing cgroup.procs instead."""
    import threading

    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    cgroup = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/unified") / f"stockade-test-{os.getpid()}"
    cgroup.mkdir()
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        pid, join, _ = spawning.fork_into(str(cgroup))
        if pid == 0:
            spawning.join_cgroups(join)
            os._exit(0 if Path("/proc/self/cgroup").read_text().strip().endswith(cgroup.name) else 1)
        assert join == [str(cgroup / "cgroup.procs")]
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        stop.set()
        helper.join()
        cgroup.rmdir()


def test_sysfs_in_a_user_namespace_on_the_hosts_network(bundle: Path) -> None:
    """A user namespace in a network namespace it does not own (a hostNetwork pod) may not mount
    sysfs: the host's /sys is bound instead, as runc does, read-only on every mount below it too."""
    script = ("ls /sys/class/net | grep -qx lo && echo lo; touch /sys/x 2>/dev/null || echo refused; "
              "awk '$2 ~ \"^/sys\" {print $2, $4}' /proc/mounts")
    cfg = sh(script, userns_config())
    cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"]
    code, out = run(bundle, cfg)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:2] == ["lo", "refused"], out
    mounts = [line.split() for line in lines[2:]]
    assert mounts and mounts[0][0] == "/sys", out
    assert all(opts.split(",")[0] == "ro" for _, opts in mounts), out
