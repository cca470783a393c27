"""CRI messages to the library's plain data and back: the only place that knows both."""

from __future__ import annotations

from cri_api.v1 import api_pb2 as pb

from .bundle import ContainerSpec, MountSpec
from .containers import Container
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
        port_mappings=[[p.host_port, p.container_port, PROTOCOLS[p.protocol], p.host_ip]
                       for p in config.port_mappings if p.host_port],
        privileged=linux.security_context.privileged,
        **_userns(options),
        **_pod_limits(linux),
    )


def _userns(options: pb.NamespaceOption) -> dict:
    """userns_options as kubelet sends it: a mode, and for POD the id mappings it chose."""
    if not options.HasField("userns_options"):
        return {}
    u = options.userns_options
    return {"userns_mode": USERNS_MODES.get(u.mode, str(u.mode)),
            "userns_uids": [[m.container_id, m.host_id, m.length] for m in u.uids],
            "userns_gids": [[m.container_id, m.host_id, m.length] for m in u.gids]}


def _pod_limits(linux: pb.LinuxPodSandboxConfig) -> dict:
    """The pod's limits: its resources plus its RuntimeClass overhead (limits with none unset)."""
    res, extra = linux.resources, linux.overhead
    memory = res.memory_limit_in_bytes + extra.memory_limit_in_bytes if res.memory_limit_in_bytes else 0
    period = res.cpu_period or extra.cpu_period or (100000 if res.cpu_quota else 0)
    quota = res.cpu_quota + extra.cpu_quota if res.cpu_quota else 0
    shares = res.cpu_shares + extra.cpu_shares if res.cpu_shares else 0
    return {"memory_limit": memory, "cpu_quota": quota, "cpu_period": period if quota else 0,
            "cpu_shares": shares}


def verbose(record: object, wanted: bool) -> dict[str, str]:
    """A status call's `info` with verbose set: the whole record as JSON (crictl inspect shows it)."""
    if not wanted:
        return {}
    from stockade.runtime._lite import json
    from stockade.runtime._lite.dataclasses import asdict

    return {"info": json.dumps(asdict(record))}


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
        network=pb.PodSandboxNetworkStatus(ip=pod.ip, additional_ips=[pb.PodIP(ip=pod.ip6)] * bool(pod.ip6)),
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



# -- containers

STATES = {"creating": pb.CONTAINER_UNKNOWN, "created": pb.CONTAINER_CREATED, "running": pb.CONTAINER_RUNNING,
          "exited": pb.CONTAINER_EXITED}
PROPAGATIONS = {pb.PROPAGATION_PRIVATE: "private", pb.PROPAGATION_HOST_TO_CONTAINER: "host_to_container",
                pb.PROPAGATION_BIDIRECTIONAL: "bidirectional"}
PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}
USERNS_MODES = {pb.POD: "pod", pb.CONTAINER: "container", pb.NODE: "node", pb.TARGET: "target"}
SECCOMP = {pb.SecurityProfile.RuntimeDefault: "runtime/default", pb.SecurityProfile.Unconfined: "unconfined"}


def container_spec(request: pb.CreateContainerRequest) -> ContainerSpec:
    c = request.config
    res = c.linux.resources
    sec = c.linux.security_context
    return ContainerSpec(
        name=c.metadata.name, attempt=c.metadata.attempt, image=c.image.image,
        command=list(c.command), args=list(c.args), working_dir=c.working_dir,
        envs=[(kv.key, kv.value) for kv in c.envs],
        mounts=[MountSpec(container_path=m.container_path, host_path=m.host_path, readonly=m.readonly,
                          propagation=PROPAGATIONS.get(m.propagation, "private"),
                          recursive_read_only=m.recursive_read_only) for m in c.mounts],
        devices=[(d.container_path, d.host_path, d.permissions) for d in c.devices],
        labels=dict(c.labels), annotations=dict(c.annotations), log_path=c.log_path, tty=c.tty, stdin=c.stdin,
        stdin_once=c.stdin_once,
        cpu_period=res.cpu_period, cpu_quota=res.cpu_quota, cpu_shares=res.cpu_shares,
        memory_limit=res.memory_limit_in_bytes, oom_score_adj=res.oom_score_adj,
        cpuset_cpus=res.cpuset_cpus, cpuset_mems=res.cpuset_mems,
        privileged=sec.privileged,
        add_caps=list(sec.capabilities.add_capabilities), drop_caps=list(sec.capabilities.drop_capabilities),
        run_as_user=sec.run_as_user.value if sec.HasField("run_as_user") else None,
        run_as_group=sec.run_as_group.value if sec.HasField("run_as_group") else None,
        run_as_username=sec.run_as_username, supplemental_groups=list(sec.supplemental_groups),
        readonly_rootfs=sec.readonly_rootfs, no_new_privs=sec.no_new_privs,
        masked_paths=list(sec.masked_paths) or None, readonly_paths=list(sec.readonly_paths) or None,
        seccomp=_seccomp(sec),
        pid_mode=MODES.get(sec.namespace_options.pid, CONTAINER),
    )


