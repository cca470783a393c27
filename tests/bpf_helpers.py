"""Shared fixtures for the BPF tests (no tests here): a private agent (own pin dir, own parent
cgroup) and a way to run operations in a forked process that sits in a test cgroup and a fresh
network namespace."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from kernel import require

CHECKOUT = Path(__file__).resolve().parent.parent
PYTHON = str(CHECKOUT / ".venv" / "bin" / "python")
CLONE_NEWNET = 0x40000000


@dataclass
class Agent:
    pin_dir: str
    cgroup_root: str
    env: dict
    state_dir: Path

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [PYTHON, "-m", "stockade.bpf.agent", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"agent {args} failed: {proc.stdout}\n{proc.stderr}")
        return proc

    @property
    def events_file(self) -> Path:
        return self.state_dir / "events.jsonl"

    def container_cgroup(self, name: str) -> tuple[str, int]:
        """A container's cgroup as the runtime leaves it when nothing vouches for the container's
        network: the egress programs attached on it."""
        from stockade.bpf import maps

        path = os.path.join(self.cgroup_root, name)
        os.mkdir(path)
        maps.attach_egress(path, self.pin_dir)
        return path, os.stat(path).st_ino


def unified_mount() -> str | None:
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in points:
            return preferred
    return points[0] if points else None


def make_agent(tmp_path: Path, tag: str = "") -> Agent:
    name = f"stockade-test-{tag}{uuid.uuid4().hex[:8]}"
    unified = unified_mount()
    require(unified is not None, "no cgroup2 hierarchy mounted")
    env = dict(os.environ)
    env.update(
        {
            "STOCKADE_BPF_PIN_DIR": f"/sys/fs/bpf/{name}",
            "STOCKADE_BPF_CGROUP_ROOT": os.path.join(unified, name),
            "STOCKADE_AGENT_STATE": str(tmp_path / "agent.json"),
            "STOCKADE_EVENTS_FILE": str(tmp_path / "events.jsonl"),
            "STOCKADE_BPF_CACHE": str(tmp_path / "cache"),
        }
    )
    return Agent(env["STOCKADE_BPF_PIN_DIR"], env["STOCKADE_BPF_CGROUP_ROOT"], env, tmp_path)


def cleanup_agent(agent: Agent) -> None:
    agent.run("--stop", check=False)
    if os.path.isdir(agent.cgroup_root):
        for child in os.listdir(agent.cgroup_root):
            full = os.path.join(agent.cgroup_root, child)
            if os.path.isdir(full):
                os.rmdir(full)
        os.rmdir(agent.cgroup_root)
    assert not os.path.exists(agent.pin_dir), "agent --stop left pins behind"


def _try(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _write(path: str, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _serve(addr: tuple, family: int = socket.AF_INET) -> tuple[socket.socket, int]:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(addr)
    s.listen(8)
    return s, s.getsockname()[1]


# operations a confined process performs; each returns "ok" or an errno name
def op_connect(host: str, port: int, family: int = socket.AF_INET) -> str:
    def go():
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect((host, port))

    return _try(go)


def op_sendto(host: str, port: int, family: int = socket.AF_INET) -> str:
    def go():
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", (host, port))

    return _try(go)


def op_socket(family: int, kind: int, proto: int = 0) -> str:
    return _try(lambda: socket.socket(family, kind, proto).close())


def op_sysctl_write(name: str) -> str:
    path = "/proc/sys/" + name.replace(".", "/")
    with open(path) as f:
        current = f.read()
    return _try(lambda: _write(path, current))


def op_sysctl_read(name: str) -> str:
    return _try(lambda: open("/proc/sys/" + name.replace(".", "/")).read())


def op_open(path: str, flags: int) -> str:
    return _try(lambda: os.close(os.open(path, flags)))


def in_cgroup(cgroup: str | None, ops, netns: bool = True) -> dict:
    """Fork; the child enters a fresh netns (lo up, listeners on 127.0.0.1/.2 and ::1), joins CGROUP
    (None: stays outside every container) and runs ops(ports) -> dict, returned through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            ports = {}
            keep = []
            if netns:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
                subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
                s1, ports["tcp"] = _serve(("127.0.0.1", 0))
                s2, _ = _serve(("127.0.0.2", ports["tcp"]))
                s3, ports["tcp6"] = _serve(("::1", 0), socket.AF_INET6)
                keep += [s1, s2, s3]
            if cgroup:
                _write(os.path.join(cgroup, "cgroup.procs"), str(os.getpid()))
            result = ops(ports)
            os.write(w, json.dumps(result).encode())
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            os.write(w, json.dumps({"__error__": repr(e)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    result = json.loads(data or b'{"__error__": "no output"}')
    assert "__error__" not in result, result["__error__"]
    return result


def no_bcc_imported(modules: list[str]) -> bool:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('bcc' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return out == "False"


__all__ = [
    "Agent",
    "make_agent",
    "cleanup_agent",
    "in_cgroup",
    "op_connect",
    "op_sendto",
    "op_socket",
    "op_sysctl_write",
    "op_sysctl_read",
    "op_open",
    "no_bcc_imported",
    "sys",
]
