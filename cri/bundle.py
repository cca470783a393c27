"""A CRI container as an OCI runtime config: plain data in (the request as a ContainerSpec, the
image config, the pod, the handler), a config.json dict out. Kubernetes' rules for command and
args, the image's env/user/workdir where the request is silent, the pod's namespaces joined by
path, the handler's confinement (its seccomp profile, its BPF policy, user namespace or not).
"""

from __future__ import annotations

import os
import resource

from stockade.runtime._lite.dataclasses import dataclass, field
from stockade.runtime.defaults import MASKED_PATHS, OCI_DEFAULT_CAPS, READONLY_PATHS, standard_mounts
from stockade.runtime.errors import SpecError
from stockade.runtime.linux import CAPABILITIES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from stockade.runtime.images.passwd import User

    from .config import Handler
    from .pods import Pod

# Untrusted code needs neither raw sockets nor device nodes (as `stockade run`); a pod that
# needs them asks with capabilities.add_capabilities.
DEFAULT_CAPS = [c for c in OCI_DEFAULT_CAPS if c not in ("CAP_MKNOD", "CAP_NET_RAW")]
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROPAGATION = {"private": "rprivate", "host_to_container": "rslave", "bidirectional": "rshared"}
SHM_SIZE = 64 << 20


@dataclass
class MountSpec:
    container_path: str
    host_path: str
    readonly: bool = False
    propagation: str = "private"  # private | host_to_container | bidirectional
    recursive_read_only: bool = False


@dataclass
class ContainerSpec:
    """What CreateContainer asks for."""

    name: str
    attempt: int = 0
    image: str = ""
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    working_dir: str = ""
    envs: list[tuple[str, str]] = field(default_factory=list)
    mounts: list[MountSpec] = field(default_factory=list)
    devices: list[tuple[str, str, str]] = field(default_factory=list)  # (container, host, permissions)
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)
    log_path: str = ""
    tty: bool = False
    stdin: bool = False
    stdin_once: bool = False  # the first attach's end of input closes the container's stdin
    # linux.resources
    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    # linux.security_context
    privileged: bool = False
    add_caps: list[str] = field(default_factory=list)
    drop_caps: list[str] = field(default_factory=list)
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    supplemental_groups: list[int] = field(default_factory=list)
    readonly_rootfs: bool = False
    no_new_privs: bool = False
    masked_paths: list[str] | None = None  # None: the defaults
    readonly_paths: list[str] | None = None
    seccomp: str = "runtime/default"  # runtime/default | unconfined | localhost/<path>
    pid_mode: str = "container"  # container | pod | node


def arguments(spec: ContainerSpec, entrypoint: list[str], cmd: list[str]) -> list[str]:
    """Kubernetes' rule: command replaces the entrypoint (and drops cmd); args replace cmd."""
    if spec.command:
        out = spec.command + spec.args
    else:
        out = entrypoint + (spec.args or cmd)
    if not out:
        raise SpecError("neither the container nor its image names a command", where="config.command",
                        hint="set command (or args), or use an image with an entrypoint or cmd")
    return out


def user_text(spec: ContainerSpec, image_user: str) -> str:
    """The user to resolve in the image: run_as_user/run_as_username, else the image's."""
    user = str(spec.run_as_user) if spec.run_as_user is not None else spec.run_as_username
    if spec.run_as_group is not None:
        if not user:  # the CRI's rule: a group alone would pair with whichever user the image has
            raise SpecError("run_as_group is set without run_as_user or run_as_username",
                            where="config.linux.security_context.run_as_group", hint="name the user too")
        return f"{user}:{spec.run_as_group}"
    return user or image_user or "0"


def held_capabilities() -> list[str]:
    """What "ALL" and privileged mean: every capability this server holds (containerd's rule),
    not every one the kernel knows: a node may withhold some (CAP_SYS_RESOURCE, say)."""
    from stockade.runtime.capabilities import held_bounding

    held = held_bounding()
    return [name for name, number in CAPABILITIES.items() if number in held]


def capabilities(spec: ContainerSpec, uid: int) -> dict:
    caps = held_capabilities() if spec.privileged else list(DEFAULT_CAPS)
    for name in spec.add_caps:
        full = _cap(name, "add_capabilities")
        if full == "ALL":
            caps = held_capabilities()
        elif full not in caps:
            caps.append(full)
    for name in spec.drop_caps:
        full = _cap(name, "drop_capabilities")
        caps = [] if full == "ALL" else [c for c in caps if c != full]
    effective = caps if uid == 0 else []
    return {"bounding": caps, "effective": effective, "permitted": effective}


