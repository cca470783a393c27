"""A CRI server of the test's own (`stockade cri serve` on a socket in a temporary directory) and
a kubelet-like client over the generated stubs of `container-runtime-interface-api`."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

STOCKADE = str(Path(sys.executable).parent / "stockade")


class Server:
    """`stockade cri serve` with its socket, state and image store under BASE (made searchable by
    others: a container's root reaches its root filesystem through the store's parents)."""

    def __init__(self, base: Path, *flags: str, config: Path | None = None, bpf_agent: bool = False,
                 env: dict | None = None, netns: str | None = None) -> None:
        """BPF_AGENT: run the agent in the server (then ENV should point it at pins and a cgroup
        root of the test's own, as bpf_helpers.make_agent does). NETNS: a network namespace (a
        path) the server runs in, the test's "node" (only the network namespace: its pins must
        stay visible, so not `ip netns exec`, which also gives a mount namespace of its own)."""
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o711)
        self.base, self.socket = base, base / "cri.sock"
        self.log = base / "server.log"
        argv = [STOCKADE, "cri", "serve", "--socket", str(self.socket), "--state-dir", str(base / "state"),
                "--image-store", str(base / "images"), *flags]
        if config is not None:
            argv += ["--config", str(config)]
        if not bpf_agent:
            argv.append("--no-bpf-agent")
        if netns is not None:
            argv = ["nsenter", f"--net={netns}", "--", *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()  # a server that did not come up is not left running
                self.proc.wait()
                raise AssertionError(f"the CRI server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}",
                                             options=[("grpc.max_receive_message_length", 16 << 20)])
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.images = pb_grpc.ImageServiceStub(self.channel)

    def _listening(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(str(self.socket)) == 0

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; its exit code."""
        if hasattr(self, "channel"):
            self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


def stop_and_remove(server: Server) -> None:
    """Remove every pod (and so every container) the server has, stop it, remove its files."""
    for pod in server.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        server.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    assert server.stop() == 0
    shutil.rmtree(server.base, ignore_errors=True)


def pull(server: Server, image: str, **auth: str) -> str:
    request = pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=pb.AuthConfig(**auth))
    return server.images.PullImage(request, timeout=120).image_ref


def status_code(call, *args, **kw) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001, ANN002, ANN003
    """The gRPC status CALL ends with (OK and "" when it succeeds)."""
    try:
        call(*args, **kw)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def fast_tmp() -> Path:
    """A directory for a server's files whose parents others may search (pytest's are 0700)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="stockade-cri-", dir="/var/tmp"))



def remove_cgroup_everywhere(name: str) -> None:
    """What kubelet does with its pod cgroups, and what a server's cgroup parent needs once its
    agent is stopped: rmdir the tree NAME, deepest first, in every hierarchy."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]
    for mount in mounts:
        top = os.path.join(mount, name)
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
            os.rmdir(dirpath)
