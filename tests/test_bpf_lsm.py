"""BPF-LSM enforcement, per hook: a process inside a container cgroup is denied what its policy
says and allowed the rest, while the same operation outside any container succeeds. Needs
BPF-LSM (the QEMU lab); on hosts without it these skip, and fail under
STOCKADE_REQUIRE_KERNEL_TESTS=1."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import subprocess
import time

import pytest
from bpf_helpers import cleanup_agent, in_cgroup, make_agent, op_connect, op_socket
from kernel import needs_root, require  # noqa: F401 (needs_root: a fixture, used by name)
from stockade.bpf import maps
from stockade.bpf.policy import compile_policy, parse_policy

pytestmark = [pytest.mark.lab, pytest.mark.usefixtures("needs_root")]

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWUTS = 0x20000, 0x10000000, 0x4000000
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
SYS_INIT_MODULE, SYS_FINIT_MODULE, SYS_PERF_EVENT_OPEN = 175, 313, 298
SYS_PIVOT_ROOT, SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 155, 429, 430, 431, 432
MS_REC, MS_PRIVATE = 0x4000, 0x40000
FSCONFIG_CMD_CREATE, MOVE_MOUNT_F_EMPTY_PATH, AT_FDCWD = 6, 0x4, -100
AF_PHONET = 35  # a family built as a module (phonet.ko, alias net-pf-35) that nothing loads by itself


def _c(ret: int) -> str:
    return "ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def _py(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    from stockade.bpf.probe import lsm

    ok, why = lsm()
    require(ok, f"BPF-LSM cannot load here: {why}")
    a = make_agent(tmp_path_factory.mktemp("lsm"), "lsm-")
    report = json.loads(a.run("--load-only").stdout)
    assert report["lsm"], report["lsm_reason"]
    assert "lsm" in maps.loaded_layers(a.pin_dir)
    yield a
    cleanup_agent(a)


@pytest.fixture
def box(agent, request):
    """(cgroup path, cgroup id, install(policy_yaml)) for one container; everything removed after."""
    path, cgid = agent.container_cgroup(f"ctr-{request.node.name[:40]}")

    def install(text: str) -> None:
        maps.install_policy(
            cgid,
            f"ctr-{request.node.name[:20]}",
            compile_policy(parse_policy("name: t\n" + text, "t.yaml")),
            pin_dir=agent.pin_dir,
        )

    yield path, cgid, install
    maps.remove_policy(cgid, agent.pin_dir)
    assert maps.entries_for(cgid, agent.pin_dir) == {"stk_policies": 0, "stk_net": 0, "stk_files": 0}
    _remove_cgroup(path)


def _remove_cgroup(path: str, seconds: float = 10) -> None:
    """rmdir once empty: a signalled or ptraced test process may still be exiting (EBUSY)."""
    with contextlib.suppress(OSError):
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def both(path, ops, netns=False):
    """Run ops inside the container cgroup and outside any container; returns (inside, outside)."""
    return in_cgroup(path, ops, netns=netns), in_cgroup(None, ops, netns=netns)


def test_file_open_rules(box, tmp_path):
    path, _, install = box
    secret = tmp_path / "secret"
    secret.write_text("x")
    readable = tmp_path / "readable"
    readable.write_text("x")
    install(f"file:\n  deny:\n    - {{path: {secret}}}\n    - {{path: {readable}, access: [write]}}\n")
    ops = lambda _: {  # noqa: E731
        "secret_r": _py(lambda: open(secret).close()),
        "readable_r": _py(lambda: open(readable).close()),
        "readable_w": _py(lambda: open(readable, "a").close()),
    }
    inside, outside = both(path, ops)
    assert inside == {"secret_r": "EPERM", "readable_r": "ok", "readable_w": "EPERM"}
    assert outside == {"secret_r": "ok", "readable_r": "ok", "readable_w": "ok"}


def test_exec_deny_and_writable_mounts(box, tmp_path):
    path, _, install = box
    denied = tmp_path / "denied-true"
    shutil.copy("/bin/true", denied)
    install(f"exec:\n  deny: [{denied}]\n")
    ops = lambda _: {  # noqa: E731
        "denied": _py(lambda: subprocess.run([str(denied)], check=True)),
        "true": _py(lambda: subprocess.run(["/bin/true"], check=True)),
    }
    inside, outside = both(path, ops)
    assert inside == {"denied": "EPERM", "true": "ok"}
    assert outside == {"denied": "ok", "true": "ok"}


def test_exec_allow_only(box, tmp_path):
    path, _, install = box
    allowed, other = tmp_path / "allowed-true", tmp_path / "other-true"
    shutil.copy("/bin/true", allowed)
    shutil.copy("/bin/true", other)
    install(f"exec:\n  allow_only: [{allowed}]\n")
    ops = lambda _: {  # noqa: E731
        "allowed": _py(lambda: subprocess.run([str(allowed)], check=True)),
        "other": _py(lambda: subprocess.run([str(other)], check=True)),
        "true": _py(lambda: subprocess.run(["/bin/true"], check=True)),
    }
    inside, outside = both(path, ops)
    assert inside == {"allowed": "ok", "other": "EPERM", "true": "EPERM"}
    assert outside == {"allowed": "ok", "other": "ok", "true": "ok"}


def _join(path: str) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def test_no_exec_from_writable_mounts(box, tmp_path):
    path, _, install = box
    rw_dir, ro_dir = tmp_path / "rw", tmp_path / "ro"
    rw_dir.mkdir()
    ro_dir.mkdir()
    shutil.copy("/bin/true", rw_dir / "true")
    install("exec: {from_writable_mounts: deny}\n")

    def ops(cgroup):
        def run(_):
            # a private mount namespace with a read-only bind, made before the policy applies
            assert libc.unshare(CLONE_NEWNS) == 0
            subprocess.run(["mount", "--make-rprivate", "/"], check=True)
            subprocess.run(["mount", "--bind", str(rw_dir), str(ro_dir)], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro_dir)], check=True)
            if cgroup:
                _join(cgroup)
            return {
                "rw": _py(lambda: subprocess.run([str(rw_dir / "true")], check=True)),
                "ro": _py(lambda: subprocess.run([str(ro_dir / "true")], check=True)),
            }

        return run

    assert in_cgroup(None, ops(path), netns=False) == {"rw": "EPERM", "ro": "ok"}
    assert in_cgroup(None, ops(None), netns=False) == {"rw": "ok", "ro": "ok"}


def test_no_mounts_after_start(box):
    path, _, install = box
    install("mount: {after_start: deny}\n")

    def ops(cgroup):
        def run(_):
            assert libc.unshare(CLONE_NEWNS) == 0  # private: nothing leaks to the host
            assert libc.mount(b"none", b"/", None, 0x40000 | 0x4000, None) == 0  # MS_PRIVATE | MS_REC
            if cgroup:
                _join(cgroup)
            mount = _c(libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
            umount = _c(libc.umount2(b"/mnt", 0)) if mount == "ok" else "skip"
            return {"mount": mount, "umount": umount}

        return run

    assert in_cgroup(None, ops(path), netns=False)["mount"] == "EPERM"
    assert in_cgroup(None, ops(None), netns=False) == {"mount": "ok", "umount": "ok"}


def _private_mount_ns() -> None:
    """A mount namespace of our own whose mounts do not propagate to the host's."""
    assert libc.unshare(CLONE_NEWNS) == 0
    assert libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0


