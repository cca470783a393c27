"""Containers through the CRI, in the order kubelet drives them (critest's areas: container
lifecycle, exec, logs, security context, resources, image consistency, idempotence), on a real
`stockade cri serve` with Debian's conmon watching each container and busybox images the tests
build. Each test removes its pods; the module checks that nothing of theirs is left."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from images import PATH_ENV, busybox_image, oci_archive, tar_of
from kernel import needs_root, require  # noqa: F401 - needs_root: a fixture, used by name
from leftovers import new_since, snapshot
from stockade.runtime.images.archive import import_archive
from stockade.runtime.images.store import Store

from cri import Server, fast_tmp, pb, remove_cgroup_everywhere, status_code

pytestmark = pytest.mark.usefixtures("needs_root")

CONFIG = """
[stockade]
default_handler = "stockade"
[stockade.handlers.stockade]
profile = "runtime-default"
[stockade.handlers.restricted]
profile = "restricted"
allow_degraded = true
[stockade.handlers.audit]
profile = "restricted"
bpf_policy = "audit"
allow_degraded = true
[stockade.handlers.privileged]
profile = "runtime-default"
privileged = true
user_namespace = false
host_namespaces = true
"""
IMAGE = "localhost/test/busybox:1"
USER_IMAGE = "localhost/test/app-user:1"
PLAIN_IMAGE = "localhost/test/plain:1"  # neither entrypoint nor cmd


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    require(shutil.which("conmon"), "conmon (setup)")
    tmp = tmp_path_factory.mktemp("cri")
    config = tmp / "stockade.toml"
    config.write_text(CONFIG)
    base = fast_tmp()
    (base / "images").mkdir(parents=True)
    store = Store(str(base / "images"))
    import_archive(store, str(busybox_image(tmp / "bb.tar", IMAGE)))
    from bundles import make_rootfs

    rootfs = make_rootfs(tmp / "rootfs")
    archive = oci_archive(tmp / "user.tar", USER_IMAGE, [(tar_of(rootfs), "gzip")],
                          {"Env": [PATH_ENV, "FROM_IMAGE=yes"], "User": "user", "WorkingDir": "/home/user",
                           "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo from-cmd"]})
    import_archive(store, str(archive))
    plain = oci_archive(tmp / "plain.tar", PLAIN_IMAGE, [(tar_of(rootfs), "")], {"Env": [PATH_ENV]})
    import_archive(store, str(plain))
    srv = Server(base, config=config)
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def clean(server: Server) -> Iterator[None]:
    before = snapshot()
    yield
    for pod in server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    assert server.runtime.ListContainers(pb.ListContainersRequest()).containers == []
    assert new_since(before) == {}
    assert list((server.base / "images/containers").iterdir()) == []


def security(**kw) -> pb.LinuxContainerSecurityContext:  # noqa: ANN003
    return pb.LinuxContainerSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.CONTAINER), **kw)


def pod(server: Server, name: str = "p", namespace: str = "team-a",
        handler: str = "", cgroup_parent: str = "") -> tuple[str, pb.PodSandboxConfig]:
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=f"uid-{namespace}-{name}"),
        hostname=name, log_directory=str(server.base / "logs" / f"{namespace}_{name}_{os.urandom(4).hex()}"),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=cgroup_parent,
            security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.CONTAINER))))
    request = pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return server.runtime.RunPodSandbox(request).pod_sandbox_id, config


def create(server: Server, pod_id: str, pod_config: pb.PodSandboxConfig, *command: str, name: str = "c",
           image: str = IMAGE, **kw) -> str:  # noqa: ANN003
    kw.setdefault("linux", pb.LinuxContainerConfig(security_context=security()))
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image),
                                command=list(command), log_path=f"{name}/0.log", **kw)
    request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
    return server.runtime.CreateContainer(request).container_id


def start(server: Server, cid: str) -> None:
    server.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))


def status(server: Server, cid: str) -> pb.ContainerStatus:
    return server.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status


def wait_exited(server: Server, cid: str, seconds: float = 30) -> pb.ContainerStatus:
    deadline = time.monotonic() + seconds
    while (s := status(server, cid)).state != pb.CONTAINER_EXITED:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    return s


def log_lines(path: str) -> list[tuple[str, str, str]]:
    """(stream, tag, text) of each line of a CRI log file."""
    return [tuple(line.split(" ", 3)[1:]) for line in Path(path).read_text().splitlines()]  # type: ignore[misc]


def run_once(server: Server, script: str, **kw) -> tuple[pb.ContainerStatus, list[tuple[str, str, str]]]:  # noqa: ANN003
    pod_id, config = pod(server, f"once-{os.urandom(3).hex()}", handler=kw.pop("handler", ""))
    cid = create(server, pod_id, config, "sh", "-c", script, **kw)
    start(server, cid)
    s = wait_exited(server, cid)
    return s, log_lines(s.log_path)


def test_container_lifecycle_logs_and_exit_code(server: Server) -> None:
    pod_id, config = pod(server)
    cid = create(server, pod_id, config, "sh", "-c", "echo out; echo err >&2; hostname; exit 3")
    created = status(server, cid)
    assert created.state == pb.CONTAINER_CREATED and created.created_at > 0
    start(server, cid)
    s = wait_exited(server, cid)
    assert (s.exit_code, s.reason) == (3, "Error")
    assert s.started_at >= s.created_at and s.finished_at >= s.started_at
    assert s.log_path.startswith(str(server.base / "logs/team-a_p_")) and s.log_path.endswith("/c/0.log")
    lines = log_lines(s.log_path)  # the two pipes are read as data comes: order across them may vary
    assert [t for t in lines if t[0] == "stdout"] == [("stdout", "F", "out"), ("stdout", "F", "p")]
    assert [t for t in lines if t[0] == "stderr"] == [("stderr", "F", "err")]
    line = Path(s.log_path).read_text().splitlines()[0]
    assert line[:4].isdigit() and line.split(" ")[0].endswith("Z") or "+" in line.split(" ")[0]
    server.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    code, _ = status_code(server.runtime.ContainerStatus, pb.ContainerStatusRequest(container_id=cid))
    assert code == grpc.StatusCode.NOT_FOUND


def test_exec_sync_stdout_stderr_and_exit_code(server: Server) -> None:
    pod_id, config = pod(server)
    cid = create(server, pod_id, config, "sleep", "60")
    start(server, cid)
    done = server.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", "hello"], timeout=10))
    assert (done.stdout, done.stderr, done.exit_code) == (b"hello\n", b"", 0)
    failing = ["sh", "-c", "echo no >&2; exit 7"]
    failed = server.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=failing))
    assert (failed.stdout, failed.stderr, failed.exit_code) == (b"", b"no\n", 7)
    code, message = status_code(server.runtime.ExecSync,
                                pb.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"], timeout=1))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "timeout" in message
    assert status(server, cid).state == pb.CONTAINER_RUNNING


def test_stop_waits_then_kills_and_is_idempotent(server: Server) -> None:
    pod_id, config = pod(server)
    graceful = create(server, pod_id, config, "sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.1; done",
                      name="graceful")
    stubborn = create(server, pod_id, config, "sh", "-c", "trap '' TERM; while :; do sleep 0.1; done",
                      name="stubborn")
    for cid in (graceful, stubborn):
        start(server, cid)
    time.sleep(0.3)  # the traps are set
    server.runtime.StopContainer(pb.StopContainerRequest(container_id=graceful, timeout=10))
    assert (status(server, graceful).exit_code, status(server, graceful).reason) == (0, "Completed")
    began = time.monotonic()
    server.runtime.StopContainer(pb.StopContainerRequest(container_id=stubborn, timeout=1))
    assert time.monotonic() - began < 10
    assert status(server, stubborn).exit_code == 137
    for cid in (graceful, stubborn, "0" * 64):
        server.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=1))
        server.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        server.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))


def test_list_filters_and_image_consistency(server: Server) -> None:
    pod_a, config_a = pod(server, "a")
    pod_b, config_b = pod(server, "b")
    one = create(server, pod_a, config_a, "sleep", "60", name="one", labels={"role": "web"})
    two = create(server, pod_b, config_b, "sleep", "60", name="two")
    start(server, one)

    def listed(**f) -> list[str]:  # noqa: ANN003
        return sorted(c.id for c in server.runtime.ListContainers(
            pb.ListContainersRequest(filter=pb.ContainerFilter(**f))).containers)

    assert listed() == sorted([one, two])
    assert listed(pod_sandbox_id=pod_b) == [two]
    assert listed(id=one[:13]) == [one]
    assert listed(state=pb.ContainerStateValue(state=pb.CONTAINER_RUNNING)) == [one]
    assert listed(label_selector={"role": "web"}) == [one]
    image_id = server.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=IMAGE))).image.id
    s = status(server, one)
    assert s.image_id == s.image_ref == image_id and s.image.image == IMAGE


def test_the_image_config_fills_what_the_request_leaves_out(server: Server) -> None:
    s, lines = run_once(server, 'echo "$(id -u):$(id -g) $(pwd) $FROM_IMAGE $HOSTNAME"', image=USER_IMAGE)
    assert s.exit_code == 0 and lines[0][2].startswith("1000:1000 /home/user yes once-")
    pod_id, config = pod(server, "args")
    cid = create(server, pod_id, config, image=USER_IMAGE, name="args")  # no command: entrypoint + cmd
    start(server, cid)
    assert log_lines(wait_exited(server, cid).log_path) == [("stdout", "F", "from-cmd")]


def test_security_context_user_caps_readonly_root_and_no_new_privs(server: Server) -> None:
    ctx = security(run_as_user=pb.Int64Value(value=1234), run_as_group=pb.Int64Value(value=5678),
                   supplemental_groups=[42], readonly_rootfs=True, no_new_privs=True,
                   capabilities=pb.Capability(drop_capabilities=["ALL"]))
    script = ("id; touch /x 2>/dev/null && echo wrote || echo read-only; "
              "grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status")
    s, lines = run_once(server, script, linux=pb.LinuxContainerConfig(security_context=ctx))
    text = [t for _, _, t in lines]
    assert s.exit_code == 0, text
    assert text[0].startswith("uid=1234 gid=5678 groups=") and "42" in text[0]
    assert (s.user.linux.uid, s.user.linux.gid, list(s.user.linux.supplemental_groups)) == (1234, 5678, [42])
    assert text[1] == "read-only"
    fields = dict(t.split(":\t") for t in text[2:])
    assert fields == {"CapEff": "0000000000000000", "CapBnd": "0000000000000000", "NoNewPrivs": "1",
                      "Seccomp": "2"}


def test_security_context_capability_add_and_the_restricted_handler(server: Server) -> None:
    ctx = security(capabilities=pb.Capability(add_capabilities=["NET_RAW"], drop_capabilities=["CHOWN"]))
    s, lines = run_once(server, "grep CapEff /proc/self/status",
                        linux=pb.LinuxContainerConfig(security_context=ctx))
    caps = int(lines[0][2].split()[-1], 16)
    assert caps & (1 << 13) and not caps & 1  # NET_RAW in, CHOWN out
    # Docker's default filter lets a holder of CAP_SYS_ADMIN make namespaces; restricted never does.
    admin = pb.LinuxContainerConfig(security_context=security(capabilities=pb.Capability(
        add_capabilities=["SYS_ADMIN"])))
    s, lines = run_once(server, "unshare -U true && echo allowed || echo denied", handler="restricted",
                        linux=admin)
    assert [t for stream, _, t in lines if stream == "stdout"] == ["denied"]
    s, lines = run_once(server, "unshare -U true && echo allowed || echo denied", linux=admin)
    assert [t for stream, _, t in lines if stream == "stdout"] == ["allowed"]


def test_seccomp_as_kubelet_sends_it_by_default(server: Server) -> None:
    """kubelet sends Unconfined unless --seccomp-default is on, and critest sends nothing: a
    sandboxing handler confines both with its profile (as CRI-O's seccomp_use_default_when_empty);
    only a privileged handler leaves them unconfined, as runc does."""
    script = "grep Seccomp: /proc/self/status"
    unconfined = security(seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined))
    for ctx, handler, mode in ((unconfined, "", "2"), (security(), "", "2"), (unconfined, "privileged", "0"),
                               (security(), "privileged", "0")):
        linux = pb.LinuxContainerConfig(security_context=ctx)
        s, lines = run_once(server, script, handler=handler, linux=linux)
        assert [t.split()[-1] for stream, _, t in lines if stream == "stdout"] == [mode], (handler, lines)


def test_privileged_containers_under_a_privileged_handler(server: Server) -> None:
    """As runc gives them: every capability the server holds, nothing masked, sysfs writable,
    the host's devices, no seccomp; the same request under a sandboxing handler is refused."""
    from stockade.cri.bundle import held_capabilities
    from stockade.runtime.linux import CAPABILITIES

    held = sum(1 << CAPABILITIES[c] for c in held_capabilities())
    ctx = security(privileged=True)
    script = ("grep -E '^(CapEff|Seccomp):' /proc/self/status; "
              "[ -n \"$(head -c9 /proc/timer_list)\" ] && echo timer-list-unmasked; "
              "grep ' /sys ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; test -c /dev/kmsg && echo kmsg")
    linux = pb.LinuxContainerConfig(security_context=ctx)
    s, lines = run_once(server, script, handler="privileged", linux=linux)
    text = [t for stream, _, t in lines if stream == "stdout"]
    assert text[:2] == [f"CapEff:\t{held:016x}", "Seccomp:\t0"], lines
    assert text[2:] == ["timer-list-unmasked", "rw", "kmsg"], lines


def test_user_namespace_mappings_kubelet_chose(server: Server) -> None:
    """hostUsers: false: kubelet sends mode POD with the pod's own id range, which the pod gets
    (even under a handler without user namespaces: never weaker); malformed mappings and the
    modes no runtime supports (CONTAINER, TARGET) are INVALID_ARGUMENT and leave nothing."""
    def config(name: str, mode: int, uids: list, gids: list | None = None) -> pb.PodSandboxConfig:
        m = [pb.IDMapping(container_id=c, host_id=h, length=n) for c, h, n in uids]
        g = m if gids is None else [pb.IDMapping(container_id=c, host_id=h, length=n) for c, h, n in gids]
        userns = pb.UserNamespace(mode=mode, uids=m, gids=g)
        options = pb.NamespaceOption(pid=pb.CONTAINER, userns_options=userns)
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="team-a", uid=f"uid-{name}"),
            log_directory=str(server.base / "logs" / name),
            linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(namespace_options=options)))

    for handler in ("", "privileged"):
        cfg = config(f"userns-{handler or 'default'}", pb.POD, [(0, 3_000_000, 65536)])
        request = pb.RunPodSandboxRequest(config=cfg, runtime_handler=handler)
        pod_id = server.runtime.RunPodSandbox(request).pod_sandbox_id
        cid = create(server, pod_id, cfg, "cat", "/proc/self/uid_map", "/proc/self/gid_map")
        start(server, cid)
        lines = [t.split() for _, _, t in log_lines(wait_exited(server, cid).log_path)]
        assert lines == [["0", "3000000", "65536"]] * 2, (handler, lines)
        server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    for mode, uids, gids, words in (
            (pb.POD, [(0, 1000, 100), (0, 2000, 100)], None, "exactly one uid and one gid"),
            (pb.POD, [(1, 1000, 100)], None, "starting at container id 0"),
            (pb.POD, [(0, 1000, 100)], [(0, 2000, 100)], "same range"),
            (pb.CONTAINER, [], None, "'container' is not supported"),
            (pb.TARGET, [], None, "'target' is not supported")):
        got, message = status_code(server.runtime.RunPodSandbox,
                                   pb.RunPodSandboxRequest(config=config("bad-userns", mode, uids, gids)))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and words in message, message
    assert server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