def _cap(name: str, where: str) -> str:
    if name.upper() == "ALL":
        return "ALL"
    full = name.upper() if name.upper().startswith("CAP_") else f"CAP_{name.upper()}"
    if full not in CAPABILITIES:
        raise SpecError(f"unknown capability {name!r}", where=f"linux.security_context.capabilities.{where}")
    return full


def oci_config(spec: ContainerSpec, *, args: list[str], env: list[str], cwd: str, user: User, pod: Pod,
               pod_dir: str, handler: Handler, seccomp: dict | None, cid: str) -> dict:
    namespaces = [{"type": "mount"}, {"type": "cgroup"}]
    joined = ["user", "network", "ipc", "uts"]
    if spec.pid_mode == "pod":
        joined.append("pid")  # the pod's, held by its init
    else:
        namespaces.append({"type": "pid"})
    for kind in joined:
        if kind in pod.namespaces:
            namespaces.append({"type": kind, "path": pod.namespaces[kind]})
    config: dict = {
        "ociVersion": "1.2.0",
        "process": _process(spec, args, env, cwd, user),
        "root": {"path": "rootfs", "readonly": spec.readonly_rootfs},
        "mounts": _mounts(spec, pod_dir),
        "linux": {
            "namespaces": namespaces,
            "resources": _within(resources(spec), pod),
            "cgroupsPath": f"{pod.cgroup_parent.rstrip('/')}/{cid}",
            "maskedPaths": list(MASKED_PATHS) if spec.masked_paths is None else spec.masked_paths,
            "readonlyPaths": list(READONLY_PATHS) if spec.readonly_paths is None else spec.readonly_paths,
        },
        "annotations": {
            "io.stockade.tenant": pod.tenant,
            "io.stockade.profile": handler.profile,
            "io.stockade.handler": handler.name,
            "io.kubernetes.pod.namespace": pod.spec["namespace"],
            "io.kubernetes.pod.name": pod.spec["name"],
            "io.kubernetes.container.name": spec.name,
        },
    }
    kinds = {m.propagation for m in spec.mounts}
    if kinds & {"bidirectional", "host_to_container"}:
        # a mount's propagation reaches no further than its parents': the root must be shared
        # for a bidirectional mount's events to leave the container (containerd and CRI-O agree)
        config["linux"]["rootfsPropagation"] = "rshared" if "bidirectional" in kinds else "rslave"
    if spec.privileged:
        _privileged(config)
    if seccomp is not None:
        config["linux"]["seccomp"] = seccomp
    if spec.oom_score_adj:
        config["process"]["oomScoreAdj"] = _oom_score_adj(spec.oom_score_adj)
    for container_path, host_path, permissions in spec.devices:
        device = _device(container_path, host_path)
        config["linux"].setdefault("devices", []).append(device)
        config["linux"]["resources"].setdefault("devices", []).append(
            {"allow": True, "type": device["type"], "major": device["major"], "minor": device["minor"],
             "access": permissions or "rwm"})
    return config


def groups(spec: ContainerSpec, user: User) -> list[int]:
    """The supplementary groups: the image's /etc/group entries for the user and the pod's."""
    return sorted(set(user.additional_gids) | set(spec.supplemental_groups))


def _process(spec: ContainerSpec, args: list[str], env: list[str], cwd: str, user: User) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    extra = groups(spec, user)
    return {
        "terminal": spec.tty,
        "user": {"uid": user.uid, "gid": user.gid, **({"additionalGids": extra} if extra else {})},
        "args": args,
        "env": env,
        "cwd": cwd,
        "capabilities": capabilities(spec, user.uid),
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": min(soft, hard)}],
        "noNewPrivileges": spec.no_new_privs,
    }


def _privileged(config: dict) -> None:
    """What kubelet's privileged means (as runc under containerd or CRI-O gives it): nothing
    masked or read-only below /proc and /sys, sysfs writable, every host device. Capabilities
    and seccomp are the callers'."""
    linux = config["linux"]
    linux["maskedPaths"], linux["readonlyPaths"] = [], []
    for m in config["mounts"]:
        if m["type"] in ("sysfs", "cgroup"):
            m["options"] = [o for o in m["options"] if o != "ro"] + ["rw"]
    linux["devices"] = host_devices()
    linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]