def test_move_mount_denied_after_start(box):
    path, _, install = box
    install("mount: {after_start: deny}\n")

    def ops(cgroup):
        def run(_):
            _private_mount_ns()
            # a detached tmpfs made before the policy applies: only move_mount(2) is judged
            fs = libc.syscall(SYS_FSOPEN, b"tmpfs", 0)
            assert fs >= 0, _c(fs)
            assert libc.syscall(SYS_FSCONFIG, fs, FSCONFIG_CMD_CREATE, None, None, 0) == 0
            mnt = libc.syscall(SYS_FSMOUNT, fs, 0, 0)
            assert mnt >= 0, _c(mnt)
            if cgroup:
                _join(cgroup)
            to_dir = ctypes.c_long(AT_FDCWD)
            ret = libc.syscall(SYS_MOVE_MOUNT, mnt, b"", to_dir, b"/mnt", MOVE_MOUNT_F_EMPTY_PATH)
            res = {"move_mount": _c(ret), "mounted": os.path.ismount("/mnt")}
            os.close(mnt)
            os.close(fs)
            return res

        return run

    assert in_cgroup(None, ops(path), netns=False) == {"move_mount": "EPERM", "mounted": False}
    assert in_cgroup(None, ops(None), netns=False) == {"move_mount": "ok", "mounted": True}