def test_oom_killed_container_reports_oomkilled_and_137(server: Server) -> None:
    limit = 32 << 20
    res = pb.LinuxContainerResources(memory_limit_in_bytes=limit)
    hog = "x=a; while :; do x=$x$x; done"
    s, _ = run_once(server, hog, linux=pb.LinuxContainerConfig(security_context=security(), resources=res))
    assert (s.exit_code, s.reason) == (137, "OOMKilled")
    assert not Path("oom").exists()  # conmon's marker stays in the container's own directory


def test_reopen_container_log_starts_a_new_file(server: Server) -> None:
    pod_id, config = pod(server)
    chatty = "i=0; while :; do echo line$i; i=$((i+1)); sleep 0.05; done"
    cid = create(server, pod_id, config, "sh", "-c", chatty)
    start(server, cid)
    path = Path(status(server, cid).log_path)
    time.sleep(0.3)
    path.rename(path.with_suffix(".rotated"))
    server.runtime.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid))
    assert path.exists()  # when the call returns: kubelet (and critest) look right away
    deadline = time.monotonic() + 10
    while "line" not in path.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    numbers = [[int(t.removeprefix("line")) for _, _, t in log_lines(str(p))]
               for p in (path.with_suffix(".rotated"), path)]
    assert numbers[0] and numbers[1] and numbers[1][0] == numbers[0][-1] + 1  # nothing lost, nothing twice