def host_devices() -> list[dict]:
    """Every character and block device directly below the host's /dev (not pts, shm, mqueue:
    the container has its own), as linux.devices entries."""
    import stat

    found = []
    for name in sorted(os.listdir("/dev")):
        path = os.path.join("/dev", name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) and name not in ("console", "ptmx", "tty"):
            found.append(_device(path, path, st))
    return found


def environment(image_env: list[str], spec: ContainerSpec, hostname: str) -> list[str]:
    """The image's env, then HOSTNAME, then the request's (later keys replace earlier ones)."""
    out: dict[str, str] = {}
    for item in [DEFAULT_PATH, *image_env, f"HOSTNAME={hostname}", *(f"{k}={v}" for k, v in spec.envs)]:
        out[item.partition("=")[0]] = item
    return list(out.values())


def _mounts(spec: ContainerSpec, pod_dir: str) -> list[dict]:
    mounts = [m for m in standard_mounts() if m["destination"] != "/dev/shm"]
    mounts.append({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={SHM_SIZE}"]})
    wanted = {m.container_path for m in spec.mounts}
    for name in ("hosts", "hostname", "resolv.conf"):  # kubelet's own mounts of these win
        if f"/etc/{name}" not in wanted:
            mounts.append({"destination": f"/etc/{name}", "type": "bind",
                           "source": os.path.join(pod_dir, name),
                           "options": ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"]})
    for i, m in enumerate(spec.mounts):
        where = f"config.mounts[{i}]"
        if not os.path.isabs(m.container_path) or not os.path.isabs(m.host_path):
            raise SpecError("container_path and host_path must be absolute", where=where)
        if not os.path.exists(m.host_path):
            os.makedirs(m.host_path, mode=0o755, exist_ok=True)  # as containerd does
        options = ["rbind", PROPAGATION.get(m.propagation, "rprivate")]
        if m.readonly:
            options.append("ro")
        if m.recursive_read_only:
            if not m.readonly or m.propagation != "private":
                raise SpecError("recursive_read_only needs readonly and private propagation", where=where)
            options.append("rro")
        mounts.append({"destination": m.container_path, "type": "bind", "source": m.host_path,
                       "options": options})
    return mounts


def resources(spec: ContainerSpec) -> dict:
    """linux.resources of the OCI config (and of an UpdateContainerResources)."""
    res: dict = {}
    cpu = {k: v for k, v in (("shares", spec.cpu_shares), ("quota", spec.cpu_quota),
                             ("period", spec.cpu_period)) if v}
    if spec.cpuset_cpus:
        cpu["cpus"] = spec.cpuset_cpus
    if spec.cpuset_mems:
        cpu["mems"] = spec.cpuset_mems
    if cpu:
        res["cpu"] = cpu
    if spec.memory_limit:
        res["memory"] = {"limit": spec.memory_limit, "swap": spec.memory_limit}
    return res


def _within(res: dict, pod: Pod) -> dict:
    """On a hybrid host a process outside a v1 controller's hierarchy escapes every limit in it:
    a container of a pod with a memory or CPU limit joins those controllers (unlimited itself),
    so that the pod's cgroup above it holds it."""
    if pod.spec.get("memory_limit") and "memory" not in res:
        res["memory"] = {"limit": -1}
    if (pod.spec.get("cpu_quota") or pod.spec.get("cpu_shares")) and "cpu" not in res:
        res["cpu"] = {"shares": 1024}
    return res


def _oom_score_adj(wanted: int) -> int:
    """No lower than our own: lowering it needs CAP_SYS_RESOURCE, which a node may not give
    (containerd's restrict_oom_score_adj)."""
    try:
        with open("/proc/self/oom_score_adj") as f:
            own = int(f.read())
    except (OSError, ValueError):
        own = 0
    return max(wanted, own)


def _device(container_path: str, host_path: str, st: os.stat_result | None = None) -> dict:
    """linux.devices entry for the host device HOST_PATH (one stat: type, numbers, mode)."""
    import stat

    st = st or _stat(host_path)
    return {"path": container_path, "type": "c" if stat.S_ISCHR(st.st_mode) else "b",
            "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev),
            "fileMode": stat.S_IMODE(st.st_mode), "uid": 0, "gid": 0}


def _stat(host_path: str) -> os.stat_result:
    import stat

    try:
        st = os.stat(host_path)
    except OSError as exc:
        raise SpecError(f"device {host_path}: {exc.strerror}", where="config.devices") from None
    if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SpecError(f"{host_path} is not a device", where="config.devices")
    return st
