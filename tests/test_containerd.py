"""containerd drives stockade-oci through its runc shim (containerd-shim-runc-v2), as a node
would: `ctr run --runc-binary`, and the CRI plugin's pod sequence with a `.slice` cgroup parent
(containerd turns it into slice:prefix:name) and a sandbox whose stderr is a read-only /dev/null
(the shim reads errors from --log then). The image is imported from an archive the test builds.

containerd runs with its own root, state, socket and runtime root, in a network namespace of its
own (pods use "host" networking, which is that namespace: no CNI, nothing on the host's network),
with restrict_oom_score_adj (no CAP_SYS_RESOURCE here).
"""

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
from images import busybox_image
from kernel import require
from leftovers import new_since, snapshot

OCI = str(Path(sys.executable).parent / "stockade-oci")
IMAGE = "docker.io/stockade/test:latest"
CTR_NS = "stockade-test"  # ctr's namespace; the CRI plugin uses k8s.io
SLICE = "stockade-test.slice"

CONFIG = """\
version = 2
root = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "stockade"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.stockade]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.stockade.options]
        BinaryName = "{oci}"
        Root = "{base}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base}/cni"
"""


class Containerd:
    def __init__(self, base: Path, binary: str = OCI) -> None:
        """containerd under BASE; its runc shim runs BINARY (stockade-oci, or runc for the
        benchmark in bench/cri.py)."""
        self.base = base
        self.sock = base / "containerd.sock"
        (base / "cni").mkdir()
        (base / "logs").mkdir()
        config = base / "config.toml"
        config.write_text(CONFIG.format(base=base, image=IMAGE, oci=binary))
        self.log = open(base / "containerd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", "containerd", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_tail()
            time.sleep(0.05)
        archive = busybox_image(base / "image.tar", IMAGE)
        for ns in (CTR_NS, "k8s.io"):
            done = self.ctr("images", "import", str(archive), ns=ns)
            assert done.returncode == 0, done.stderr
        import grpc
        from cri_api.v1 import api_pb2_grpc

        self.channel = grpc.insecure_channel(f"unix://{self.sock}")
        self.cri = api_pb2_grpc.RuntimeServiceStub(self.channel)

    def ctr(self, *args: str, ns: str = CTR_NS, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ctr", "--address", str(self.sock), "-n", ns, *args],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )

    def ctr_run(self, cid: str, *args: str) -> subprocess.CompletedProcess:
        """`ctr run --rm` with stockade-oci as the shim's runc binary."""
        runtime = ["--runc-binary", OCI, "--runc-root", str(self.base / "runc" / CTR_NS)]
        return self.ctr("run", "--rm", *runtime, IMAGE, cid, *args)

    def log_tail(self) -> str:
        return (self.base / "containerd.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Every pod and container removed through containerd, then containerd stopped; whatever
        a failure left (a shim, a container, a mount) is removed after it."""
        from cri_api.v1 import api_pb2 as pb

        try:
            for pod in self.cri.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
                self.cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
                self.cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        finally:
            self.channel.close()
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
            self.log.close()
            subprocess.run(["pkill", "-f", f"containerd-shim-runc-v2 .*{self.base}"], check=False)
            for state in (self.base / "runc").glob("*/*"):
                subprocess.run([OCI, "--root", str(state.parent), "delete", "--force", state.name])
            subprocess.run(["umount", "-R", "-l", str(self.base)], capture_output=True, check=False)
            for mountpoint in sorted(_mounts_under(self.base), reverse=True):
                subprocess.run(["umount", "-l", mountpoint], check=False)


def _mounts_under(base: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if line.split()[4].startswith(f"{base}/")]


@pytest.fixture(scope="module")
def containerd() -> Iterator[Containerd]:
    require(shutil.which("containerd") and shutil.which("ctr"), "containerd is installed by scripts/setup")
    base = Path(tempfile.mkdtemp(prefix="stockade-containerd-"))
    before = snapshot()
    engine = Containerd(base)
    try:
        yield engine
    finally:
        engine.stop()
        for hierarchy in Path("/sys/fs/cgroup").iterdir():  # parents containerd made and left
            for parent in (hierarchy / CTR_NS, hierarchy / SLICE):
                if parent.is_dir():
                    parent.rmdir()
        shutil.rmtree(base, ignore_errors=True)
    assert new_since(before) == {}


def test_ctr_run_reports_output_and_exit_code(containerd: Containerd) -> None:
    done = containerd.ctr_run("ctr-exit", "sh", "-c", "echo hello from stockade; exit 3")
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "hello from stockade"


def test_ctr_run_error_comes_back_through_the_log(containerd: Containerd) -> None:
    """The shim gives the runtime --log and reads the reason from it."""
    done = containerd.ctr_run("ctr-missing", "/bin/not-there")
    assert done.returncode != 0
    assert "OCI runtime create failed" in done.stderr and "'/bin/not-there': no such file" in done.stderr


def _pod_config(name: str, base: Path):  # noqa: ANN202 - cri_api types are generated
    from cri_api.v1 import api_pb2 as pb

    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="tenant-a", uid=f"uid-{name}"),
        log_directory=str(base / "logs" / name),
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=SLICE,
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.NODE)
            ),
        ),
    )


def _container_config(name: str, command: list[str]):  # noqa: ANN202
    from cri_api.v1 import api_pb2 as pb

    runtime_default = pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=IMAGE),
        command=command,
        log_path=f"{name}.log",
        linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(seccomp=runtime_default)
        ),
    )


def _wait_exited(cri, cid: str):  # noqa: ANN001, ANN202
    from cri_api.v1 import api_pb2 as pb

    deadline = time.monotonic() + 30
    while True:
        status = cri.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status
        if status.state == pb.CONTAINER_EXITED:
            return status
        assert time.monotonic() < deadline, f"container {cid} never exited: {status}"
        time.sleep(0.05)


def test_cri_pod_with_slice_parent(containerd: Containerd) -> None:
    """RunPodSandbox (pause container, stderr a read-only /dev/null) with a .slice cgroup parent,
    then a container with RuntimeDefault seccomp: its output in the CRI log, its exit code and
    reason in ContainerStatus; a container that cannot start fails StartContainer with our reason."""
    import grpc
    from cri_api.v1 import api_pb2 as pb

    cri = containerd.cri
    pod_config = _pod_config("pod-a", containerd.base)
    request = pb.RunPodSandboxRequest(config=pod_config, runtime_handler="stockade")
    pod = cri.RunPodSandbox(request, timeout=60)
    script = "echo out; echo err >&2; grep ^0:: /proc/self/cgroup; grep ^Seccomp: /proc/self/status; exit 7"
    created = cri.CreateContainer(
        pb.CreateContainerRequest(
            pod_sandbox_id=pod.pod_sandbox_id,
            config=_container_config("work", ["sh", "-c", script]),
            sandbox_config=pod_config,
        ),
        timeout=60,
    )
    cri.StartContainer(pb.StartContainerRequest(container_id=created.container_id), timeout=60)
    status = _wait_exited(cri, created.container_id)
    (pause,) = (containerd.base / "runc").rglob("state.json")  # the work container is deleted on exit
    pid = json.loads(pause.read_text())["pid"]
    flags = Path(f"/proc/{pid}/fdinfo/2").read_text().split("flags:")[1].split()[0]
    assert os.readlink(f"/proc/{pid}/fd/2") == "/dev/null" and int(flags, 8) & os.O_ACCMODE == os.O_RDONLY
    assert (status.exit_code, status.reason) == (7, "Error")
    log = [line.split(" ", 3)[1:] for line in Path(status.log_path).read_text().splitlines()]
    assert ["stdout", "F", "out"] in log and ["stderr", "F", "err"] in log
    cgroup = next(msg for _, _, msg in log if msg.startswith("0::"))  # the cgroup2 tree (hybrid and v2)
    assert cgroup.endswith(f"/{SLICE}:cri-containerd:{created.container_id}"), cgroup
    assert ["stdout", "F", "Seccomp:\t2"] in log

    broken = cri.CreateContainer(
        pb.CreateContainerRequest(
            pod_sandbox_id=pod.pod_sandbox_id,
            config=_container_config("broken", ["/bin/not-there"]),
            sandbox_config=pod_config,
        ),
        timeout=60,
    )
    with pytest.raises(grpc.RpcError) as failed:
        cri.StartContainer(pb.StartContainerRequest(container_id=broken.container_id), timeout=60)
    assert "'/bin/not-there': no such file" in failed.value.details()

    cri.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.pod_sandbox_id), timeout=60)
    cri.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.pod_sandbox_id), timeout=60)
    assert not list((containerd.base / "runc").rglob("state.json"))  # every container deleted