def test_containers_survive_a_server_restart(server: Server, tmp_path: Path) -> None:
    pod_id, config = pod(server)
    cid = create(server, pod_id, config, "sh", "-c", "sleep 1; exit 4")
    start(server, cid)
    assert server.stop() == 0  # SIGTERM: the container keeps running under its conmon
    restarted = Server(server.base, config=_config_of(server))
    server.__dict__.update(restarted.__dict__)
    s = wait_exited(server, cid)
    assert s.exit_code == 4


def _config_of(server: Server) -> Path:
    argv = json.loads(json.dumps(server.proc.args))
    return Path(argv[argv.index("--config") + 1])


@pytest.mark.parametrize(("change", "code", "words"), [
    ({"image": "localhost/test/none:1"}, grpc.StatusCode.NOT_FOUND, "is not present"),
    ({"command": [], "image": PLAIN_IMAGE}, grpc.StatusCode.INVALID_ARGUMENT, "names a command"),
    ({"command": ["/bin/not-there"]}, grpc.StatusCode.FAILED_PRECONDITION, "not-there"),
    ({"seccomp": "localhost"}, grpc.StatusCode.INVALID_ARGUMENT, "Localhost seccomp profile"),
    ({"group_only": 5}, grpc.StatusCode.INVALID_ARGUMENT, "run_as_group is set without run_as_user"),
    ({"privileged": True}, grpc.StatusCode.INVALID_ARGUMENT, "privileged containers are refused"),
    ({"user": "nobody-here"}, grpc.StatusCode.INVALID_ARGUMENT, "not in the image's /etc/passwd"),
])
def test_bad_containers_are_refused_and_leave_nothing(server: Server, tmp_path: Path, change: dict,
                                                       code: grpc.StatusCode, words: str) -> None:
    pod_id, config = pod(server)
    ctx = security()
    if change.get("seccomp") == "localhost":
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        ctx.seccomp.CopyFrom(pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost,
                                                localhost_ref=str(bad)))
    if "group_only" in change:
        ctx.run_as_group.value = change["group_only"]
    ctx.privileged = change.get("privileged", False)
    if "user" in change:
        ctx.run_as_username = change["user"]
    command = change.get("command", ["true"])
    got, message = status_code(create, server, pod_id, config, *command, image=change.get("image", IMAGE),
                               linux=pb.LinuxContainerConfig(security_context=ctx))
    assert got == code and words in message, message
    assert server.runtime.ListContainers(pb.ListContainersRequest()).containers == []