def test_umount_denied_after_start(box):
    path, _, install = box
    install("mount: {after_start: deny}\n")

    def ops(cgroup):
        def run(_):
            _private_mount_ns()
            assert libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) == 0  # before the policy applies
            if cgroup:
                _join(cgroup)
            return {"umount": _c(libc.umount2(b"/mnt", 0)), "mounted": os.path.ismount("/mnt")}

        return run

    assert in_cgroup(None, ops(path), netns=False) == {"umount": "EPERM", "mounted": True}
    assert in_cgroup(None, ops(None), netns=False) == {"umount": "ok", "mounted": False}


def test_pivot_root_denied_after_start(box):
    path, _, install = box
    install("mount: {after_start: deny}\n")

    def ops(cgroup):
        def run(_):
            _private_mount_ns()
            assert libc.mount(b"none", b"/mnt", b"tmpfs", 0, None) == 0  # the new root, made before
            os.mkdir("/mnt/old")
            if cgroup:
                _join(cgroup)
            pid = os.fork()
            if pid == 0:
                # pivot_root moves the root of every process sharing the namespace: use a fresh one
                code = 255
                try:
                    if libc.unshare(CLONE_NEWNS) == 0:
                        ok = libc.syscall(SYS_PIVOT_ROOT, b"/mnt", b"/mnt/old") == 0
                        code = 0 if ok else ctypes.get_errno()
                finally:
                    os._exit(code)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            return {"pivot_root": "ok" if code == 0 else errno.errorcode.get(code, str(code))}

        return run

    assert in_cgroup(None, ops(path), netns=False) == {"pivot_root": "EPERM"}
    assert in_cgroup(None, ops(None), netns=False) == {"pivot_root": "ok"}


def test_ptrace_and_signals_stay_in_own_subtree(box):
    path, _, install = box
    install("process: {ptrace: own, signal: own}\n")
    host = subprocess.Popen(["sleep", "60"])
    try:

        def ops(_):
            own = subprocess.Popen(["sleep", "60"])
            try:
                res = {
                    "kill_host": _py(lambda: os.kill(host.pid, 0)),
                    "kill_own": _py(lambda: os.kill(own.pid, 0)),
                    "ptrace_host": _c(libc.ptrace(PTRACE_ATTACH, host.pid, None, None)),
                    "ptrace_own": _c(libc.ptrace(PTRACE_ATTACH, own.pid, None, None)),
                }
                for pid in (host.pid, own.pid):
                    libc.ptrace(PTRACE_DETACH, pid, None, None)
                return res
            finally:
                own.kill()
                own.wait()

        inside, outside = both(path, ops)
        assert inside == {"kill_host": "EPERM", "kill_own": "ok", "ptrace_host": "EPERM", "ptrace_own": "ok"}
        assert outside["kill_host"] == "ok" and outside["ptrace_host"] == "ok"
    finally:
        host.kill()
        host.wait()


def test_user_namespaces_denied(box):
    path, _, install = box
    install("process: {user_namespaces: deny}\n")
    inside, outside = both(path, lambda _: {"userns": _c(libc.unshare(CLONE_NEWUSER))})
    assert inside == {"userns": "EPERM"} and outside == {"userns": "ok"}


def test_kernel_interfaces_denied(box, tmp_path):
    path, _, install = box
    install("kernel: {modules: deny, bpf: deny, perf_event: deny}\n")
    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"\0" * 64)

    def ops(_):
        fd = os.open(junk, os.O_RDONLY)
        buf = ctypes.create_string_buffer(64)
        attr = ctypes.create_string_buffer(128)  # perf_event_attr: software cpu-clock on ourselves
        ctypes.memmove(attr, (ctypes.c_uint32 * 2)(1, 128), 8)
        attr_bpf = ctypes.create_string_buffer(128)
        ctypes.memmove(attr_bpf, (ctypes.c_uint32 * 4)(2, 4, 4, 1), 16)  # array map, 4/4/1
        res = {
            "finit_module": _c(libc.syscall(SYS_FINIT_MODULE, fd, b"", 0)),
            "init_module": _c(libc.syscall(SYS_INIT_MODULE, buf, 64, b"")),
            "bpf": _c(libc.syscall(321, 0, attr_bpf, 128)),
            "perf": _c(libc.syscall(SYS_PERF_EVENT_OPEN, attr, 0, -1, -1, 0)),
        }
        os.close(fd)
        return res

    inside, outside = both(path, ops)
    assert inside == {"finit_module": "EPERM", "init_module": "EPERM", "bpf": "EPERM", "perf": "EPERM"}
    assert outside["finit_module"] != "EPERM" and outside["init_module"] != "EPERM"
    assert outside["bpf"] == "ok" and outside["perf"] == "ok"


