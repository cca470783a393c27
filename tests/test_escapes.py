"""Published runtime-escape classes (runc's CVE history), tried the way an attacker would.

Each class goes through stockade-oci with a bundle that has no user namespace (as engines run
it), through `stockade run`, and where the interface is the same through runc too. Attacks on the
runtime's own binary run against copies made for the test (of the Python interpreter that runs
Stockade, and of runc), never the real ones.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bundles import default_config, make_bundle, remove_bundle, write_config
from kernel import require
from leftovers import new_since, snapshot
from stockade.profiles import load_profile, profile_seccomp
from stockade.profiles.groups import ioctl_allow_rules

VENV_BIN = Path(sys.executable).parent
PROBE_SOURCE = Path(__file__).with_name("escape_probe.c")
RUNC = shutil.which("runc")


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    before = snapshot()
    yield
    assert new_since(before) == {}


@pytest.fixture(scope="module")
def probe() -> Iterator[Path]:
    """escape_probe.c, built static, in a directory a user namespace's root can search."""
    directory = Path(tempfile.mkdtemp(prefix="stockade-probe-"))
    directory.chmod(0o755)
    out = directory / "escape_probe"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(PROBE_SOURCE)], check=True)
    yield out
    shutil.rmtree(directory)


class Runtime:
    """One OCI runtime under test: argv prefix, a private --root, and what to clean up."""

    def __init__(self, name: str, argv: list[str], root: Path) -> None:
        self.name, self.argv, self.root = name, argv, root

    def __call__(self, *args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run([*self.argv, "--root", str(self.root), *args], timeout=timeout, **kw)

    def logged(self, log: Path, *args: str, **kw) -> int:  # noqa: ANN003
        """Run with stdout and stderr into `log` (a created container keeps them after we return)."""
        with open(log, "ab") as out:
            return self(*args, stdout=out, stderr=out, **kw).returncode

    def cleanup(self) -> None:
        """Delete every container with the installed runtime: a copy the attack overwrote can't."""
        real = str(VENV_BIN / "stockade-oci") if self.name == "stockade" else RUNC
        for cid in os.listdir(self.root) if self.root.exists() else []:
            subprocess.run([real, "--root", str(self.root), "delete", "--force", cid], capture_output=True)


def _launcher(src: Path, python: Path, dest: Path) -> Path:
    """A copy of a .venv/bin launcher whose interpreter is `python`."""
    body = src.read_text().split("\n", 1)[1]
    dest.write_text(f"#!{python} -S\n{body}")
    dest.chmod(0o755)
    return dest


@pytest.fixture
def runtime_copy(tmp_path: Path) -> Path:
    """A copy of the interpreter that runs Stockade, with stockade-oci and stockade launchers on it."""
    bin_dir = tmp_path / "runtime-copy"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    shutil.copy2(os.path.realpath(VENV_BIN / "python"), python)
    for name in ("stockade-oci", "stockade"):
        _launcher(VENV_BIN / name, python, bin_dir / name)
    return bin_dir


@pytest.fixture(params=["stockade", "runc"])
def oci(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Runtime]:
    """stockade-oci (from the venv), or runc for comparison."""
    if request.param == "runc":
        require(RUNC is not None, "runc is not installed (scripts/setup installs it)")
        rt = Runtime("runc", [RUNC], tmp_path / "runc-root")
    else:
        rt = _stockade(tmp_path)
    yield rt
    rt.cleanup()


@pytest.fixture
def stockade_oci(tmp_path: Path) -> Iterator[Runtime]:
    rt = _stockade(tmp_path)
    yield rt
    rt.cleanup()


def _stockade(tmp_path: Path) -> Runtime:
    return Runtime("stockade", [str(VENV_BIN / "stockade-oci")], tmp_path / "state")


def _bundle(tmp_path: Path, args: list[str], probe: Path | None = None, **process: object) -> Path:
    config = default_config(args)
    config["process"].update(process)
    b = make_bundle(config=config, parent=str(tmp_path))
    if probe is not None:
        shutil.copy2(probe, b / "rootfs/bin/escape_probe")
    return b


def _config(bundle: Path) -> dict:
    return json.loads((bundle / "config.json").read_text())


def _run_once(rt: Runtime, bundle: Path, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    """`run` the bundle in the foreground, then remove it and anything it left."""
    try:
        return rt("run", "--bundle", str(bundle), "c1", capture_output=True, text=True, **kw)
    finally:
        rt.cleanup()
        remove_bundle(bundle)


def _detached(rt: Runtime, bundle: Path, cid: str = "c1") -> bool:
    """`run --detach`; output to /dev/null (the container keeps it open: pipes would never end)."""
    return (
        rt(
            "run",
            "--detach",
            "--bundle",
            str(bundle),
            cid,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )


def _stockade_run(*args: str, launcher: Path | None = None, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", "stdout" not in kw)
    cmd = [str(launcher or VENV_BIN / "stockade"), "run", "--allow-degraded", *args]
    return subprocess.run(cmd, timeout=60, text=True, **kw)


def _wait_for(path: Path, words: tuple[str, ...], seconds: float = 20) -> str:
    deadline = time.monotonic() + seconds
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if any(w in text for w in words):
            return text
        time.sleep(0.05)
    return text


# ------------------------------------------------------------------------------------------------
# 1. CVE-2019-5736: overwrite the runtime's binary through /proc/self/exe
# ------------------------------------------------------------------------------------------------

# The image's entrypoint re-executes whatever /proc/self/exe is at the runtime's execve. If that
# is the host's Python, it loads its standard library from the image: this "encodings" package
# keeps an O_PATH handle on the binary, becomes a shell, and writes through the handle once no
# runtime process is executing the binary any more (ETXTBSY until then).
HIJACK = """import os
os.write(1, b"host-python-ran-in-container\\n")  # no sys.stdout yet: this runs mid-start-up
try:
    os.close(os.open("/host-python-ran", os.O_CREAT | os.O_WRONLY))  # for runs whose stdout is not ours
except OSError:
    pass
fd = os.open("/proc/self/exe", os.O_PATH)
os.set_inheritable(fd, True)
os.execv("/bin/sh", ["sh", "-c", "i=0; while [ $i -lt 150 ]; do "
    "if (echo PWNED > /proc/self/fd/%d) 2>/dev/null; then echo overwritten; exit 0; fi; "
    "i=$((i+1)); sleep 0.1; done; echo held" % fd])
"""


def _plant_hijack(rootfs: Path) -> None:
    """The entrypoint, the "encodings" package, and the C libraries any distribution image has
    (without them the host's Python could not even start in a busybox rootfs)."""
    encodings = rootfs / f"usr/lib/python3.{sys.version_info.minor}/encodings"
    encodings.mkdir(parents=True)
    (encodings / "__init__.py").write_text(HIJACK)
    entry = rootfs / "entry"
    entry.write_text("#!/proc/self/exe\n")
    entry.chmod(0o755)
    ldd = subprocess.run(["ldd", os.path.realpath(VENV_BIN / "python")], capture_output=True, text=True)
    for lib in (word for word in ldd.stdout.split() if word.startswith("/")):
        target = rootfs / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, target)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _exe_copy(runtime: str, runtime_copy: Path, tmp_path: Path) -> tuple[Runtime, Path]:
    if runtime == "runc":
        require(RUNC is not None, "runc is not installed (scripts/setup installs it)")
        binary = tmp_path / "runc-copy"
        shutil.copy2(RUNC, binary)
        return Runtime("runc", [str(binary)], tmp_path / "runc-root"), binary
    return Runtime(
        "stockade", [str(runtime_copy / "stockade-oci")], tmp_path / "state"
    ), runtime_copy / "python3"


@pytest.mark.parametrize("runtime", ["stockade", "runc"])
def test_entrypoint_cannot_reach_the_runtime_binary(runtime: str, runtime_copy: Path, tmp_path: Path) -> None:
    rt, binary = _exe_copy(runtime, runtime_copy, tmp_path)
    before = _digest(binary)
    bundle = _bundle(tmp_path, ["/entry"])
    _plant_hijack(bundle / "rootfs")
    log = tmp_path / "log"
    try:
        assert rt.logged(log, "create", "--bundle", str(bundle), "c1") == 0, log.read_text()
        assert rt.logged(log, "start", "c1") == 0, log.read_text()
        # the attack ends with "overwritten" or "held"; the refused exec ends the container at once
        deadline = time.monotonic() + 25
        while (
            time.monotonic() < deadline
            and '"running"' in rt("state", "c1", capture_output=True, text=True).stdout
        ):
            time.sleep(0.1)
        text = log.read_text(errors="replace")
    finally:
        rt.cleanup()
        remove_bundle(bundle)
    assert "overwritten" not in text and _digest(binary) == before
    assert "host-python-ran-in-container" not in text


def test_exec_cannot_reach_the_runtime_binary(runtime_copy: Path, tmp_path: Path) -> None:
    rt, binary = _exe_copy("stockade", runtime_copy, tmp_path)
    before = _digest(binary)
    bundle = _bundle(tmp_path, ["sleep", "60"])
    _plant_hijack(bundle / "rootfs")
    log = tmp_path / "log"
    try:
        assert rt.logged(log, "run", "--detach", "--bundle", str(bundle), "c1") == 0, log.read_text()
        # detached: no runtime process keeps the copy busy while the workload tries to write it
        rt.logged(log, "exec", "--detach", "c1", "/entry")
        text = _wait_for(log, ("overwritten", "held", "stockade:"), 25)
    finally:
        rt.cleanup()
        remove_bundle(bundle)
    assert "overwritten" not in text and _digest(binary) == before
    assert "host-python-ran-in-container" not in text


def test_stockade_run_entrypoint_cannot_reach_the_runtime_binary(runtime_copy: Path) -> None:
    bundle = make_bundle(config=default_config())  # world-traversable: root inside is not host root
    rootfs = bundle / "rootfs"
    _plant_hijack(rootfs)
    before = _digest(runtime_copy / "python3")
    try:
        done = _stockade_run("--rootfs", str(rootfs), "--", "/entry", launcher=runtime_copy / "stockade")
    finally:
        remove_bundle(bundle)
    assert "host-python-ran-in-container" not in done.stdout, done.stderr
    assert "overwritten" not in done.stdout and _digest(runtime_copy / "python3") == before


# ------------------------------------------------------------------------------------------------
# 2. CVE-2024-21626: a leaked directory descriptor as the working directory
# ------------------------------------------------------------------------------------------------

LEAKABLE = range(3, 16)  # every fd a runtime or its caller plausibly has open at exec time


@pytest.fixture
def host_dir_fd(tmp_path: Path) -> Iterator[int]:
    """A host directory holding a secret, open in the caller (inheritable) as engines leak them."""
    secret = tmp_path / "host-secret"
    secret.mkdir()
    (secret / "secret").write_text("HOST-SECRET\n")
    fd = os.open(secret, os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(fd, True)
    yield fd
    os.close(fd)


READ_SECRET = ["sh", "-c", "cat secret ../secret 2>/dev/null; pwd"]


def test_cwd_through_a_leaked_fd_is_refused(oci: Runtime, host_dir_fd: int, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, READ_SECRET)
    try:
        for n in LEAKABLE:
            config = _config(bundle)
            config["process"]["cwd"] = f"/proc/self/fd/{n}"
            write_config(bundle, config)
            done = oci(
                "run",
                "--bundle",
                str(bundle),
                f"cwd{n}",
                pass_fds=(host_dir_fd,),
                capture_output=True,
                text=True,
            )
            oci.cleanup()
            assert "HOST-SECRET" not in done.stdout, f"fd {n}: {done.stdout}"
    finally:
        remove_bundle(bundle)


def test_exec_cwd_through_a_leaked_fd_is_refused(oci: Runtime, host_dir_fd: int, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, ["sleep", "60"])
    try:
        assert _detached(oci, bundle)
        for n in LEAKABLE:
            done = oci(
                "exec",
                "--cwd",
                f"/proc/self/fd/{n}",
                "c1",
                *READ_SECRET,
                pass_fds=(host_dir_fd,),
                capture_output=True,
                text=True,
            )
            assert "HOST-SECRET" not in done.stdout, f"fd {n}: {done.stdout}"
    finally:
        oci.cleanup()
        remove_bundle(bundle)


def test_stockade_run_workdir_through_a_leaked_fd_is_refused(host_dir_fd: int) -> None:
    for n in LEAKABLE:
        done = _stockade_run("--workdir", f"/proc/self/fd/{n}", "--", *READ_SECRET, pass_fds=(host_dir_fd,))
        assert "HOST-SECRET" not in done.stdout, f"fd {n}: {done.stdout}"


def test_workload_inherits_only_stdio_and_preserved_fds(
    stockade_oci: Runtime, host_dir_fd: int, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path, ["ls", "/proc/self/fd"])
    done = _run_once(stockade_oci, bundle, pass_fds=(host_dir_fd,))
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == ["0", "1", "2", "3"]  # 3: ls's own directory fd


# ------------------------------------------------------------------------------------------------
# 3. CVE-2017-5226: keystrokes pushed into the caller's terminal (TIOCSTI)
# ------------------------------------------------------------------------------------------------


class CallerTerminal:
    """A pty whose slave is the controlling terminal and stdio of the runtime we start, as a shell's is."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        attrs = termios.tcgetattr(self.slave)
        attrs[3] &= ~termios.ECHO  # only what reaches the input queue matters
        termios.tcsetattr(self.slave, termios.TCSANOW, attrs)

    def run(self, argv: list[str], timeout: float = 30) -> int:
        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        return subprocess.run(
            argv,
            stdin=self.slave,
            stdout=self.slave,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=take_terminal,
            timeout=timeout,
        ).returncode

    def output(self) -> str:
        return _read_now(self.master)

    def pending_input(self) -> str:
        """What a shell reading this terminal would get next (injected keystrokes land here)."""
        return _read_now(self.slave)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def _read_now(fd: int) -> str:
    """What can be read from `fd` without waiting."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 65536).decode(errors="replace")
    except BlockingIOError:
        return ""


@pytest.fixture
def terminal() -> Iterator[CallerTerminal]:
    t = CallerTerminal()
    yield t
    t.close()


INJECT = ["/bin/escape_probe", "tiocsti", "echo INJECTED\n"]


def _assert_injection_refused(terminal: CallerTerminal) -> None:
    out = terminal.output()
    assert "tiocsti:EPERM" in out, out
    assert "INJECTED" not in terminal.pending_input()


# runc is not compared here: runc 1.1 (Debian 12) hands a non-terminal container the caller's
# terminal in the caller's session, and the injection succeeds (measured).
@pytest.mark.parametrize("how", ["run", "exec"])
def test_tiocsti_does_not_reach_the_callers_terminal(
    how: str, stockade_oci: Runtime, terminal: CallerTerminal, probe: Path, tmp_path: Path
) -> None:
    oci = stockade_oci
    bundle = _bundle(tmp_path, INJECT if how == "run" else ["sleep", "60"], probe)
    try:
        if how == "run":
            terminal.run([*oci.argv, "--root", str(oci.root), "run", "--bundle", str(bundle), "c1"])
        else:
            assert _detached(oci, bundle)
            terminal.run([*oci.argv, "--root", str(oci.root), "exec", "c1", *INJECT])
    finally:
        oci.cleanup()
        remove_bundle(bundle)
    _assert_injection_refused(terminal)


def test_stockade_run_tiocsti_does_not_reach_the_callers_terminal(
    terminal: CallerTerminal, probe: Path
) -> None:
    terminal.run(
        [
            str(VENV_BIN / "stockade"),
            "run",
            "-i",  # the caller's terminal as the workload's stdin (without -i it is /dev/null)
            "--allow-degraded",
            "--profile",
            "unconfined",
            "--bind",
            f"{probe.parent}:/probe:ro",
            "--",
            "/probe/escape_probe",
            *INJECT[1:],
        ]
    )
    _assert_injection_refused(terminal)


@pytest.mark.parametrize("profile", ["restricted", "runtime-default"])
def test_builtin_filters_deny_tiocsti_even_on_a_controlling_terminal(
    profile: str, stockade_oci: Runtime, probe: Path, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path, ["/bin/escape_probe", "own-tty-tiocsti"], probe)
    config = _config(bundle)
    config["linux"]["seccomp"] = profile_seccomp(load_profile(profile))
    config["mounts"] = [m for m in config["mounts"] if m["destination"] != "/dev/pts"] + [
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        }
    ]
    write_config(bundle, config)
    done = _run_once(stockade_oci, bundle)
    assert "tiocsti:EPERM" in done.stdout, done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------
# 4. Keyrings: the caller's session keyring and root's user keyring
# ------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_ADD_KEY, _SYS_KEYCTL = 248, 250
KEY_SPEC_SESSION, KEY_SPEC_USER = -3, -4
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_INVALIDATE = 1, 21


def _add_key(description: str, payload: bytes, ring: int) -> int:
    key = _libc.syscall(_SYS_ADD_KEY, b"user", description.encode(), payload, len(payload), ring)
    assert key > 0, os.strerror(ctypes.get_errno())
    return key


@pytest.fixture(scope="module")
def caller_keys() -> Iterator[dict[str, int]]:
    """A session keyring of the test's own with a key in it, and a key in root's user keyring."""
    assert _libc.syscall(_SYS_KEYCTL, KEYCTL_JOIN_SESSION_KEYRING, b"stockade-escape-tests") > 0
    keys = {
        "session": _add_key("stockade-session-secret", b"SESSION-SECRET", KEY_SPEC_SESSION),
        "user": _add_key("stockade-user-secret", b"USER-SECRET", KEY_SPEC_USER),
    }
    yield keys
    for key in keys.values():
        _libc.syscall(_SYS_KEYCTL, KEYCTL_INVALIDATE, key)


def _key_attempts(keys: dict[str, int], probe: str) -> str:
    return (
        f"{probe} keyread {keys['session']}; {probe} keysearch {KEY_SPEC_SESSION} stockade-session-secret; "
        f"{probe} keyread {keys['user']}; {probe} keysearch {KEY_SPEC_USER} stockade-user-secret"
    )


def test_session_keyring_is_fresh(
    oci: Runtime, caller_keys: dict[str, int], probe: Path, tmp_path: Path
) -> None:
    """No seccomp filter: only the fresh session keyring stands between the workload and the key."""
    bundle = _bundle(tmp_path, ["sh", "-c", _key_attempts(caller_keys, "/bin/escape_probe")], probe)
    done = _run_once(oci, bundle)
    assert "search:ENOKEY" in done.stdout, done.stdout + done.stderr
    assert "SESSION-SECRET" not in done.stdout


def test_exec_session_keyring_is_fresh(
    oci: Runtime, caller_keys: dict[str, int], probe: Path, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path, ["sleep", "60"], probe)
    try:
        assert _detached(oci, bundle)
        done = oci(
            "exec",
            "c1",
            "sh",
            "-c",
            _key_attempts(caller_keys, "/bin/escape_probe"),
            capture_output=True,
            text=True,
        )
    finally:
        oci.cleanup()
        remove_bundle(bundle)
    assert "search:ENOKEY" in done.stdout, done.stdout + done.stderr
    assert "SESSION-SECRET" not in done.stdout


def test_engine_default_filter_hides_every_keyring(
    stockade_oci: Runtime, caller_keys: dict[str, int], probe: Path, tmp_path: Path
) -> None:
    """Without a user namespace root inside is root's uid: its user keyring is the kernel's to give;
    the RuntimeDefault filter engines send (keyctl denied) is what keeps it out of reach."""
    bundle = _bundle(tmp_path, ["sh", "-c", _key_attempts(caller_keys, "/bin/escape_probe")], probe)
    config = _config(bundle)
    config["linux"]["seccomp"] = profile_seccomp(load_profile("runtime-default"))
    write_config(bundle, config)
    done = _run_once(stockade_oci, bundle)
    assert "key:EPERM" in done.stdout, done.stdout + done.stderr
    assert "SECRET" not in done.stdout


@pytest.mark.parametrize("profile", ["restricted", "unconfined"])
def test_stockade_run_hides_every_keyring(profile: str, caller_keys: dict[str, int], probe: Path) -> None:
    done = _stockade_run(
        "--profile",
        profile,
        "--bind",
        f"{probe.parent}:/probe:ro",
        "--",
        "/bin/sh",
        "-c",
        _key_attempts(caller_keys, "/probe/escape_probe"),
    )
    assert done.returncode == 0 or "key" in done.stdout, done.stderr
    assert "SECRET" not in done.stdout, done.stdout


def test_generated_profiles_allow_ioctl_without_tiocsti() -> None:
    from stockade.profiles.generate import generate

    profile = generate({"syscalls": {"ioctl": 3, "read": 1}}, "t")
    rules = [r.to_dict() for r in profile.seccomp.syscalls if "ioctl" in r.names]
    assert rules and all(r["args"] for r in rules)
    assert [r["args"] for r in rules] == [r["args"] for r in ioctl_allow_rules()]


def test_builtin_profiles_hold_the_generated_ioctl_rules() -> None:
    for name in ("restricted", "runtime-default"):
        rules = [r for r in profile_seccomp(load_profile(name))["syscalls"] if "ioctl" in r["names"]]
        expected = [{k: v for k, v in rule.items() if k != "comment"} for rule in ioctl_allow_rules()]
        assert rules == expected, name


# ------------------------------------------------------------------------------------------------
# Beyond the four: hooks from the image, and /proc writes during set-up
# ------------------------------------------------------------------------------------------------


def test_start_container_hook_from_the_image_cannot_reach_the_runtime_binary(
    runtime_copy: Path, tmp_path: Path
) -> None:
    """startContainer hooks are the image's files, run by the init: the same route as the entrypoint."""
    rt, binary = _exe_copy("stockade", runtime_copy, tmp_path)
    before = _digest(binary)
    bundle = _bundle(tmp_path, ["true"])
    _plant_hijack(bundle / "rootfs")
    config = _config(bundle)
    config["hooks"] = {"startContainer": [{"path": "/entry"}]}
    config["root"]["readonly"] = False  # where the hijacked Python leaves its mark
    write_config(bundle, config)
    log = tmp_path / "log"
    try:
        rt.logged(log, "create", "--bundle", str(bundle), "c1")
        rt.logged(log, "start", "c1")
        time.sleep(0.5)
        ran = (bundle / "rootfs/host-python-ran").exists()
    finally:
        rt.cleanup()
        remove_bundle(bundle)
    assert not ran and _digest(binary) == before, log.read_text(errors="replace")


def test_sysctl_is_not_written_through_a_mount_over_proc(stockade_oci: Runtime, tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, ["true"])
    config = _config(bundle)
    config["mounts"].append({"destination": "/proc/sys/kernel", "type": "tmpfs", "source": "tmpfs"})
    config["linux"]["sysctl"] = {"kernel.domainname": "elsewhere"}
    write_config(bundle, config)
    done = _run_once(stockade_oci, bundle)
    assert done.returncode != 0 and "mounted over it" in done.stderr, done.stderr
    assert "linux.sysctl.kernel.domainname" in done.stderr


def test_masking_uses_the_real_dev_null(stockade_oci: Runtime, tmp_path: Path) -> None:
    """A process that swaps the container's /dev/null for a symlink between the device set-up and
    the masking (a createContainer hook stands in for the racing process of CVE-2025-31133) must
    not get another /proc file bound where a masked path was."""
    bundle = _bundle(tmp_path, ["sh", "-c", "head -c 20 /proc/timer_list; echo"])
    swap = tmp_path / "swap-dev-null"
    swap.write_text(
        f"#!/bin/sh\nrm -f {bundle}/rootfs/dev/null && ln -s /etc/passwd {bundle}/rootfs/dev/null\n"
    )
    swap.chmod(0o755)
    config = _config(bundle)
    config["hooks"] = {"createContainer": [{"path": str(swap)}]}
    write_config(bundle, config)
    done = _run_once(stockade_oci, bundle)
    assert "root:" not in done.stdout  # the image's /etc/passwd never shows through /proc/timer_list
    assert done.returncode != 0 and "not the null device" in done.stderr, done.stdout + done.stderr
