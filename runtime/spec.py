"""OCI runtime-spec 1.x config.json -> plain records (runtime._lite.dataclasses), every field validated.

Every refusal is a SpecError whose `where` is the JSON path of the offending field
(`config.json: linux.namespaces[2].type`). Unknown properties are ignored as the spec requires;
known properties this runtime cannot honour are refused, never dropped in silence.
This module is on the container start path: it imports os and the stand-ins in runtime._lite only.
"""

from __future__ import annotations

import os

from . import linux
from ._lite import json as jsonlite
from ._lite.dataclasses import dataclass, field
from .errors import SpecError
from .linux import CAPABILITIES, RLIM_INFINITY, RLIMITS, sysctl_path  # noqa: F401 - re-exported

TYPE_CHECKING = False  # typing is a slow import on the start path (bench/README.md)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

# ---------------------------------------------------------------------------------------------
# What this runtime supports (reported by the coordinator's `features` command)
# ---------------------------------------------------------------------------------------------

NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
PERSONALITY_DOMAINS = {"LINUX": 0x0000, "LINUX32": 0x0008}  # personality(2) PER_LINUX, PER_LINUX32
TIME_CLOCKS = ("monotonic", "boottime")

# option -> (flag, True to set / False to clear)
MOUNT_FLAGS: dict[str, tuple[int, bool]] = {
    "defaults": (0, True),
    "ro": (linux.MS_RDONLY, True),
    "rw": (linux.MS_RDONLY, False),
    "nosuid": (linux.MS_NOSUID, True),
    "suid": (linux.MS_NOSUID, False),
    "nodev": (linux.MS_NODEV, True),
    "dev": (linux.MS_NODEV, False),
    "noexec": (linux.MS_NOEXEC, True),
    "exec": (linux.MS_NOEXEC, False),
    "sync": (linux.MS_SYNCHRONOUS, True),
    "async": (linux.MS_SYNCHRONOUS, False),
    "dirsync": (linux.MS_DIRSYNC, True),
    "remount": (linux.MS_REMOUNT, True),
    "mand": (linux.MS_MANDLOCK, True),
    "nomand": (linux.MS_MANDLOCK, False),
    "noatime": (linux.MS_NOATIME, True),
    "atime": (linux.MS_NOATIME, False),
    "nodiratime": (linux.MS_NODIRATIME, True),
    "diratime": (linux.MS_NODIRATIME, False),
    "relatime": (linux.MS_RELATIME, True),
    "norelatime": (linux.MS_RELATIME, False),
    "strictatime": (linux.MS_STRICTATIME, True),
    "nostrictatime": (linux.MS_STRICTATIME, False),
    "lazytime": (linux.MS_LAZYTIME, True),
    "nolazytime": (linux.MS_LAZYTIME, False),
    "silent": (linux.MS_SILENT, True),
    "loud": (linux.MS_SILENT, False),
    "iversion": (linux.MS_I_VERSION, True),
    "noiversion": (linux.MS_I_VERSION, False),
    "nosymfollow": (linux.MS_NOSYMFOLLOW, True),
    "symfollow": (linux.MS_NOSYMFOLLOW, False),
    "bind": (linux.MS_BIND, True),
    "rbind": (linux.MS_BIND | linux.MS_REC, True),
}

MOUNT_PROPAGATION = {
    "private": linux.MS_PRIVATE,
    "rprivate": linux.MS_PRIVATE | linux.MS_REC,
    "shared": linux.MS_SHARED,
    "rshared": linux.MS_SHARED | linux.MS_REC,
    "slave": linux.MS_SLAVE,
    "rslave": linux.MS_SLAVE | linux.MS_REC,
    "unbindable": linux.MS_UNBINDABLE,
    "runbindable": linux.MS_UNBINDABLE | linux.MS_REC,
}

# Filesystem-specific data options (passed through as mount data) per mount type.
MOUNT_DATA_OPTIONS: dict[str, tuple[str, ...]] = {
    "bind": (),
    "proc": ("hidepid", "gid", "subset"),
    "sysfs": (),
    "tmpfs": (
        "size",
        "nr_blocks",
        "nr_inodes",
        "mode",
        "uid",
        "gid",
        "huge",
        "mpol",
        "inode32",
        "inode64",
        "noswap",
    ),
    "devpts": ("newinstance", "ptmxmode", "mode", "gid", "uid", "max"),
    "mqueue": (),
    "cgroup": (),
    "cgroup2": ("nsdelegate", "memory_recursiveprot"),
}
MOUNT_TYPES = tuple(MOUNT_DATA_OPTIONS)
_ANY_DATA_OPTION = frozenset(o for opts in MOUNT_DATA_OPTIONS.values() for o in opts)