def _module_loaded(name: str) -> bool:
    return os.path.exists(f"/sys/module/{name}")


def test_module_request_denied(agent, box):
    """socket() of a family no module has registered yet makes the kernel call
    request_module("net-pf-N") in the caller's context, which asks the kernel_module_request hook.
    That caller (like nearly every request_module caller) ignores the hook's -EPERM: socket()
    fails with EAFNOSUPPORT whether modprobe was refused or found nothing. So the denial is
    asserted by its effects: no module loaded, a "denied" event naming the alias; outside any
    container the same socket() makes modprobe load phonet and succeeds."""
    path, cgid, install = box
    from stockade.bpf import events

    alias = f"net-pf-{AF_PHONET}"
    moddir = f"/lib/modules/{os.uname().release}"
    with open(f"{moddir}/modules.alias") as f:
        require(f"alias {alias} phonet\n" in f.read(), f"the kernel has no phonet module ({moddir})")
    if _module_loaded("phonet"):
        subprocess.run(["modprobe", "-r", "phonet"], check=True)
    install("kernel: {modules: deny}\n")
    ops = lambda _: {"phonet": op_socket(AF_PHONET, socket.SOCK_DGRAM)}  # noqa: E731
    events.pump(agent.pin_dir, agent.events_file, once=True)  # drain what earlier tests left
    start = time.time()
    try:
        assert in_cgroup(path, ops, netns=False) == {"phonet": "EAFNOSUPPORT"}
        assert not _module_loaded("phonet")
        events.pump(agent.pin_dir, agent.events_file, once=True)
        lines = [json.loads(x) for x in agent.events_file.read_text().splitlines()]
        ours = [(e["hook"], e["decision"], e["object"]) for e in lines
                if e["cgroup_id"] == cgid and e["time"] >= start - 1]
        assert ours == [("kernel_module_request", "denied", alias)]
        assert in_cgroup(None, ops, netns=False) == {"phonet": "ok"}
        assert _module_loaded("phonet")
    finally:
        if _module_loaded("phonet"):
            subprocess.run(["modprobe", "-r", "phonet"], check=True)


def test_socket_families_bind_and_connect(box):
    path, _, install = box
    install(
        "network:\n  families: [unix, inet, netlink]\n  bind_ports: 1024-65535\n"
        "  egress: {default: allow, rules: [{to: 127.0.0.2/32, action: deny}]}\n"
    )

    def ops(ports):
        def bind(port):
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))

        return {
            "packet": op_socket(socket.AF_PACKET, socket.SOCK_RAW),
            "netlink_raw": op_socket(socket.AF_NETLINK, socket.SOCK_RAW, 0),
            "inet6": op_socket(socket.AF_INET6, socket.SOCK_DGRAM),
            "bind_80": _py(lambda: bind(80)),
            "bind_8080": _py(lambda: bind(8080)),
            "connect_denied": op_connect("127.0.0.2", ports["tcp"]),
            "connect_ok": op_connect("127.0.0.1", ports["tcp"]),
        }

    inside, outside = both(path, ops, netns=True)
    assert inside == {
        "packet": "EPERM",
        "netlink_raw": "ok",
        "inet6": "EPERM",
        "bind_80": "EPERM",
        "bind_8080": "ok",
        "connect_denied": "EPERM",
        "connect_ok": "ok",
    }
    assert set(outside.values()) == {"ok"}, outside