def _seccomp(sec: pb.LinuxContainerSecurityContext) -> str:
    if sec.HasField("seccomp"):
        if sec.seccomp.profile_type == pb.SecurityProfile.Localhost:
            return "localhost/" + sec.seccomp.localhost_ref
        return SECCOMP[sec.seccomp.profile_type]
    return sec.seccomp_profile_path  # the deprecated field kubelet still fills; "": none asked for


def container_metadata(c: Container) -> pb.ContainerMetadata:
    return pb.ContainerMetadata(name=c.spec["name"], attempt=c.spec["attempt"])


def container_status(c: Container) -> pb.ContainerStatus:
    s = c.spec
    mounts = [pb.Mount(container_path=m["container_path"], host_path=m["host_path"], readonly=m["readonly"],
                       propagation={v: k for k, v in PROPAGATIONS.items()}[m["propagation"]])
              for m in s["mounts"]]
    return pb.ContainerStatus(
        id=c.id, metadata=container_metadata(c), state=STATES[c.state], created_at=c.created_at,
        started_at=c.started_at, finished_at=c.finished_at, exit_code=c.exit_code,
        image=pb.ImageSpec(image=s["image"]), image_ref=c.image_id, image_id=c.image_id,
        reason=c.reason, message=c.message, labels=s["labels"], annotations=s["annotations"],
        mounts=mounts, log_path=c.log_path, user=_user(c.user),
    )


def _user(ids: list) -> pb.ContainerUser | None:
    if not ids:
        return None
    uid, gid, *groups = ids
    return pb.ContainerUser(linux=pb.LinuxContainerUser(uid=uid, gid=gid, supplemental_groups=groups))


def container_item(c: Container) -> pb.Container:
    s = c.spec
    return pb.Container(id=c.id, pod_sandbox_id=c.pod_id, metadata=container_metadata(c),
                        image=pb.ImageSpec(image=s["image"]), image_ref=c.image_id, image_id=c.image_id,
                        state=STATES[c.state], created_at=c.created_at, labels=s["labels"],
                        annotations=s["annotations"])


def container_matches(c: Container, f: pb.ContainerFilter) -> bool:
    if f.id and not c.id.startswith(f.id):
        return False
    if f.pod_sandbox_id and not c.pod_id.startswith(f.pod_sandbox_id):
        return False
    if f.HasField("state") and f.state.state != STATES[c.state]:
        return False
    return all(c.spec["labels"].get(k) == v for k, v in f.label_selector.items())


def container_stats(c: Container, numbers: dict, mountpoint: str) -> pb.ContainerStats:
    when = numbers["timestamp"]
    return pb.ContainerStats(
        attributes=pb.ContainerAttributes(id=c.id, metadata=container_metadata(c), labels=c.spec["labels"],
                                          annotations=c.spec["annotations"]),
        cpu=pb.CpuUsage(timestamp=when, usage_core_nano_seconds=pb.UInt64Value(value=numbers["cpu_ns"])),
        memory=pb.MemoryUsage(timestamp=when, working_set_bytes=pb.UInt64Value(value=numbers["memory"]),
                              usage_bytes=pb.UInt64Value(value=numbers["memory"])),
        writable_layer=pb.FilesystemUsage(timestamp=when,
                                          fs_id=pb.FilesystemIdentifier(mountpoint=mountpoint),
                                          used_bytes=pb.UInt64Value(value=numbers["layer_bytes"]),
                                          inodes_used=pb.UInt64Value(value=numbers["layer_inodes"])),
    )


def pod_stats(pod: Pod, containers: list[pb.ContainerStats], when: int) -> pb.PodSandboxStats:
    cpu = sum(c.cpu.usage_core_nano_seconds.value for c in containers)
    memory = sum(c.memory.working_set_bytes.value for c in containers)
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(id=pod.id, metadata=pod_metadata(pod), labels=pod.spec["labels"],
                                           annotations=pod.spec["annotations"]),
        linux=pb.LinuxPodSandboxStats(
            cpu=pb.CpuUsage(timestamp=when, usage_core_nano_seconds=pb.UInt64Value(value=cpu)),
            memory=pb.MemoryUsage(timestamp=when, working_set_bytes=pb.UInt64Value(value=memory),
                                  usage_bytes=pb.UInt64Value(value=memory)),
            containers=containers),
    )


def resource_changes(res: pb.LinuxContainerResources) -> dict:
    return {"cpu_period": res.cpu_period, "cpu_quota": res.cpu_quota, "cpu_shares": res.cpu_shares,
            "memory_limit": res.memory_limit_in_bytes, "cpuset_cpus": res.cpuset_cpus,
            "cpuset_mems": res.cpuset_mems}
