"""CRI RuntimeService: the runtime's identity, readiness and configuration. Pods and containers
come next (the methods not defined here answer UNIMPLEMENTED, as the generated servicer does)."""

from __future__ import annotations

import threading

from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from .errors import log, rpc

TYPE_CHECKING = False
if TYPE_CHECKING:
    import grpc

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
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pod_cidr = ""
        self.lock = threading.Lock()

    @rpc
    def Version(self, request: pb.VersionRequest, context: grpc.ServicerContext) -> pb.VersionResponse:
        return pb.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME,
                                  runtime_version=runtime_version(), runtime_api_version=CRI_VERSION)

    @rpc
    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(type="NetworkReady", status=False, reason="NetworkNotConfigured",
                                message=f"network = {self.config.network!r}: pods get no network yet"),
        ]
        handlers = [
            pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(
                recursive_read_only_mounts=False, user_namespaces=h.user_namespace))
            for name, h in sorted(self.config.handlers.items())
        ]
        handlers.append(pb.RuntimeHandler(name="", features=handlers[[h.name for h in handlers].index(
            self.config.default_handler)].features))
        info = {}
        if request.verbose:
            from stockade.runtime._lite import json

            info["config"] = json.dumps({"handlers": sorted(self.config.handlers), "pod_cidr": self.pod_cidr,
                                         "network": self.config.network})
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
        return pb.UpdateRuntimeConfigResponse()