def test_unix_connect_to_host_sockets_denied(box, tmp_path):
    path, _, install = box
    install("network: {unix_host_sockets: deny}\n")
    host_sock = str(tmp_path / "host.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(host_sock)
    server.listen(4)
    try:

        def ops(_):
            own_path = str(tmp_path / f"own-{os.getpid()}.sock")
            own = socket.socket(socket.AF_UNIX)
            own.bind(own_path)
            own.listen(1)

            def connect(p):
                with socket.socket(socket.AF_UNIX) as c:
                    c.connect(p)

            try:
                return {"host": _py(lambda: connect(host_sock)), "own": _py(lambda: connect(own_path))}
            finally:
                own.close()
                os.unlink(own_path)

        inside, outside = both(path, ops)
        assert inside == {"host": "EPERM", "own": "ok"}
        assert outside == {"host": "ok", "own": "ok"}
    finally:
        server.close()


def test_mknod_and_capabilities(box, tmp_path):
    path, _, install = box
    install("device: {mknod: deny}\ncapability: {deny: [SYS_ADMIN]}\n")

    def ops(cgroup):
        def run(_):
            assert libc.unshare(CLONE_NEWUTS) == 0  # before joining: CAP_SYS_ADMIN is denied inside
            if cgroup:
                _join(cgroup)
            n = os.getpid()
            return {
                "chr": _py(lambda: os.mknod(tmp_path / f"null-{n}", 0o600 | 0o020000, os.makedev(1, 3))),
                "fifo": _py(lambda: os.mkfifo(tmp_path / f"fifo-{n}")),
                "sethostname": _c(libc.sethostname(b"stockade-test", 13)),
            }

        return run

    assert in_cgroup(None, ops(path), netns=False) == {"chr": "EPERM", "fifo": "ok", "sethostname": "EPERM"}
    assert in_cgroup(None, ops(None), netns=False) == {"chr": "ok", "fifo": "ok", "sethostname": "ok"}


def test_audit_mode_logs_without_denying_and_events_name_the_container(agent, box):
    path, cgid, _ = box
    maps.install_policy(
        cgid,
        "ctr-audit",
        compile_policy(parse_policy("name: a\nmode: audit\nprocess: {user_namespaces: deny}\n", "a.yaml")),
        tenant="t-9",
        pin_dir=agent.pin_dir,
    )
    from stockade.bpf import events

    events.pump(agent.pin_dir, agent.events_file, once=True)  # drain what earlier tests left
    start = time.time()
    assert in_cgroup(path, lambda _: {"userns": _c(libc.unshare(CLONE_NEWUSER))}) == {"userns": "ok"}
    events.pump(agent.pin_dir, agent.events_file, once=True)
    lines = [json.loads(x) for x in agent.events_file.read_text().splitlines()]
    ours = [e for e in lines if e["cgroup_id"] == cgid and e["time"] >= start - 1]
    assert [(e["hook"], e["decision"], e["container_id"], e["tenant"]) for e in ours] == [
        ("userns_create", "audited", "ctr-audit", "t-9")
    ]


def test_two_containers_do_not_affect_each_other(agent):
    a_path, a_id = agent.container_cgroup("ctr-strict")
    b_path, b_id = agent.container_cgroup("ctr-open")
    try:
        maps.install_policy(
            a_id,
            "strict",
            compile_policy(parse_policy("name: s\nprocess: {user_namespaces: deny}\n", "s.yaml")),
            pin_dir=agent.pin_dir,
        )
        maps.install_policy(
            b_id, "open", compile_policy(parse_policy("name: o\n", "o.yaml")), pin_dir=agent.pin_dir
        )
        ops = lambda _: {"userns": _c(libc.unshare(CLONE_NEWUSER))}  # noqa: E731
        assert in_cgroup(a_path, ops, netns=False) == {"userns": "EPERM"}
        assert in_cgroup(b_path, ops, netns=False) == {"userns": "ok"}
        maps.remove_policy(a_id, agent.pin_dir)
        assert in_cgroup(a_path, ops, netns=False) == {"userns": "ok"}
    finally:
        for cgid, p in ((a_id, a_path), (b_id, b_path)):
            maps.remove_policy(cgid, agent.pin_dir)
            assert maps.entries_for(cgid, agent.pin_dir) == {"stk_policies": 0, "stk_net": 0, "stk_files": 0}
            os.rmdir(p)


def test_default_policy_lets_ordinary_work_run(agent, box, tmp_path):
    path, cgid, _ = box
    from stockade.bpf.policy import load_policy

    maps.install_policy(cgid, "ctr-default", compile_policy(load_policy("default")), pin_dir=agent.pin_dir)

    def ops(ports):
        work = tmp_path / f"w-{os.getpid()}"
        work.mkdir()
        (work / "a.py").write_text("print(sum(range(10)))\n")
        py = subprocess.run(["python3", str(work / "a.py")], capture_output=True, text=True)
        sh = subprocess.run(
            ["/bin/sh", "-c", "echo hi | cat > out && cat out"], cwd=work, capture_output=True, text=True
        )
        return {
            "python": py.stdout.strip(),
            "shell": sh.stdout.strip(),
            "connect": op_connect("127.0.0.1", ports["tcp"]),
            "userns": _c(libc.unshare(CLONE_NEWUSER)),
            "packet": op_socket(socket.AF_PACKET, socket.SOCK_RAW),
        }

    result = in_cgroup(path, ops)
    assert result == {"python": "45", "shell": "hi", "connect": "ok", "userns": "EPERM", "packet": "EPERM"}


def test_agent_restart_reuses_pins_and_cache(tmp_path):
    from stockade.bpf.probe import lsm

    ok, why = lsm()
    require(ok, f"BPF-LSM cannot load here: {why}")
    a = make_agent(tmp_path, "lsmcache-")
    try:
        first = json.loads(a.run("--load-only").stdout)
        assert first["lsm"] and first["lsm_programs"] == "bcc", first
        assert json.loads(a.run("--load-only").stdout)["lsm_programs"] == "pinned"
        a.run("--stop")
        third = json.loads(a.run("--load-only").stdout)
        assert third["lsm"] and third["lsm_programs"] == "cache", third
        path, cgid = a.container_cgroup("ctr")
        try:
            maps.install_policy(
                cgid,
                "ctr",
                compile_policy(parse_policy("name: c\nprocess: {user_namespaces: deny}\n", "c.yaml")),
                pin_dir=a.pin_dir,
            )
            ops = lambda _: {"userns": _c(libc.unshare(CLONE_NEWUSER))}  # noqa: E731
            assert in_cgroup(path, ops, netns=False) == {"userns": "EPERM"}
            maps.remove_policy(cgid, a.pin_dir)
        finally:
            os.rmdir(path)
    finally:
        cleanup_agent(a)


def test_a_second_parent_kubelets_is_governed_too(agent, tmp_path):
    """Kubelet puts its pods below /kubepods, not below the runtime's parent: once the CRI
    server names it as the second parent, a container there is confined by the LSM and the
    cgroup programs alike, a sibling cgroup that is no container is not, and another second
    parent is refused while this one exists."""
    from stockade.bpf import attach

    secret = tmp_path / "secret"
    secret.write_text("x")
    kube = os.path.join(os.path.dirname(agent.cgroup_root), f"kubepods-t{os.getpid()}")
    ctr = os.path.join(kube, "burstable", "pod1", "ctr")
    other = os.path.join(os.path.dirname(agent.cgroup_root), f"kubepods-u{os.getpid()}")
    os.makedirs(ctr)
    cgid = os.stat(ctr).st_ino
    try:
        assert not maps.covers(ctr, agent.pin_dir)
        assert attach.add_parent(agent.pin_dir, kube) and not attach.add_parent(agent.pin_dir, kube)
        assert maps.covers(ctr, agent.pin_dir) and maps.covers(os.path.dirname(ctr), agent.pin_dir)
        with pytest.raises(Exception, match="already govern a second parent"):
            attach.add_parent(agent.pin_dir, other)
        text = f"name: t\nfile:\n  deny:\n    - {{path: {secret}}}\nnetwork:\n  families: [inet, unix]\n"
        compiled = compile_policy(parse_policy(text, "t.yaml"))
        maps.install_policy(cgid, "kube-ctr", compiled, pin_dir=agent.pin_dir)

        def ops(_: dict) -> dict:
            return {"secret": _py(lambda: open(secret).close()),
                    "inet6": _py(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())}

        assert in_cgroup(ctr, ops, netns=False) == {"secret": "EPERM", "inet6": "EPERM"}
        assert in_cgroup(os.path.dirname(ctr), ops, netns=False) == {"secret": "ok", "inet6": "ok"}
    finally:
        maps.remove_policy(cgid, agent.pin_dir)
        for path in (ctr, os.path.dirname(ctr), os.path.dirname(os.path.dirname(ctr)), kube, other):
            if os.path.isdir(path):
                _remove_cgroup(path)
    assert maps.read_config(agent.pin_dir)["alt_cgid"]  # the gone parent stays named, harmlessly