def test_unknown_pods_and_duplicate_names(server: Server) -> None:
    _, config = pod(server)
    code, _ = status_code(create, server, "0" * 64, config, "true")
    assert code == grpc.StatusCode.NOT_FOUND
    pod_id, config = pod(server, "dup")
    create(server, pod_id, config, "true", name="same")
    code, message = status_code(create, server, pod_id, config, "true", name="same")
    assert code == grpc.StatusCode.ALREADY_EXISTS and "same" in message


def test_several_pods_with_two_handlers_at_once(server: Server) -> None:
    import threading

    results: dict[str, tuple[int, list]] = {}

    def one(name: str, handler: str) -> None:
        pod_id, config = pod(server, name, namespace=f"ns-{name}", handler=handler)
        cid = create(server, pod_id, config, "sh", "-c", f"echo {name}", name=name)
        start(server, cid)
        s = wait_exited(server, cid)
        results[name] = (s.exit_code, log_lines(s.log_path))

    threads = [threading.Thread(target=one, args=(f"pod{i}", ("", "restricted")[i % 2])) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {f"pod{i}": (0, [("stdout", "F", f"pod{i}")]) for i in range(6)}


def test_stats_of_containers_and_pods(server: Server) -> None:
    pod_id, config = pod(server)
    cid = create(server, pod_id, config, "sh", "-c", "dd if=/dev/zero of=/big bs=1M count=3; "
                 "while :; do :; done")
    start(server, cid)
    time.sleep(1)
    stats = server.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    assert stats.attributes.id == cid and stats.cpu.timestamp > 0 and stats.memory.timestamp > 0
    assert stats.cpu.usage_core_nano_seconds.value > 100_000_000  # the busy loop ran for a while
    assert stats.memory.working_set_bytes.value > 0
    assert stats.writable_layer.used_bytes.value >= 3 << 20 and stats.writable_layer.inodes_used.value >= 1
    listed = server.runtime.ListContainerStats(pb.ListContainerStatsRequest(
        filter=pb.ContainerStatsFilter(pod_sandbox_id=pod_id))).stats
    assert [s.attributes.id for s in listed] == [cid]
    pod_stats = server.runtime.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id)).stats
    assert pod_stats.attributes.id == pod_id and pod_stats.linux.cpu.usage_core_nano_seconds.value > 0
    assert [c.attributes.id for c in pod_stats.linux.containers] == [cid]
    all_pods = server.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest()).stats
    assert [p.attributes.id for p in all_pods] == [pod_id]


