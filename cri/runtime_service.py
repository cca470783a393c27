"""CRI RuntimeService: a thin layer over the library: the runtime's identity, readiness and
configuration, pod sandboxes (cri.pods), containers (cri.containers), and the streaming calls
(cri.streaming: Exec, Attach and PortForward hand out URLs its server answers)."""

from __future__ import annotations

import threading
from queue import Empty

from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc
from stockade.runtime.errors import StockadeError

from . import messages
from .containers import Container, Containers
from .errors import invalid, log, rpc
from .events import Events
from .forker import Forker
from .pods import Pod, Pods
from .streaming import Backend, Pending, StreamServer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

    import grpc
    from stockade.runtime.images.store import Store

    from .config import Config

RUNTIME_NAME = "stockade"
CRI_VERSION = "v1"


def runtime_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stockade")
    except PackageNotFoundError:
        return "0.0.0"


class RuntimeService(pb_grpc.RuntimeServiceServicer):
    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.pod_cidr = ""
        self.lock = threading.Lock()
        self.agent: dict = {}  # what the in-process BPF agent set up (server.serve fills it)
        self.forker = Forker()
        self.network = None
        self.streaming: StreamServer | None = None
        if config.network in ("bridge", "cni"):
            from .network import Network

            self.network = Network(config)
        self.pods = Pods(config, self.forker, self.network)
        self.events = Events()
        self.containers = Containers(config, self.pods, store, self.events.emit)
        for cid in self.containers.reconcile():
            log.info("removed container %s: its CreateContainer did not finish", cid)
        for pod_id in self.pods.reconcile():
            log.info("removed pod %s: its RunPodSandbox did not finish", pod_id)
        if self.network is not None:
            self.network.start(self.pods.nets)
    def close(self) -> None:
        self.forker.close()

    @rpc
    def Version(self, request: pb.VersionRequest, context: grpc.ServicerContext) -> pb.VersionResponse:
        return pb.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME,
                                  runtime_version=runtime_version(), runtime_api_version=CRI_VERSION)

    @rpc
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        if self.network is None:
            net = pb.RuntimeCondition(type="NetworkReady", status=False, reason="NetworkNotConfigured",
                                      message=f"network = {self.config.network!r}: pods get loopback only")
        else:
            net = pb.RuntimeCondition(type="NetworkReady", status=self.network.ready,
                                      reason="" if self.network.ready else "NetworkNotReady",
                                      message=self.network.reason)
        conditions = [pb.RuntimeCondition(type="RuntimeReady", status=True), net]
        handlers = [
            pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(
                recursive_read_only_mounts=False, user_namespaces=True))  # kubelet's own mappings: any
            for name, h in sorted(self.config.handlers.items())
        ]
        handlers.append(pb.RuntimeHandler(name="", features=handlers[[h.name for h in handlers].index(
            self.config.default_handler)].features))
        info = {}
        if request.verbose:
            from stockade.runtime._lite import json

            info["config"] = json.dumps({"handlers": sorted(self.config.handlers), "pod_cidr": self.pod_cidr,
                                         "network": self.config.network, "bpf_agent": self.agent})
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=conditions), runtime_handlers=handlers,
                                 info=info)

    @rpc
    def RuntimeConfig(self, request: pb.RuntimeConfigRequest, context: grpc.ServicerContext
                      ) -> pb.RuntimeConfigResponse:
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=pb.CGROUPFS))

    @rpc
    def UpdateRuntimeConfig(self, request: pb.UpdateRuntimeConfigRequest, context: grpc.ServicerContext
                            ) -> pb.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr:
            import ipaddress

            from .errors import invalid

            for part in cidr.split(","):
                try:
                    ipaddress.ip_network(part.strip())
                except ValueError:
                    raise invalid(f"pod_cidr {part.strip()!r} is not a network",
                                  where="runtime_config.network_config.pod_cidr",
                                  hint="e.g. 10.88.0.0/16") from None
            with self.lock:
                self.pod_cidr = cidr
            log.info("pod CIDR is now %s", cidr)
            v4 = [part.strip() for part in cidr.split(",") if ":" not in part]
            v6 = [part.strip() for part in cidr.split(",") if ":" in part]
            if self.network is not None and v4:
                self.network.set_pod_cidr(v4[0], v6[0] if v6 else "")
        return pb.UpdateRuntimeConfigResponse()

    # -- pod sandboxes

    @rpc
    def RunPodSandbox(self, request: pb.RunPodSandboxRequest, context: grpc.ServicerContext
                      ) -> pb.RunPodSandboxResponse:
        pod = self.pods.run(messages.pod_spec(request))
        log.info("pod %s/%s is %s (handler %s, tenant %s)", pod.spec["namespace"], pod.spec["name"], pod.id,
                 pod.handler, pod.tenant)
        return pb.RunPodSandboxResponse(pod_sandbox_id=pod.id)

    @rpc
    def StopPodSandbox(self, request: pb.StopPodSandboxRequest, context: grpc.ServicerContext
                       ) -> pb.StopPodSandboxResponse:
        pod = self.pods.find(request.pod_sandbox_id)
        if pod is not None:
            for c in self.containers.list():
                if c.pod_id == pod.id:
                    self.containers.stop(c.id, timeout=0)
            self.pods.stop(pod.id)
        return pb.StopPodSandboxResponse()

    @rpc
    def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest, context: grpc.ServicerContext
                         ) -> pb.RemovePodSandboxResponse:
        pod = self.pods.find(request.pod_sandbox_id)
        if pod is not None:
            for c in self.containers.list():
                if c.pod_id == pod.id:
                    self.containers.remove(c.id)
            self.pods.remove(pod.id)
            log.info("pod %s removed", pod.id)
        return pb.RemovePodSandboxResponse()

    @rpc
    def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest, context: grpc.ServicerContext
                         ) -> pb.PodSandboxStatusResponse:
        pod = self.pods.get(request.pod_sandbox_id)
        return pb.PodSandboxStatusResponse(status=messages.pod_status(pod),
                                           info=messages.verbose(pod, request.verbose))

    @rpc
    def ListPodSandbox(self, request: pb.ListPodSandboxRequest, context: grpc.ServicerContext
                       ) -> pb.ListPodSandboxResponse:
        pods = self.pods.list()
        if request.HasField("filter"):
            pods = [p for p in pods if messages.pod_matches(p, request.filter)]
        return pb.ListPodSandboxResponse(items=[messages.pod_item(p) for p in pods])

    # -- containers

    @rpc
    def CreateContainer(self, request: pb.CreateContainerRequest, context: grpc.ServicerContext
                        ) -> pb.CreateContainerResponse:
        c = self.containers.create(request.pod_sandbox_id, messages.container_spec(request))
        log.info("container %s (%s) created in pod %s", c.id, c.spec["name"], c.pod_id)
        return pb.CreateContainerResponse(container_id=c.id)

    @rpc
    def StartContainer(self, request: pb.StartContainerRequest, context: grpc.ServicerContext
                       ) -> pb.StartContainerResponse:
        self.containers.start(request.container_id)
        return pb.StartContainerResponse()

    @rpc
    def StopContainer(self, request: pb.StopContainerRequest, context: grpc.ServicerContext
                      ) -> pb.StopContainerResponse:
        if self.containers.find(request.container_id) is not None:  # an unknown one is stopped
            self.containers.stop(request.container_id, request.timeout)
        return pb.StopContainerResponse()

    @rpc
    def RemoveContainer(self, request: pb.RemoveContainerRequest, context: grpc.ServicerContext
                        ) -> pb.RemoveContainerResponse:
        self.containers.remove(request.container_id)
        return pb.RemoveContainerResponse()

    @rpc
    def ContainerStatus(self, request: pb.ContainerStatusRequest, context: grpc.ServicerContext
                        ) -> pb.ContainerStatusResponse:
        c = self.containers.refresh(self.containers.get(request.container_id))
        return pb.ContainerStatusResponse(status=messages.container_status(c),
                                          info=messages.verbose(c, request.verbose))

    @rpc
    def ListContainers(self, request: pb.ListContainersRequest, context: grpc.ServicerContext
                       ) -> pb.ListContainersResponse:
        found = [self.containers.refresh(c) for c in self.containers.list()]
        if request.HasField("filter"):
            found = [c for c in found if messages.container_matches(c, request.filter)]
        return pb.ListContainersResponse(containers=[messages.container_item(c) for c in found])

    @rpc
    def ExecSync(self, request: pb.ExecSyncRequest, context: grpc.ServicerContext) -> pb.ExecSyncResponse:
        code, out, err = self.containers.exec_sync(request.container_id, list(request.cmd), request.timeout)
        return pb.ExecSyncResponse(stdout=out, stderr=err, exit_code=code)

    @rpc
    def ReopenContainerLog(self, request: pb.ReopenContainerLogRequest, context: grpc.ServicerContext
                           ) -> pb.ReopenContainerLogResponse:
        self.containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    @rpc
    def UpdateContainerResources(self, request: pb.UpdateContainerResourcesRequest,
                                 context: grpc.ServicerContext) -> pb.UpdateContainerResourcesResponse:
        self.containers.update(request.container_id, messages.resource_changes(request.linux))
        return pb.UpdateContainerResourcesResponse()

    # -- stats

    @rpc
    def ContainerStats(self, request: pb.ContainerStatsRequest, context: grpc.ServicerContext
                       ) -> pb.ContainerStatsResponse:
        c = self.containers.refresh(self.containers.get(request.container_id))
        return pb.ContainerStatsResponse(stats=self._stats(c))

    @rpc
    def ListContainerStats(self, request: pb.ListContainerStatsRequest, context: grpc.ServicerContext
                           ) -> pb.ListContainerStatsResponse:
        f = request.filter  # the list filter's fields, without state: one matcher for both
        wanted = pb.ContainerFilter(id=f.id, pod_sandbox_id=f.pod_sandbox_id, label_selector=f.label_selector)
        found = [c for c in map(self.containers.refresh, self.containers.list())
                 if messages.container_matches(c, wanted)]
        return pb.ListContainerStatsResponse(stats=[self._stats(c) for c in found])

    @rpc
    def PodSandboxStats(self, request: pb.PodSandboxStatsRequest, context: grpc.ServicerContext
                        ) -> pb.PodSandboxStatsResponse:
        return pb.PodSandboxStatsResponse(stats=self._pod_stats(self.pods.get(request.pod_sandbox_id)))

    @rpc
    def ListPodSandboxStats(self, request: pb.ListPodSandboxStatsRequest, context: grpc.ServicerContext
                            ) -> pb.ListPodSandboxStatsResponse:
        wanted = pb.PodSandboxFilter(id=request.filter.id, label_selector=request.filter.label_selector)
        pods = [p for p in self.pods.list() if messages.pod_matches(p, wanted)]
        return pb.ListPodSandboxStatsResponse(stats=[self._pod_stats(p) for p in pods])

    def _stats(self, c: Container) -> pb.ContainerStats:
        return messages.container_stats(c, self.containers.stats(c), self.config.image_store)

    def _pod_stats(self, pod: Pod) -> pb.PodSandboxStats:
        import time

        mine = [self._stats(self.containers.refresh(c)) for c in self.containers.list() if c.pod_id == pod.id]
        return messages.pod_stats(pod, mine, time.time_ns())

    # -- events and streaming

    def GetContainerEvents(self, request: pb.GetEventsRequest, context: grpc.ServicerContext
                           ) -> Iterator[pb.ContainerEventResponse]:
        with self.events.subscribe() as queue:
            while context.is_active():
                try:
                    cid, kind, when = queue.get(timeout=0.5)
                except Empty:
                    continue
                event = pb.ContainerEventResponse(container_id=cid, container_event_type=kind,
                                                  created_at=when)
                c = self.containers.find(cid)
                if c is not None:
                    pod = self.pods.find(c.pod_id)
                    if pod is not None:
                        event.pod_sandbox_status.CopyFrom(messages.pod_status(pod))
                    event.containers_statuses.append(messages.container_status(self.containers.refresh(c)))
                yield event

    @rpc
    def Exec(self, request: pb.ExecRequest, context: grpc.ServicerContext) -> pb.ExecResponse:
        c = self.containers.running(request.container_id)
        if not request.cmd:
            raise invalid("no command", where="cmd")
        _check_streams(request)
        pending = Pending("exec", c.id, list(request.cmd), request.tty, request.stdin, request.stdout,
                          request.stderr)
        return pb.ExecResponse(url=self.streaming.url(pending))

    @rpc
    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> pb.AttachResponse:
        c = self.containers.running(request.container_id)
        _check_streams(request)
        tty = bool(c.spec.get("tty"))  # the container's own: conmon tags its output by it
        # (input for a container without stdin is taken and dropped by conmon, as CRI-O's is)
        pending = Pending("attach", c.id, [], tty, request.stdin, request.stdout, request.stderr and not tty)
        return pb.AttachResponse(url=self.streaming.url(pending))

    @rpc
    def PortForward(self, request: pb.PortForwardRequest, context: grpc.ServicerContext
                    ) -> pb.PortForwardResponse:
        self.pods.netns_of(request.pod_sandbox_id)
        pod = self.pods.get(request.pod_sandbox_id)
        ports = list(request.port)
        if not all(0 < p < 65536 for p in ports):
            raise invalid(f"ports {ports}: each must be 1-65535", where="port")
        pending = Pending("portforward", pod_id=pod.id, ports=ports)
        return pb.PortForwardResponse(url=self.streaming.url(pending))

    def start_streaming(self) -> None:
        """The server Exec, Attach and PortForward send their clients to ([stockade.streaming])."""
        s = self.config.streaming
        backend = Backend(self.containers.exec_stream, self.containers.attach_paths, self.pods.netns_of)
        try:
            self.streaming = StreamServer(s.address, s.port, backend, idle_timeout=s.idle_timeout,
                                          tls=(s.tls_cert, s.tls_key) if s.tls_cert else None)
        except OSError as e:  # ssl.SSLError among them
            raise StockadeError(f"cannot serve streaming on {s.address}:{s.port}: {e.strerror or e}",
                                where="[stockade.streaming]",
                                hint="a free address and port (0: any), a readable certificate and key"
                                ) from None
        self.streaming.start()
        log.info("streaming (exec, attach, port-forward) on %s", self.streaming.base_url)


def _check_streams(request: pb.ExecRequest | pb.AttachRequest) -> None:
    if request.tty and request.stderr:
        raise invalid("tty and stderr cannot both be true", where="stderr",
                      hint="a terminal carries both outputs on stdout")
    if not (request.stdin or request.stdout or request.stderr):
        raise invalid("none of stdin, stdout and stderr is asked for", where="stdin")