# Known OCI/runc option extensions that this runtime does not implement: refused by name.
_UNSUPPORTED_MOUNT_OPTIONS = {
    "idmap": "idmapped mounts are not supported",
    "ridmap": "idmapped mounts are not supported",
    "tmpcopyup": "tmpcopyup is not supported",
}

HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")

# Sysctls that are namespaced, and the namespace that must be private to set them (as runc decides).
_SYSCTL_IPC = {
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
}
_SYSCTL_UTS = {"kernel.hostname", "kernel.domainname"}

ROOTFS_PROPAGATION = tuple(MOUNT_PROPAGATION)

OCI_VERSION_MIN, OCI_VERSION_MAX = "1.0.0", "1.2.1"

SUPPORTED: dict[str, Any] = {
    "ociVersionMin": OCI_VERSION_MIN,
    "ociVersionMax": OCI_VERSION_MAX,
    "hooks": list(HOOK_KINDS),
    "mountOptions": sorted(set(MOUNT_FLAGS) | set(MOUNT_PROPAGATION)),
    "mountTypes": list(MOUNT_TYPES),
    "namespaces": list(NAMESPACES),
    "capabilities": list(CAPABILITIES),
    "rlimits": list(RLIMITS),
    "sysctl": sorted(_SYSCTL_IPC | _SYSCTL_UTS) + ["fs.mqueue.*", "net.*"],
}

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] = field(default_factory=list)


@dataclass
class Capabilities:
    """Capability names (CAP_*). A missing `process.capabilities` means all sets empty."""

    bounding: list[str] = field(default_factory=list)
    effective: list[str] = field(default_factory=list)
    permitted: list[str] = field(default_factory=list)
    inheritable: list[str] = field(default_factory=list)
    ambient: list[str] = field(default_factory=list)


@dataclass
class Rlimit:
    type: str
    soft: int
    hard: int


@dataclass
class ConsoleSize:
    height: int
    width: int


@dataclass
class Process:
    args: list[str]
    cwd: str = "/"
    env: list[str] = field(default_factory=list)
    terminal: bool = False
    console_size: ConsoleSize | None = None
    user: User = field(default_factory=User)
    capabilities: Capabilities = field(default_factory=Capabilities)
    rlimits: list[Rlimit] = field(default_factory=list)
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    apparmor_profile: str = ""
    selinux_label: str = ""


@dataclass
class Root:
    path: str
    readonly: bool = False


@dataclass
class Mount:
    destination: str
    type: str  # normalised: "bind" for bind/rbind mounts whatever the JSON said
    source: str = ""
    options: list[str] = field(default_factory=list)
    # derived from options
    flags: int = 0  # MS_* to pass to mount(2) (MS_BIND|MS_REC for rbind)
    propagation: list[int] = field(default_factory=list)  # MS_SHARED/... applied after mounting
    data: str = ""  # filesystem-specific options joined by ","
    ignored: list[str] = field(default_factory=list)  # data options of a bind mount (runc ignores them)


@dataclass
class Hook:
    path: str
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    timeout: int | None = None


@dataclass
class Hooks:
    prestart: list[Hook] = field(default_factory=list)
    create_runtime: list[Hook] = field(default_factory=list)
    create_container: list[Hook] = field(default_factory=list)
    start_container: list[Hook] = field(default_factory=list)
    poststart: list[Hook] = field(default_factory=list)
    poststop: list[Hook] = field(default_factory=list)


@dataclass
class Namespace:
    type: str
    path: str = ""


@dataclass
class IDMapping:
    container_id: int
    host_id: int
    size: int