def test_update_container_resources_reaches_the_cgroup(server: Server) -> None:
    pod_id, config = pod(server)
    cid = create(server, pod_id, config, "sleep", "60")
    start(server, cid)
    limit = 48 << 20
    server.runtime.UpdateContainerResources(pb.UpdateContainerResourcesRequest(
        container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=limit)))
    info = json.loads(server.runtime.ContainerStatus(
        pb.ContainerStatusRequest(container_id=cid, verbose=True)).info["info"])
    assert info["spec"]["memory_limit"] == limit
    from stockade.runtime import container as oci

    cgroup = oci.cgroup_of(oci.status(str(server.base / "state/oci"), cid).state)
    assert cgroup.stats()["memory_limit"] == limit


def test_container_events_stream_created_started_stopped_deleted(server: Server) -> None:
    import threading

    seen: list[tuple[str, int]] = []
    stream = server.runtime.GetContainerEvents(pb.GetEventsRequest())

    def read() -> None:
        try:
            for event in stream:
                seen.append((event.container_id, event.container_event_type))
        except grpc.RpcError:
            pass  # cancelled below

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)
    pod_id, config = pod(server)
    cid = create(server, pod_id, config, "sh", "-c", "exit 0")
    start(server, cid)
    deadline = time.monotonic() + 10
    while (cid, pb.CONTAINER_STOPPED_EVENT) not in seen:  # from the exit file, unasked
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    server.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    deadline = time.monotonic() + 10
    while (cid, pb.CONTAINER_DELETED_EVENT) not in seen:
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    stream.cancel()
    reader.join(timeout=10)
    kinds = [k for c, k in seen if c == cid]
    assert kinds == [pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT, pb.CONTAINER_STOPPED_EVENT,
                     pb.CONTAINER_DELETED_EVENT]


