"""CRI messages to the library's plain data and back: the only place that knows both."""

from __future__ import annotations

from cri_api.v1 import api_pb2 as pb

from .pods import CONTAINER, NODE, POD, READY, Pod, PodSpec

MODES = {pb.POD: POD, pb.CONTAINER: CONTAINER, pb.NODE: NODE}
MODE_VALUES = {v: k for k, v in MODES.items()}


def pod_spec(request: pb.RunPodSandboxRequest) -> PodSpec:
    config = request.config
    linux = config.linux
    options = linux.security_context.namespace_options
    return PodSpec(
        name=config.metadata.name,
        namespace=config.metadata.namespace,
        uid=config.metadata.uid,
        attempt=config.metadata.attempt,
        handler=request.runtime_handler,
        hostname=config.hostname,
        log_directory=config.log_directory,
        cgroup_parent=linux.cgroup_parent,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        dns_servers=list(config.dns_config.servers),
        dns_searches=list(config.dns_config.searches),
        dns_options=list(config.dns_config.options),
        network_mode=MODES.get(options.network, POD),
        ipc_mode=MODES.get(options.ipc, POD),
        pid_mode=MODES.get(options.pid, POD) if options.pid != pb.TARGET else CONTAINER,
        sysctls=dict(linux.sysctls),
        privileged=linux.security_context.privileged,
    )


def pod_metadata(pod: Pod) -> pb.PodSandboxMetadata:
    s = pod.spec
    return pb.PodSandboxMetadata(name=s["name"], uid=s["uid"], namespace=s["namespace"], attempt=s["attempt"])


def pod_state(pod: Pod) -> int:
    return pb.SANDBOX_READY if pod.state == READY else pb.SANDBOX_NOTREADY


def pod_status(pod: Pod) -> pb.PodSandboxStatus:
    s = pod.spec
    options = pb.NamespaceOption(network=MODE_VALUES[s["network_mode"]], ipc=MODE_VALUES[s["ipc_mode"]],
                                 pid=MODE_VALUES[s["pid_mode"]])
    return pb.PodSandboxStatus(
        id=pod.id, metadata=pod_metadata(pod), state=pod_state(pod), created_at=pod.created_at,
        network=pb.PodSandboxNetworkStatus(ip=""),  # tenant networking gives pods addresses
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=options)),
        labels=s["labels"], annotations=s["annotations"], runtime_handler=pod.handler,
    )


def pod_item(pod: Pod) -> pb.PodSandbox:
    s = pod.spec
    return pb.PodSandbox(id=pod.id, metadata=pod_metadata(pod), state=pod_state(pod),
                         created_at=pod.created_at,
                         labels=s["labels"], annotations=s["annotations"], runtime_handler=pod.handler)


def pod_matches(pod: Pod, f: pb.PodSandboxFilter) -> bool:
    if f.id and not pod.id.startswith(f.id):
        return False
    if f.HasField("state") and f.state.state != pod_state(pod):
        return False
    labels = pod.spec["labels"]
    return all(labels.get(k) == v for k, v in f.label_selector.items())