@dataclass
class Device:
    path: str
    type: str  # c, b, u or p
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@dataclass
class Linux:
    namespaces: list[Namespace] = field(default_factory=list)
    uid_mappings: list[IDMapping] = field(default_factory=list)
    gid_mappings: list[IDMapping] = field(default_factory=list)
    devices: list[Device] = field(default_factory=list)
    cgroups_path: str = ""
    resources: Any = None  # runtime.resources.Resources, or the raw dict if that module is absent
    sysctl: dict[str, str] = field(default_factory=dict)
    seccomp: dict | None = None  # raw OCI LinuxSeccomp, compiled by runtime.seccomp
    rootfs_propagation: str = ""
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    personality: int | None = None  # personality(2) domain (PER_LINUX or PER_LINUX32)
    time_offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # clock -> (secs, nanosecs)

    def namespace(self, ns_type: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == ns_type:
                return ns
        return None


@dataclass
class Spec:
    oci_version: str
    process: Process
    root: Root
    hostname: str = ""
    domainname: str = ""
    mounts: list[Mount] = field(default_factory=list)
    hooks: Hooks = field(default_factory=Hooks)
    annotations: dict[str, str] = field(default_factory=dict)
    linux: Linux = field(default_factory=Linux)
    raw: dict | None = field(default=None, repr=False, compare=False)  # the JSON object it came from

    def rootfs(self, bundle: str | Path) -> str:
        """Absolute rootfs path: root.path is relative to the bundle unless absolute."""
        return os.path.realpath(os.path.join(bundle, self.root.path))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_bundle(bundle: str | Path) -> Spec:
    """Read and validate `bundle/config.json`; also checks the rootfs exists."""
    bundle = os.fspath(bundle)
    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise SpecError(
            "no config.json in the bundle", where=str(bundle), hint="create one, e.g. with `runc spec`"
        ) from None
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", where=path) from None
    try:
        data = jsonlite.loads(text)
    except ValueError as exc:  # json.JSONDecodeError
        msg, line, col = getattr(exc, "msg", str(exc)), getattr(exc, "lineno", 0), getattr(exc, "colno", 0)
        raise SpecError(f"invalid JSON: {msg}", where=f"config.json:{line}:{col}") from None
    _check_username(data, bundle)
    spec = parse_spec(data, "config.json")
    rootfs = spec.rootfs(bundle)
    if not os.path.isdir(rootfs):
        raise SpecError(
            f"rootfs {rootfs!r} is not a directory",
            where="config.json: root.path",
            hint="root.path is relative to the bundle directory",
        )
    return spec


def parse_spec(d: Any, where: str = "config.json") -> Spec:
    top = _obj(d, where)
    for platform in ("windows", "solaris", "vm", "zos"):
        if top.get(platform) is not None:
            raise SpecError(
                f"{platform!r} configuration is not supported by this Linux runtime",
                where=_at(where, platform),
            )
    version = _str(_required(top, "ociVersion", where), _at(where, "ociVersion"))
    if not version.startswith("1."):
        raise SpecError(
            f"unsupported OCI version {version!r}",
            where=_at(where, "ociVersion"),
            hint=f"this runtime implements {OCI_VERSION_MIN} to {OCI_VERSION_MAX}",
        )
    process = parse_process(_required(top, "process", where), _at(where, "process"))
    root_d = _obj(_required(top, "root", where), _at(where, "root"))
    root = Root(
        path=_nonempty_str(_required(root_d, "path", _at(where, "root")), _at(where, "root.path")),
        readonly=_bool(root_d.get("readonly", False), _at(where, "root.readonly")),
    )
    linux = _parse_linux(top.get("linux") or {}, _at(where, "linux"))
    spec = Spec(
        oci_version=version,
        process=process,
        root=root,
        hostname=_str(top.get("hostname", ""), _at(where, "hostname")),
        domainname=_str(top.get("domainname", ""), _at(where, "domainname")),
        mounts=[
            _parse_mount(m, _at(where, f"mounts[{i}]"))
            for i, m in enumerate(_list(top.get("mounts"), _at(where, "mounts")))
        ],
        hooks=_parse_hooks(top.get("hooks") or {}, _at(where, "hooks")),
        annotations=_str_map(top.get("annotations"), _at(where, "annotations")),
        linux=linux,
        raw=top,
    )
    _check_consistency(spec, where)
    return spec


def ignored_fields(spec: Spec) -> list[str]:
    """Deprecated or no-op settings runc accepts without effect: accepted here too, and reported
    (the CLIs write these lines to the log). Anything that would weaken confinement is refused
    while parsing instead."""
    notes = [
        f"mounts[{i}] ({m.destination}): data option(s) {', '.join(m.ignored)} ignored on a bind mount"
        for i, m in enumerate(spec.mounts)
        if m.ignored
    ]
    memory = getattr(spec.linux.resources, "memory", None)
    for name, attr in (("kernel", "kernel"), ("kernelTCP", "kernel_tcp")):
        if getattr(memory, attr, None) is not None:
            notes.append(f"linux.resources.memory.{name} ignored: deprecated, kernel memory is "
                         "accounted in the memory limit")
    return notes


def parse_process(d: Any, where: str = "process") -> Process:
    p = _obj(d, where)
    for key, why in (
        ("commandLine", "is Windows-only"),
        ("scheduler", "is not supported"),
        ("ioPriority", "is not supported"),
        ("execCPUAffinity", "is not supported"),
    ):
        if p.get(key) is not None:
            raise SpecError(f"{key} {why} by this runtime", where=_at(where, key))
    args = _str_list(_required(p, "args", where), _at(where, "args"))
    if not args:
        raise SpecError("must name the program to run", where=_at(where, "args"))
    cwd = _str(p.get("cwd", "/"), _at(where, "cwd"))
    if not cwd.startswith("/"):
        raise SpecError(f"cwd {cwd!r} must be an absolute path", where=_at(where, "cwd"))
    env = _str_list(p.get("env"), _at(where, "env"))
    for i, item in enumerate(env):
        if "=" not in item:
            raise SpecError(f"{item!r} is not KEY=VALUE", where=_at(where, f"env[{i}]"))
    console = None
    if p.get("consoleSize") is not None:
        c = _obj(p["consoleSize"], _at(where, "consoleSize"))
        console = ConsoleSize(
            _uint(c.get("height", 0), _at(where, "consoleSize.height"), 65535),
            _uint(c.get("width", 0), _at(where, "consoleSize.width"), 65535),
        )
    oom = p.get("oomScoreAdj")
    if oom is not None:
        oom = _int(oom, _at(where, "oomScoreAdj"))
        if not -1000 <= oom <= 1000:
            raise SpecError(f"{oom} is outside -1000..1000", where=_at(where, "oomScoreAdj"))
    apparmor = _str(p.get("apparmorProfile", ""), _at(where, "apparmorProfile"))
    if apparmor and not apparmor_enabled():
        raise SpecError(
            f"AppArmor profile {apparmor!r} requested but AppArmor is not enabled on this host",
            where=_at(where, "apparmorProfile"),
            hint="remove the field or enable AppArmor",
        )
    selinux = _str(p.get("selinuxLabel", ""), _at(where, "selinuxLabel"))
    if selinux:
        raise SpecError(
            "SELinux labels are not supported (SELinux is not enabled on this host)",
            where=_at(where, "selinuxLabel"),
            hint="remove the field",
        )
    process = Process(
        args=args,
        cwd=cwd,
        env=env,
        terminal=_bool(p.get("terminal", False), _at(where, "terminal")),
        console_size=console,
        user=_parse_user(p.get("user") or {}, _at(where, "user")),
        capabilities=_parse_caps(p.get("capabilities"), _at(where, "capabilities")),
        rlimits=_parse_rlimits(p.get("rlimits"), _at(where, "rlimits")),
        no_new_privileges=_bool(p.get("noNewPrivileges", False), _at(where, "noNewPrivileges")),
        oom_score_adj=oom,
        apparmor_profile=apparmor,
        selinux_label=selinux,
    )
    _check_ambient(process, _at(where, "capabilities"))
    return process


def _check_username(data: Any, bundle: str) -> None:
    """`process.user.username` is Windows-only; say which numeric ids to use instead."""
    try:
        name = data["process"]["user"]["username"]
        rootfs = os.path.join(bundle, data["root"]["path"])
    except (KeyError, TypeError):
        return
    if name is None:
        return
    where = "config.json: process.user"
    entry = _passwd_entry(rootfs, str(name))
    if entry is None:
        raise SpecError(
            f"user {name!r} does not exist in the rootfs /etc/passwd (and username is Windows-only)",
            where=_at(where, "username"),
            hint="set numeric process.user.uid and gid",
        )
    raise SpecError(
        "username is Windows-only",
        where=_at(where, "username"),
        hint=f'use "uid": {entry[0]}, "gid": {entry[1]} (from the rootfs /etc/passwd)',
    )


def apparmor_enabled() -> bool:
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _parse_user(d: Any, where: str) -> User:
    u = _obj(d, where)
    if u.get("username") is not None:
        raise SpecError(
            "username is Windows-only",
            where=_at(where, "username"),
            hint="set numeric process.user.uid and gid",
        )
    umask = u.get("umask")
    if umask is not None:
        umask = _uint(umask, _at(where, "umask"), 0o777)
    return User(
        uid=_uint(u.get("uid", 0), _at(where, "uid"), 2**32 - 2),
        gid=_uint(u.get("gid", 0), _at(where, "gid"), 2**32 - 2),
        umask=umask,
        additional_gids=[
            _uint(g, _at(where, f"additionalGids[{i}]"), 2**32 - 2)
            for i, g in enumerate(_list(u.get("additionalGids"), _at(where, "additionalGids")))
        ],
    )


def _parse_caps(d: Any, where: str) -> Capabilities:
    if d is None:
        return Capabilities()
    c = _obj(d, where)
    sets = {}
    for name in ("bounding", "effective", "permitted", "inheritable", "ambient"):
        caps = _str_list(c.get(name), _at(where, name))
        for i, cap in enumerate(caps):
            if cap not in CAPABILITIES:
                raise SpecError(
                    f"unknown capability {cap!r}",
                    where=_at(where, f"{name}[{i}]"),
                    hint="names look like CAP_NET_BIND_SERVICE",
                )
        sets[name] = caps
    caps = Capabilities(**sets)
    missing = set(caps.effective) - set(caps.permitted)
    if missing:
        raise SpecError(
            f"effective capabilities {sorted(missing)} are not in the permitted set",
            where=_at(where, "effective"),
            hint="the kernel requires effective to be a subset of permitted",
        )
    return caps


def _check_ambient(process: Process, where: str) -> None:
    """The kernel raises an ambient capability only if it is permitted and inheritable. For uid 0 the
    ambient set is moot (execve gives root the bounding set), so runc-style configs that list ambient
    without inheritable are accepted there; for any other user the capability would be missing."""
    caps = process.capabilities
    missing = set(caps.ambient) - (set(caps.permitted) & set(caps.inheritable))
    if missing and process.user.uid != 0:
        raise SpecError(
            f"ambient capabilities {sorted(missing)} are not both permitted and inheritable",
            where=_at(where, "ambient"),
            hint="the kernel can only raise an ambient capability that is permitted and inheritable",
        )


def _parse_rlimits(d: Any, where: str) -> list[Rlimit]:
    out, seen = [], set()
    for i, item in enumerate(_list(d, where)):
        here = f"{where}[{i}]"
        r = _obj(item, here)
        kind = _str(_required(r, "type", here), _at(here, "type"))
        if kind not in RLIMITS:
            raise SpecError(
                f"unknown rlimit {kind!r}", where=_at(here, "type"), hint="use one of: " + ", ".join(RLIMITS)
            )
        if kind in seen:
            raise SpecError(f"rlimit {kind} given twice", where=_at(here, "type"))
        seen.add(kind)
        soft = _uint(_required(r, "soft", here), _at(here, "soft"), RLIM_INFINITY)
        hard = _uint(_required(r, "hard", here), _at(here, "hard"), RLIM_INFINITY)
        if soft > hard:
            raise SpecError(f"soft limit {soft} is above hard limit {hard}", where=_at(here, "soft"))
        out.append(Rlimit(kind, soft, hard))
    return out


def _parse_mount(d: Any, where: str) -> Mount:
    m = _obj(d, where)
    dest = _nonempty_str(_required(m, "destination", where), _at(where, "destination"))
    if not dest.startswith("/") or dest.rstrip("/") == "" or "\0" in dest:
        raise SpecError(
            f"destination {dest!r} must be an absolute path other than /", where=_at(where, "destination")
        )
    for key in ("uidMappings", "gidMappings"):
        if m.get(key):
            raise SpecError(
                "idmapped mounts are not supported", where=_at(where, key), hint="remove the field"
            )
    options = _str_list(m.get("options"), _at(where, "options"))
    kind = _str(m.get("type", ""), _at(where, "type"))
    is_bind = "bind" in options or "rbind" in options
    if kind == "bind" or (kind in ("", "none") and is_bind):
        kind = "bind"
    elif kind not in MOUNT_TYPES or is_bind:
        if kind in ("", "none"):
            raise SpecError(
                "a mount without a type must be a bind mount",
                where=_at(where, "type"),
                hint='add "bind" or "rbind" to options, or give a type',
            )
        if is_bind:
            raise SpecError(
                f"type {kind!r} cannot be combined with a bind option", where=_at(where, "options")
            )
        raise SpecError(
            f"unknown mount type {kind!r}",
            where=_at(where, "type"),
            hint="use one of: " + ", ".join(MOUNT_TYPES),
        )
    source = _str(m.get("source", ""), _at(where, "source"))
    if kind == "bind" and not source:
        raise SpecError("a bind mount needs a source", where=_at(where, "source"))
    flags, propagation, data, ignored = 0, [], [], []
    if kind == "bind":
        flags |= linux.MS_BIND
    allowed_data = MOUNT_DATA_OPTIONS[kind]
    for i, opt in enumerate(options):
        here = _at(where, f"options[{i}]")
        if opt in MOUNT_FLAGS:
            bit, on = MOUNT_FLAGS[opt]
            flags = flags | bit if on else flags & ~bit
        elif opt in MOUNT_PROPAGATION:
            propagation.append(MOUNT_PROPAGATION[opt])
        elif opt in _UNSUPPORTED_MOUNT_OPTIONS:
            raise SpecError(f"option {opt!r}: {_UNSUPPORTED_MOUNT_OPTIONS[opt]}", where=here)
        elif opt.split("=", 1)[0] in allowed_data:
            data.append(opt)
        elif kind == "bind" and ("=" in opt or opt in _ANY_DATA_OPTION):
            ignored.append(opt)  # the kernel ignores data on a bind mount; runc passes it along
        else:
            hint = f"{kind} data options: {', '.join(allowed_data)}" if allowed_data else "see `features`"
            raise SpecError(f"unknown mount option {opt!r} for a {kind} mount", where=here, hint=hint)
    if flags & linux.MS_REMOUNT:
        raise SpecError("remount is not allowed in a container mount", where=_at(where, "options"))
    return Mount(
        destination=dest,
        type=kind,
        source=source,
        options=options,
        flags=flags,
        propagation=propagation,
        data=",".join(data),
        ignored=ignored,
    )


def _parse_hooks(d: Any, where: str) -> Hooks:
    h = _obj(d, where)
    hooks = Hooks()
    attr = {
        "createRuntime": "create_runtime",
        "createContainer": "create_container",
        "startContainer": "start_container",
    }
    for kind in HOOK_KINDS:
        items = []
        for i, item in enumerate(_list(h.get(kind), _at(where, kind))):
            here = f"{_at(where, kind)}[{i}]"
            x = _obj(item, here)
            path = _nonempty_str(_required(x, "path", here), _at(here, "path"))
            if not path.startswith("/"):
                raise SpecError(f"hook path {path!r} must be absolute", where=_at(here, "path"))
            timeout = x.get("timeout")
            if timeout is not None:
                timeout = _int(timeout, _at(here, "timeout"))
                if timeout <= 0:
                    raise SpecError("timeout must be greater than zero", where=_at(here, "timeout"))
            items.append(
                Hook(
                    path,
                    _str_list(x.get("args"), _at(here, "args")),
                    _str_list(x.get("env"), _at(here, "env")),
                    timeout,
                )
            )
        setattr(hooks, attr.get(kind, kind), items)
    return hooks


def _parse_linux(d: Any, where: str) -> Linux:
    x = _obj(d, where)
    for key, why in (
        ("mountLabel", "SELinux mount labels are not supported"),
        ("intelRdt", "Intel RDT is not supported"),
        ("netDevices", "moving network devices is not supported"),
        ("memoryPolicy", "memory policies are not supported"),
    ):
        if x.get(key):
            raise SpecError(why, where=_at(where, key), hint="remove the field")
    namespaces, seen = [], set()
    for i, item in enumerate(_list(x.get("namespaces"), _at(where, "namespaces"))):
        here = f"{_at(where, 'namespaces')}[{i}]"
        n = _obj(item, here)
        kind = _str(_required(n, "type", here), _at(here, "type"))
        if kind not in NAMESPACES:
            raise SpecError(
                f"unknown namespace {kind!r}",
                where=_at(here, "type"),
                hint="use one of: " + ", ".join(NAMESPACES),
            )
        if kind in seen:
            raise SpecError(f"namespace {kind!r} given twice", where=_at(here, "type"))
        seen.add(kind)
        path = _str(n.get("path", ""), _at(here, "path"))
        if path and not path.startswith("/"):
            raise SpecError(f"namespace path {path!r} must be absolute", where=_at(here, "path"))
        namespaces.append(Namespace(kind, path))
    resources = x.get("resources")
    if resources is not None:
        resources = _parse_resources(_obj(resources, _at(where, "resources")), _at(where, "resources"))
    seccomp = x.get("seccomp")
    if seccomp is not None:
        seccomp = _obj(seccomp, _at(where, "seccomp"))
    prop = _str(x.get("rootfsPropagation", ""), _at(where, "rootfsPropagation"))
    if prop and prop not in ROOTFS_PROPAGATION:
        raise SpecError(
            f"unknown propagation {prop!r}",
            where=_at(where, "rootfsPropagation"),
            hint="use one of: " + ", ".join(ROOTFS_PROPAGATION),
        )
    return Linux(
        namespaces=namespaces,
        uid_mappings=_parse_idmaps(x.get("uidMappings"), _at(where, "uidMappings")),
        gid_mappings=_parse_idmaps(x.get("gidMappings"), _at(where, "gidMappings")),
        devices=[
            _parse_device(v, f"{_at(where, 'devices')}[{i}]")
            for i, v in enumerate(_list(x.get("devices"), _at(where, "devices")))
        ],
        cgroups_path=_str(x.get("cgroupsPath", ""), _at(where, "cgroupsPath")),
        resources=resources,
        sysctl=_str_map(x.get("sysctl"), _at(where, "sysctl")),
        seccomp=seccomp,
        rootfs_propagation=prop,
        masked_paths=_abs_paths(x.get("maskedPaths"), _at(where, "maskedPaths")),
        readonly_paths=_abs_paths(x.get("readonlyPaths"), _at(where, "readonlyPaths")),
        personality=_parse_personality(x.get("personality"), _at(where, "personality")),
        time_offsets=_parse_time_offsets(x.get("timeOffsets"), _at(where, "timeOffsets")),
    )


def _parse_personality(d: Any, where: str) -> int | None:
    if d is None:
        return None
    p = _obj(d, where)
    domain = _str(_required(p, "domain", where), _at(where, "domain"))
    if domain not in PERSONALITY_DOMAINS:
        raise SpecError(
            f"unknown personality domain {domain!r}",
            where=_at(where, "domain"),
            hint="use one of: " + ", ".join(PERSONALITY_DOMAINS),
        )
    if _str_list(p.get("flags"), _at(where, "flags")):
        raise SpecError("personality flags are not supported", where=_at(where, "flags"), hint="remove them")
    return PERSONALITY_DOMAINS[domain]


def _parse_time_offsets(d: Any, where: str) -> dict[str, tuple[int, int]]:
    out = {}
    for clock, value in _obj(d if d is not None else {}, where).items():
        here = _at(where, clock)
        if clock not in TIME_CLOCKS:
            raise SpecError(f"unknown clock {clock!r}", where=here, hint="use monotonic or boottime")
        v = _obj(value, here)
        secs = _int(v.get("secs", 0), _at(here, "secs"))
        nanosecs = _uint(v.get("nanosecs", 0), _at(here, "nanosecs"), 999_999_999)
        out[clock] = (secs, nanosecs)
    return out


def _parse_resources(d: dict, where: str) -> Any:
    from .resources import Resources

    return Resources.from_oci(d, where)


def _parse_idmaps(d: Any, where: str) -> list[IDMapping]:
    out = []
    for i, item in enumerate(_list(d, where)):
        here = f"{where}[{i}]"
        m = _obj(item, here)
        size = _uint(_required(m, "size", here), _at(here, "size"), 2**32 - 1)
        if size == 0:
            raise SpecError("size must be at least 1", where=_at(here, "size"))
        out.append(
            IDMapping(
                _uint(_required(m, "containerID", here), _at(here, "containerID"), 2**32 - 2),
                _uint(_required(m, "hostID", here), _at(here, "hostID"), 2**32 - 2),
                size,
            )
        )
    if len(out) > 340:
        raise SpecError("the kernel accepts at most 340 mappings", where=where)
    return out


def _parse_device(d: Any, where: str) -> Device:
    x = _obj(d, where)
    path = _nonempty_str(_required(x, "path", where), _at(where, "path"))
    if not path.startswith("/dev/") or ".." in path.split("/"):
        raise SpecError(f"device path {path!r} must be under /dev", where=_at(where, "path"))
    kind = _str(_required(x, "type", where), _at(where, "type"))
    if kind not in linux.DEVICE_NODE_TYPES:
        raise SpecError(f"unknown device type {kind!r}", where=_at(where, "type"), hint="use c, b, u or p")
    major = minor = 0
    if kind != "p":
        major = _uint(_required(x, "major", where), _at(where, "major"), 2**32 - 1)
        minor = _uint(_required(x, "minor", where), _at(where, "minor"), 2**32 - 1)
    mode = x.get("fileMode")
    uid, gid = x.get("uid"), x.get("gid")
    return Device(
        path=path,
        type=kind,
        major=major,
        minor=minor,
        file_mode=None if mode is None else _uint(mode, _at(where, "fileMode"), 0o7777),
        uid=None if uid is None else _uint(uid, _at(where, "uid"), 2**32 - 2),
        gid=None if gid is None else _uint(gid, _at(where, "gid"), 2**32 - 2),
    )


def _check_consistency(spec: Spec, where: str) -> None:
    """Cross-field rules: things that only make sense together."""
    linux = spec.linux
    new = {ns.type for ns in linux.namespaces}
    userns = linux.namespace("user")
    if userns and not userns.path:
        for key, maps in (("uidMappings", linux.uid_mappings), ("gidMappings", linux.gid_mappings)):
            if not maps:
                raise SpecError(
                    "a new user namespace needs mappings",
                    where=_at(where, f"linux.{key}"),
                    hint="map at least container ID 0, e.g. to an unused host range",
                )
        for key, ident, maps in (
            ("uid", spec.process.user.uid, linux.uid_mappings),
            ("gid", spec.process.user.gid, linux.gid_mappings),
        ):
            if not any(m.container_id <= ident < m.container_id + m.size for m in maps):
                raise SpecError(
                    f"{key} {ident} is not mapped in the user namespace",
                    where=_at(where, f"process.user.{key}"),
                )
    elif linux.uid_mappings or linux.gid_mappings:
        raise SpecError(
            "ID mappings given without a new user namespace",
            where=_at(where, "linux.uidMappings" if linux.uid_mappings else "linux.gidMappings"),
            hint='add {"type": "user"} to linux.namespaces',
        )
    timens = linux.namespace("time")
    if linux.time_offsets and (timens is None or timens.path):
        raise SpecError(
            "timeOffsets need a new time namespace",
            where=_at(where, "linux.timeOffsets"),
            hint='add {"type": "time"} (without a path) to linux.namespaces',
        )
    if "mount" not in new:
        raise SpecError(
            "a mount namespace is required",
            where=_at(where, "linux.namespaces"),
            hint='add {"type": "mount"}',
        )
    if linux.namespace("mount").path:
        raise SpecError(
            "joining an existing mount namespace is not supported",
            where=_at(where, "linux.namespaces"),
            hint="let the runtime create one",
        )
    for key, value in (("hostname", spec.hostname), ("domainname", spec.domainname)):
        if value and "uts" not in new:
            raise SpecError(
                f"cannot set {key} without a private UTS namespace",
                where=_at(where, key),
                hint='add {"type": "uts"} to linux.namespaces',
            )
    for key in linux.sysctl:
        _check_sysctl(key, new, _at(where, f"linux.sysctl.{key}"))


def sysctl_namespace(key: str) -> str | None:
    """The namespace type a sysctl belongs to (ipc, uts, network), None when it is not namespaced."""
    dotted = key.replace("/", ".")
    if dotted in _SYSCTL_IPC or dotted.startswith("fs.mqueue."):
        return "ipc"
    if dotted in _SYSCTL_UTS:
        return "uts"
    if dotted.startswith("net."):
        return "network"
    return None


def _check_sysctl(key: str, namespaces: set[str], where: str) -> None:
    parts = key.replace("/", ".").split(".")
    if not key or any(p in ("", "..") for p in parts):
        raise SpecError(f"malformed sysctl {key!r}", where=where)
    need = sysctl_namespace(key)
    if need is None:
        raise SpecError(
            f"sysctl {key!r} is not namespaced: setting it would change the host",
            where=where,
            hint="only net.*, fs.mqueue.*, IPC kernel.* and kernel.hostname/domainname",
        )
    if need not in namespaces:
        raise SpecError(
            f"sysctl {key!r} needs a private {need} namespace",
            where=where,
            hint=f'add {{"type": "{need}"}} to linux.namespaces',
        )




def _passwd_entry(rootfs: str, name: str) -> tuple[int, int] | None:
    """NAME's ids in the bundle's /etc/passwd, read beneath the rootfs (a symlinked passwd in a
    hostile bundle must not make the runtime read, and quote, a host file)."""
    from .images.passwd import resolve

    try:
        user = resolve(rootfs, name)
    except SpecError:
        return None
    return (user.uid, user.gid) if user.name == name else None


# ---------------------------------------------------------------------------------------------
# Typed accessors: each names the JSON path when the value is the wrong type
# ---------------------------------------------------------------------------------------------


def _at(where: str, key: str) -> str:
    if not where:
        return key
    if where.endswith(".json") or where.endswith(":"):
        return f"{where.rstrip(':')}: {key}"
    return f"{where}.{key}"


def _type_error(value: Any, expected: str, where: str) -> SpecError:
    got = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    return SpecError(f"expected {expected}, got {got}", where=where)


def _required(d: dict, key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise SpecError(f"missing required field {key!r}", where=_at(where, key))
    return d[key]


def _obj(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise _type_error(v, "an object", where)
    return v


def _list(v: Any, where: str) -> list:
    if v is None:
        return []
    if not isinstance(v, list):
        raise _type_error(v, "an array", where)
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _type_error(v, "a string", where)
    return v


def _nonempty_str(v: Any, where: str) -> str:
    if not _str(v, where):
        raise SpecError("must not be empty", where=where)
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise _type_error(v, "true or false", where)
    return v


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(v, "an integer", where)
    return v


def _uint(v: Any, where: str, maximum: int) -> int:
    n = _int(v, where)
    if not 0 <= n <= maximum:
        raise SpecError(f"{n} is outside 0..{maximum}", where=where)
    return n


def _str_list(v: Any, where: str) -> list[str]:
    return [_str(item, f"{where}[{i}]") for i, item in enumerate(_list(v, where))]


def _str_map(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    return {k: _str(item, _at(where, k)) for k, item in _obj(v, where).items()}


def _abs_paths(v: Any, where: str) -> list[str]:
    paths = _str_list(v, where)
    for i, p in enumerate(paths):
        if not p.startswith("/"):
            raise SpecError(f"{p!r} must be an absolute path", where=f"{where}[{i}]")
    return paths


__all__ = [
    "Capabilities",
    "ConsoleSize",
    "Device",
    "Hook",
    "Hooks",
    "IDMapping",
    "Linux",
    "Mount",
    "Namespace",
    "Process",
    "Rlimit",
    "Root",
    "Spec",
    "User",
    "SUPPORTED",
    "load_bundle",
    "parse_process",
    "parse_spec",
    "sysctl_namespace",
    "sysctl_path",
]