def test_streaming_calls_for_nothing_are_not_found(server: Server) -> None:
    """(tests/test_cri_streaming.py streams through the URLs they hand out)"""
    calls = ((server.runtime.Exec, pb.ExecRequest(cmd=["true"], stdout=True)),
             (server.runtime.Attach, pb.AttachRequest(stdout=True)),
             (server.runtime.PortForward, pb.PortForwardRequest()))
    for call, request in calls:
        code, _ = status_code(call, request)
        assert code == grpc.StatusCode.NOT_FOUND


def test_a_create_the_server_did_not_finish_is_cleaned_up_at_start(server: Server) -> None:
    """A server killed between recording a container and conmon reporting it: the record is
    still "creating", its root filesystem may be mounted; the next start removes both."""
    from stockade.runtime.images.rootfs import mount_root
    from stockade.runtime.images.store import Store

    pod_id, _ = pod(server)
    half = "e" * 64
    (server.base / "state/containers" / half).mkdir(mode=0o711)
    (server.base / "state/containers" / half / "container.json").write_text(json.dumps(
        {"id": half, "pod_id": pod_id, "spec": {}, "state": "creating"}))
    store = Store(str(server.base / "images"))
    mount_root(store, store.get(IMAGE), half)
    config = _config_of(server)
    assert server.stop() == 0
    restarted = Server(server.base, config=config)
    server.__dict__.update(restarted.__dict__)
    assert not (server.base / "state/containers" / half).exists()
    assert "removed container " + half in server.log.read_text()
    assert str(server.base / "images/containers") not in Path("/proc/self/mountinfo").read_text()


def test_handlers_choose_the_bpf_policy(server: Server) -> None:
    for handler, policy in (("restricted", "default"), ("audit", "audit"), ("", None)):
        pod_id, config = pod(server, f"h-{handler or 'default'}", handler=handler)
        cid = create(server, pod_id, config, "true")
        bundle = json.loads((server.base / "state/containers" / cid / "bundle/config.json").read_text())
        assert bundle["annotations"].get("io.stockade.bpf-policy") == policy
        assert bundle["annotations"]["io.stockade.handler"] == (handler or "stockade")


@pytest.mark.parametrize("delay", [0.01, 0.03, 0.06, 0.12])
def test_a_server_killed_mid_create_loses_nothing_and_leaves_nothing(server: Server, delay: float) -> None:
    """SIGKILL at some point of a CreateContainer: after the restart a container that was running
    still runs, the half-made one is either there whole (created) or gone, and removing the pod
    leaves nothing."""
    import threading

    before = snapshot()
    base = fast_tmp()
    config = base.parent / f"{base.name}.toml"
    config.write_text(CONFIG)
    own = Server(base, "--image-store", str(server.base / "images"), config=config)
    try:
        pod_id, pod_cfg = pod(own, "killed")
        survivor = create(own, pod_id, pod_cfg, "sleep", "60", name="survivor")
        start(own, survivor)
        victim = threading.Thread(target=status_code, args=(create, own, pod_id, pod_cfg, "sleep", "60"),
                                  kwargs={"name": "victim"})
        victim.start()
        time.sleep(delay)
        own.proc.kill()
        own.proc.wait()
        victim.join(timeout=60)
        own.channel.close()
        restarted = Server(base, "--image-store", str(server.base / "images"), config=config)
        own.__dict__.update(restarted.__dict__)
        listed = own.runtime.ListContainers(pb.ListContainersRequest()).containers
        states = {c.metadata.name: c.state for c in listed}
        assert states["survivor"] == pb.CONTAINER_RUNNING
        assert states.get("victim", pb.CONTAINER_CREATED) == pb.CONTAINER_CREATED, states
        own.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    finally:
        assert own.stop() == 0
        shutil.rmtree(base, ignore_errors=True)
        config.unlink()
    assert new_since(before) == {}


def test_a_pod_that_shares_its_pid_namespace(server: Server) -> None:
    """shareProcessNamespace: the pod's PID namespace is held by catatonit as PID 1; its
    containers see each other's processes; the pod's removal ends them all."""
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="shared", namespace="team-a", uid="uid-shared"),
        log_directory=str(server.base / "logs" / f"shared-{os.urandom(3).hex()}"),
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(pid=pb.POD))))
    pod_id = server.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    info = json.loads(server.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info["info"])
    init = info["init_pid"]
    assert b"catatonit" in Path(f"/proc/{init}/cmdline").read_bytes()
    shared = pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
        namespace_options=pb.NamespaceOption(pid=pb.POD)))
    sleeper = create(server, pod_id, config, "sleep", "60", name="sleeper", linux=shared)
    start(server, sleeper)
    looker = create(server, pod_id, config, "sh", "-c", "ps -o pid,args", name="looker", linux=shared)
    start(server, looker)
    seen = [t for _, _, t in log_lines(wait_exited(server, looker).log_path)]
    assert any(line.split()[0] == "1" and "catatonit" in line for line in seen), seen
    assert any("sleep 60" in line for line in seen), seen
    server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    from stockade.runtime.state import process_alive

    assert not process_alive(init, info["init_start"])


def test_pod_level_limits_with_overhead_hold_for_its_containers(server: Server) -> None:
    """A pod's resources plus its RuntimeClass overhead limit its own cgroup; a container with no
    limit of its own is OOM-killed at the pod's."""
    from stockade.runtime.cgroups import open_driver

    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="limited", namespace="team-a", uid="uid-limited"),
        log_directory=str(server.base / "logs" / f"limited-{os.urandom(3).hex()}"),
        linux=pb.LinuxPodSandboxConfig(
            security_context=pb.LinuxSandboxSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.CONTAINER)),
            resources=pb.LinuxContainerResources(memory_limit_in_bytes=48 << 20),
            overhead=pb.LinuxContainerResources(memory_limit_in_bytes=4 << 20)))
    pod_id = server.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    info = json.loads(server.runtime.PodSandboxStatus(
        pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info["info"])
    assert open_driver().open(info["cgroup_parent"]).stats()["memory_limit"] == 52 << 20
    cid = create(server, pod_id, config, "sh", "-c", "x=a; while :; do x=$x$x; done")
    start(server, cid)
    s = wait_exited(server, cid)
    assert (s.exit_code, s.reason) == (137, "OOMKilled")
    server.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))  # kubelet's restart
    assert open_driver().open(info["cgroup_parent"]).stats()["memory_limit"] == 52 << 20
    server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert not any((Path(m) / info["cgroup_parent"]).exists() for m in ("/sys/fs/cgroup/memory",
                                                                         "/sys/fs/cgroup/unified"))


def test_the_bpf_agent_runs_in_the_server_and_confines_its_pods(server: Server, tmp_path: Path) -> None:
    """`stockade cri serve` loads, attaches and pins the BPF programs itself (pins and a cgroup
    root of the test's own): a pod's container is refused the cloud metadata address by the
    cgroup connect4 program, and the denial is in the event stream; so is one in a pod whose cgroup
    kubelet names below its own root (/kubepods), where the programs were not attached at start."""
    from bpf_helpers import cleanup_agent, make_agent

    agent = make_agent(tmp_path, "cri-")
    kube = f"kubepods-t{os.getpid()}"  # kubelet's cgroup root, one of the test's own
    base = fast_tmp()
    config = tmp_path / "agent.toml"
    config.write_text(CONFIG.replace('default_handler = "stockade"', f'default_handler = "restricted"\n'
                                     f'cgroup_parent = "{Path(agent.cgroup_root).name}"'))
    own = None
    try:
        own = Server(base, "--image-store", str(server.base / "images"), config=config, bpf_agent=True,
                     env=agent.env)
        assert "BPF agent: programs at " + agent.cgroup_root in own.log.read_text()
        pod_id, pod_cfg = pod(own, "bpf")
        cid = create(own, pod_id, pod_cfg, "sh", "-c", "nc -w 2 169.254.169.254 80 </dev/null; echo rc=$?")
        start(own, cid)
        text = " ".join(t for _, _, t in log_lines(wait_exited(own, cid).log_path))
        assert "Operation not permitted" in text, text
        deadline = time.monotonic() + 10
        events = tmp_path / "events.jsonl"
        while not (events.exists() and "169.254.169.254" in events.read_text()):
            assert time.monotonic() < deadline, "no denial event"
            time.sleep(0.1)
        own.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

        # kubelet names the pod's cgroup, below its own /kubepods: governed all the same
        pod_id, pod_cfg = pod(own, "kubelet", cgroup_parent=f"/{kube}/burstable/pod-uid-kubelet")
        cid = create(own, pod_id, pod_cfg, "sh", "-c", "nc -w 2 169.254.169.254 80 </dev/null; echo rc=$?")
        start(own, cid)
        text = " ".join(t for _, _, t in log_lines(wait_exited(own, cid).log_path))
        assert "Operation not permitted" in text, text
        assert f"BPF programs now govern below {kube} too" in own.log.read_text()
        own.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    finally:
        if own is not None:
            assert own.stop() == 0
        cleanup_agent(agent)
        shutil.rmtree(base, ignore_errors=True)
        remove_cgroup_everywhere(kube)
    assert not any(p.name == kube for m in _cgroup_mounts() for p in Path(m).iterdir())


def _cgroup_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]


def test_mounts_read_only_and_propagation(server: Server) -> None:
    """Host directories bind-mounted as kubelet asks: read-only or not; with HOST_TO_CONTAINER a
    mount made on the host afterwards appears inside. The sources are below a 0700 directory, as
    kubelet's are below /var/lib/kubelet: the pod's mapped root could not look them up itself."""
    import subprocess

    tmp_path = server.base / f"mounts-{os.urandom(3).hex()}"
    tmp_path.mkdir(mode=0o700)
    data, shared = tmp_path / "data", tmp_path / "shared"
    data.mkdir()
    (data / "file").write_text("from the host\n")
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stockade-test-shared", str(shared)], check=True)
    subprocess.run(["mount", "--make-shared", str(shared)], check=True)
    try:
        mounts = [pb.Mount(container_path="/data", host_path=str(data), readonly=True),
                  pb.Mount(container_path="/rw", host_path=str(tmp_path / "rw")),
                  pb.Mount(container_path="/shared", host_path=str(shared),
                           propagation=pb.PROPAGATION_HOST_TO_CONTAINER)]
        pod_id, config = pod(server, "mounts")
        info = json.loads(server.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info["info"])
        (tmp_path / "rw").mkdir()
        os.chown(tmp_path / "rw", info["uid_map"][0], info["uid_map"][0])  # the pod's root, as fsGroup would
        wait = "i=0; while [ ! -e /shared/late/marker ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done"
        script = ("cat /data/file; touch /data/x 2>/dev/null || echo data-ro; touch /rw/y && echo rw-ok; "
                  f"{wait}; cat /shared/late/marker")
        cid = create(server, pod_id, config, "sh", "-c", script, mounts=mounts)
        start(server, cid)
        time.sleep(0.5)
        (shared / "late").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stockade-test-late", str(shared / "late")],
                       check=True)
        (shared / "late" / "marker").write_text("propagated\n")
        s = wait_exited(server, cid)
        text = [t for stream, _, t in log_lines(s.log_path) if stream == "stdout"]
        assert text == ["from the host", "data-ro", "rw-ok", "propagated"], text
        assert (tmp_path / "rw" / "y").stat().st_uid == info["uid_map"][0]
    finally:
        subprocess.run(["umount", "-R", str(shared)], check=False)


def test_a_bidirectional_mount_reaches_the_host(server: Server) -> None:
    """BIDIRECTIONAL (a CSI driver's, say; privileged only): a mount the container makes below
    it appears on the host, which needs the container's root to be shared as well."""
    import subprocess

    shared = server.base / f"bidi-{os.urandom(3).hex()}"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stockade-test-bidi", str(shared)], check=True)
    try:
        subprocess.run(["mount", "--make-rshared", str(shared)], check=True)
        bidi = pb.PROPAGATION_BIDIRECTIONAL
        mounts = [pb.Mount(container_path="/bidi", host_path=str(shared), propagation=bidi)]
        ctx = security(privileged=True)
        script = "mkdir /bidi/inner && mount -t tmpfs stockade-test-inner /bidi/inner && echo mounted"
        s, lines = run_once(server, script, handler="privileged", mounts=mounts,
                            linux=pb.LinuxContainerConfig(security_context=ctx))
        assert [t for stream, _, t in lines if stream == "stdout"] == ["mounted"], lines
        assert f"stockade-test-inner {shared}/inner " in Path("/proc/self/mounts").read_text()
    finally:
        subprocess.run(["umount", "-R", str(shared)], check=False)


def test_the_tenant_comes_from_an_allowed_annotation(server: Server, tmp_path: Path) -> None:
    """With tenant_annotation set, a pod's tenant (and so its id range) is the annotation's, not
    its namespace's."""
    config = tmp_path / "tenant.toml"
    allowed = 'default_handler = "stockade"\ntenant_annotation = "stockade.io/tenant"'
    config.write_text(CONFIG.replace('default_handler = "stockade"', allowed))
    base = fast_tmp()
    own = Server(base, "--image-store", str(server.base / "images"), config=config)
    try:
        ranges = {}
        for name, annotations in (("plain", {}), ("moved", {"stockade.io/tenant": "team-b"})):
            cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, namespace="team-a", uid=name),
                                      annotations=annotations, linux=pb.LinuxPodSandboxConfig())
            pod_id = own.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=cfg)).pod_sandbox_id
            info = json.loads(own.runtime.PodSandboxStatus(
                pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)).info["info"])
            ranges[name] = (info["tenant"], info["uid_map"][0])
            own.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        assert ranges["plain"][0] == "team-a" and ranges["moved"][0] == "team-b"
        assert ranges["plain"][1] != ranges["moved"][1]
    finally:
        assert own.stop() == 0
        shutil.rmtree(base, ignore_errors=True)
