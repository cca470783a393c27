"""Containers of pods as a library: each on its image's overlay root, created by Debian's conmon
(one per container, as CRI-O runs it) through `stockade-oci`, which then holds the container's
stdio, writes the CRI log and keeps the exit code in a file. Start, signals and delete go
through the runtime library in this process; exec through `stockade-oci exec` (a fresh process:
joining a user namespace needs a single-threaded caller).

    <state_dir>/containers/<id>/container.json   the record ("creating" until conmon reported)
    <state_dir>/containers/<id>/bundle/           config.json, conmon's ctl fifo, the runtime's log
    <state_dir>/oci/                             the runtime's state (stockade-oci --root)
    <state_dir>/exits/<id>                       the exit code, written by conmon
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from stockade.runtime import container as oci
from stockade.runtime._lite import json
from stockade.runtime._lite.dataclasses import asdict, dataclass, field
from stockade.runtime.bpfpolicy import NETWORK_REFUSES_ANNOTATION
from stockade.runtime.errors import ContainerError, SpecError, StockadeError
from stockade.runtime.files import write_atomic
from stockade.runtime.images import passwd
from stockade.runtime.images.rootfs import container_dir, mount_root, unmount_root
from stockade.runtime.spec import IDMapping
from stockade.runtime.state import remove_tree

from . import bundle as bundlemod
from . import events, remotecommand
from .errors import AlreadyExists, NotFound, Timeout
from .netrules import refused_always
from .pods import READY
from .records import Records

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from stockade.runtime.images.store import Image, Store

    from .config import Config, Handler
    from .pods import Pod, Pods

CREATING, CREATED, RUNNING, EXITED = "creating", "created", "running", "exited"
OCI_BIN = os.path.join(os.path.dirname(sys.executable), "stockade-oci")
CONMON_WAIT = 60.0  # seconds for conmon to report the container created


LOG_REOPEN_WAIT = 5.0  # seconds conmon gets to make the new log file


@dataclass
class Container:
    id: str
    pod_id: str
    spec: dict  # the ContainerSpec, as asked
    image_id: str = ""
    log_path: str = ""
    state: str = CREATING
    created_at: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    pid: int = 0
    user: list = field(default_factory=list)  # [uid, gid, *groups] the process runs as

    def container_spec(self) -> bundlemod.ContainerSpec:
        data = dict(self.spec)
        data["mounts"] = [bundlemod.MountSpec(**m) for m in data.get("mounts", [])]
        data["envs"] = [tuple(e) for e in data.get("envs", [])]
        data["devices"] = [tuple(d) for d in data.get("devices", [])]
        return bundlemod.ContainerSpec(**data)


class Containers:
    def __init__(self, config: Config, pods: Pods, store: Store,
                 emit: Callable[[str, int], None] | None = None) -> None:
        self.config, self.pods, self.store = config, pods, store
        self.emit = emit or (lambda cid, kind: None)
        self.records = Records(os.path.join(config.state_dir, "containers"), "container.json", Container,
                               "container", "container_id")
        self.oci_root = os.path.join(config.state_dir, "oci")
        self.exits = os.path.join(config.state_dir, "exits")
        self.attach = os.path.join(config.state_dir, "attach")
        for path in (self.oci_root, self.exits, self.attach):
            os.makedirs(path, mode=0o711, exist_ok=True)
        self.lock = threading.RLock()
        self._filters: dict[tuple, dict | None] = {}  # (profile, capabilities) -> OCI seccomp section
        self._policies: dict[str, str | None] = {}  # profile -> its BPF policy name

    # -- lifecycle

    def create(self, pod_id: str, spec: bundlemod.ContainerSpec) -> Container:
        pod = self.pods.get(pod_id)
        if pod.state != READY:
            raise ContainerError(f"pod {pod.id[:12]} is not ready", where="pod_sandbox_id",
                                 hint="run a new pod sandbox")
        handler = self.config.handler(pod.handler)
        self._check(pod, handler, spec)
        image = self.store.find(spec.image) if spec.image else None
        if image is None:
            raise NotFound(f"image {spec.image!r} is not present", where="config.image.image",
                           hint="PullImage first")
        with self.lock:
            for other in self.list():
                same = (other.spec["name"], other.spec["attempt"]) == (spec.name, spec.attempt)
                if other.pod_id == pod.id and same:
                    raise AlreadyExists(f"container {spec.name!r} (attempt {spec.attempt}) exists in pod "
                                        f"{pod.id[:12]} as {other.id}", where="config.metadata",
                                        hint="remove it first, or raise metadata.attempt")
            c = Container(id=os.urandom(32).hex(), pod_id=pod.id, spec=asdict(spec), image_id=image.id,
                          created_at=time.time_ns(), log_path=self._log_path(pod, spec))
            os.makedirs(os.path.join(self.dir(c.id), "bundle"), mode=0o711)
            self.records.save(c)  # "creating": a server killed from here on is cleaned up at its next start
        try:
            self._make(c, pod, handler, spec, image)
        except BaseException:
            self.remove(c.id)
            raise
        c.state = CREATED
        self.records.save(c)
        self.emit(c.id, events.CREATED)
        return c

    def start(self, cid: str) -> Container:
        with self.lock:
            c = self.get(cid)
            if c.state != CREATED:
                raise ContainerError(f"container {cid[:12]} is {c.state}, not created", where="container_id")
            started = time.time_ns()  # before: a short workload may be done when start returns
            oci.start(self.oci_root, c.id)
            c.state, c.started_at = RUNNING, started
            self.records.save(c)
        self.emit(c.id, events.STARTED)
        return c

    def stop(self, cid: str, timeout: int) -> None:
        """SIGTERM (or the container's stop signal), then SIGKILL after TIMEOUT seconds."""
        c = self.refresh(self.get(cid))
        if c.state not in (RUNNING, CREATED):
            return
        if c.state == RUNNING and timeout > 0:
            self._signal(c, signal.SIGTERM)
            if self._wait_exit(c, timeout):
                return
        self._signal(c, signal.SIGKILL, every=True)
        self._wait_exit(c, 30)
        if c.state == CREATED:  # never started: it has no exit code of conmon's to wait for
            self._exited(c, 137, "Error")

    def remove(self, cid: str) -> None:
        with self.lock:
            c = self.find(cid)
            if c is None:
                return
            try:
                oci.delete(self.oci_root, c.id, force=True)
            except StockadeError:
                pass  # never created, or already gone
            self._end_conmon(c)
            unmount_root(self.store, c.id)
            for path in (os.path.join(self.exits, c.id),):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            remove_tree(self.dir(c.id))
        if c.state != CREATING:
            self.emit(c.id, events.DELETED)

    def refresh(self, c: Container) -> Container:
        """Created/running containers whose process has exited become exited, with the exit code
        conmon kept and the reason (OOMKilled when the kernel's OOM killer struck)."""
        if c.state not in (CREATED, RUNNING):
            return c
        path = os.path.join(self.exits, c.id)
        try:
            with open(path) as f:
                code = int(f.read().strip() or "-1")
            finished = os.stat(path).st_mtime_ns
        except (FileNotFoundError, ValueError):
            return c
        reason = "Completed" if code == 0 else "Error"
        if self._oom_killed(c) or (code == 137 and self._pod_oom_killed(c)):
            reason = "OOMKilled"
        self._exited(c, code, reason, finished)
        return c

    def running(self, cid: str) -> Container:
        c = self.refresh(self.get(cid))
        if c.state != RUNNING:
            raise ContainerError(f"container {cid[:12]} is not running", where="container_id")
        return c

    def exec_stream(self, request: Any) -> remotecommand.Exec:
        """A streaming session's process (request: a streaming.Pending), started."""
        c = self.running(request.container_id)
        return remotecommand.Exec([OCI_BIN, "--root", self.oci_root], c.id, request.command, tty=request.tty,
                                  stdin=request.stdin)

    def attach_paths(self, cid: str) -> tuple[str, str]:
        """(conmon's attach directory, its control FIFO) of a running container."""
        c = self.running(cid)
        return os.path.join(self.attach, c.id), os.path.join(self.dir(c.id), "bundle", "ctl")

    def exec_sync(self, cid: str, cmd: list[str], timeout: int) -> tuple[int, bytes, bytes]:
        c = self.running(cid)
        if not cmd:
            raise SpecError("no command", where="cmd")
        pid_file = os.path.join(self.dir(c.id), f"exec-{os.urandom(4).hex()}.pid")
        argv = [OCI_BIN, "--root", self.oci_root, "exec", "--pid-file", pid_file, c.id, *cmd]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            self._kill_exec(pid_file)
            proc.kill()
            out, err = proc.communicate()
            raise Timeout(f"{cmd[0]} ran past its timeout of {timeout}s", where="timeout") from None
        finally:
            try:
                os.unlink(pid_file)
            except FileNotFoundError:
                pass
        return proc.returncode, out, err

    def reopen_log(self, cid: str) -> None:
        c = self.running(cid)
        ctl = os.path.join(self.dir(c.id), "bundle", "ctl")
        fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, b"2 0 0\n")  # conmon: reopen the log file
        finally:
            os.close(fd)
        # kubelet renamed the file and reads the new one once this returns (CRI-O waits too)
        deadline = time.monotonic() + LOG_REOPEN_WAIT
        while not os.path.exists(c.log_path):
            if time.monotonic() > deadline:
                raise ContainerError(f"conmon did not reopen the log of container {cid[:12]}",
                                     where=c.log_path, hint="see the server's log for conmon's errors")
            time.sleep(0.005)

    def update(self, cid: str, changes: dict) -> Container:
        """New resource limits (CHANGES: ContainerSpec fields) for a running container."""
        c = self.refresh(self.get(cid))
        if c.state not in (CREATED, RUNNING):
            raise ContainerError(f"container {cid[:12]} is {c.state}", where="container_id")
        spec = c.container_spec()
        for key, value in changes.items():
            setattr(spec, key, value)
        oci.update(self.oci_root, c.id, bundlemod.resources(spec))
        with self.lock:
            c.spec.update(changes)
            self.records.save(c)
        return c

    def stats(self, c: Container) -> dict:
        """CPU (ns used), memory (bytes) and the writable layer (bytes, inodes) of C, now."""
        out = {"timestamp": time.time_ns(), "cpu_ns": 0, "memory": 0, "layer_bytes": 0, "layer_inodes": 0}
        if c.state in (CREATED, RUNNING):
            try:
                cgroup = oci.cgroup_of(oci.status(self.oci_root, c.id).state)
                numbers = cgroup.stats()
                out["cpu_ns"] = (numbers.get("cpu_usage_usec") or 0) * 1000
                memory = numbers.get("memory_current")
                # A container without a memory limit on a hybrid host is in no memory cgroup (joining
                # one costs every start an RCU grace period): its processes' resident pages instead.
                out["memory"] = memory if memory is not None else _resident(cgroup.pids())
            except (StockadeError, OSError):
                pass  # exited meanwhile
        upper = os.path.join(container_dir(self.store, c.id), "upper")
        for top, dirs, files in os.walk(upper):
            for name in dirs + files:
                try:
                    out["layer_bytes"] += os.lstat(os.path.join(top, name)).st_blocks * 512
                    out["layer_inodes"] += 1
                except OSError:
                    continue
        return out

    # -- lookups

    def dir(self, cid: str) -> str:
        return self.records.dir(cid)

    def find(self, ref: str) -> Container | None:
        return self.records.find(ref)

    def get(self, ref: str) -> Container:
        return self.records.get(ref)

    def list(self) -> list[Container]:
        return self.records.all()

    def reconcile(self) -> list[str]:
        """At start: remove containers whose CreateContainer did not finish."""
        removed = []
        for c in self.list():
            if c.state == CREATING:
                # conmon and the runtime's `create` may still be at work: let them finish, so that
                # what they make is there to be removed, not made after the removal.
                _wait_gone(os.path.join(self.dir(c.id), "bundle"), CONMON_WAIT)
                self.remove(c.id)
                removed.append(c.id)
        return removed

    # -- steps

    def _make(self, c: Container, pod: Pod, handler: Handler, spec: bundlemod.ContainerSpec,
              image: Image) -> None:
        maps = None
        if pod.uid_map:
            maps = [IDMapping(container_id=0, host_id=pod.uid_map[0], size=pod.uid_map[1])]
        rootfs = mount_root(self.store, image, c.id, maps, maps)
        cfg = image.image_config()
        user = passwd.resolve(rootfs, bundlemod.user_text(spec, cfg.user),
                              where="config.linux.security_context")
        if pod.uid_map and not (0 <= user.uid < pod.uid_map[1] and 0 <= user.gid < pod.uid_map[1]):
            raise SpecError(f"user {user.uid}:{user.gid} is outside the pod's id range", where="run_as_user")
        caps = bundlemod.capabilities(spec, user.uid)["bounding"]
        c.user = [user.uid, user.gid, *bundlemod.groups(spec, user)]
        pod_dir = self.pods.dir(pod.id)
        config = bundlemod.oci_config(
            spec, args=bundlemod.arguments(spec, cfg.entrypoint, cfg.cmd),
            env=bundlemod.environment(cfg.env, spec, pod.spec.get("hostname") or pod.spec["name"]),
            cwd=spec.working_dir or cfg.workdir or "/", user=user, pod=pod, pod_dir=pod_dir, handler=handler,
            seccomp=self._seccomp(spec, handler, caps), cid=c.id)
        config["root"]["path"] = rootfs
        policy = self._bpf_policy(handler)
        if policy:
            config["annotations"]["io.stockade.bpf-policy"] = policy
            if pod.ip:  # in the pod's own namespace, behind the tenant rules
                refused = refused_always(dual_stack=bool(pod.ip6))
                config["annotations"][NETWORK_REFUSES_ANNOTATION] = ",".join(refused)
        bundle = os.path.join(self.dir(c.id), "bundle")
        write_atomic(os.path.join(bundle, "config.json"), json.dumps(config), mode=0o644)
        os.makedirs(os.path.dirname(c.log_path), mode=0o755, exist_ok=True)
        c.pid = self._conmon(c, bundle, handler)

    def _conmon(self, c: Container, bundle: str, handler: Handler) -> int:
        """conmon creates the container and stays as its parent; it reports the container's pid
        (or the runtime's error) on the sync pipe."""
        sync_r, sync_w = os.pipe2(os.O_CLOEXEC)
        runtime_log = os.path.join(bundle, "oci-log.json")
        argv = ["conmon", "--syslog=false", "--api-version", "1", "-c", c.id, "-u", c.id,
                "-n", c.spec["name"], "-r", OCI_BIN, "-b", bundle, "-p", os.path.join(bundle, "pidfile"),
                "-P", os.path.join(bundle, "conmon.pid"), "-l", f"k8s-file:{c.log_path}",
                "--exit-dir", self.exits, "--socket-dir-path", self.attach, "--log-level", "error",
                "--runtime-arg", "--root", "--runtime-arg", self.oci_root,
                "--runtime-arg", "--log", "--runtime-arg", runtime_log,
                "--runtime-arg", "--log-format", "--runtime-arg", "json"]
        if c.spec["tty"]:
            argv.append("-t")
        if c.spec["stdin"]:
            argv.append("-i")
            if not c.spec.get("stdin_once"):  # one attach's end of input keeps it open for the next
                argv.append("--leave-stdin-open")
        env = {**os.environ, "_OCI_SYNCPIPE": str(sync_w)}
        if getattr(handler, "allow_degraded", False):
            env["STOCKADE_ALLOW_DEGRADED"] = "1"
        try:
            # cwd: conmon drops an "oom" file in its working directory when the OOM killer strikes
            proc = subprocess.Popen(argv, env=env, pass_fds=(sync_w,), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=bundle)
        finally:
            os.close(sync_w)
        try:
            answer = _read_all(sync_r, CONMON_WAIT)
        finally:
            os.close(sync_r)
        stderr = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        proc.wait()
        try:
            reply = json.loads(answer.splitlines()[0]) if answer.strip() else {}
        except ValueError:
            reply = {}
        pid = reply.get("data", reply.get("pid", -1)) if isinstance(reply, dict) else -1
        if not isinstance(pid, int) or pid <= 0:
            raise ContainerError(f"cannot create the container: {_runtime_error(runtime_log, reply, stderr)}",
                                 where=f"container {c.spec['name']}")
        return pid

    def _seccomp(self, spec: bundlemod.ContainerSpec, handler: Handler, caps: list[str]) -> dict | None:
        """The filter for SPEC under HANDLER; Docker-format rules conditional on capabilities are
        resolved for the container's own (CAP_SYS_ADMIN opens unshare, as with containerd)."""
        from stockade.profiles import load_profile, profile_seccomp

        kind = spec.seccomp
        if spec.privileged or (kind in ("", "unconfined") and handler.privileged):
            return None  # as runc under containerd and CRI-O: privileged means unconfined
        if kind in ("", "unconfined", "runtime/default", "docker/default"):
            # A sandboxing handler confines what kubelet leaves unconfined by default (its
            # --seccomp-default is off): never weaker than the handler's profile.
            key = (handler.profile, tuple(caps))
            if key not in self._filters:  # resolving a profile costs more than a container start
                self._filters[key] = profile_seccomp(load_profile(handler.profile), caps=caps)
            return self._filters[key]
        if kind.startswith("localhost/"):
            path = kind.removeprefix("localhost/")
            try:
                return profile_seccomp(load_profile(path), caps=caps)
            except StockadeError as exc:
                raise SpecError(f"the Localhost seccomp profile does not load: {exc}",
                                where="linux.security_context.seccomp.localhost_ref") from None
        raise SpecError(f"unknown seccomp profile {kind!r}", where="linux.security_context.seccomp")

    def _bpf_policy(self, handler: Handler) -> str | None:
        if handler.bpf_policy:
            return handler.bpf_policy
        if handler.profile not in self._policies:
            from stockade.profiles import load_profile

            policy = load_profile(handler.profile).bpf_policy
            self._policies[handler.profile] = policy if isinstance(policy, str) else None
        return self._policies[handler.profile]

    def _check(self, pod: Pod, handler: Handler, spec: bundlemod.ContainerSpec) -> None:
        if not spec.name:
            raise SpecError("metadata.name is empty", where="config.metadata.name")
        if spec.privileged and not handler.privileged:
            raise SpecError(f"privileged containers are refused by handler {handler.name!r}",
                            where="config.linux.security_context.privileged")
        if spec.pid_mode == "pod" and "pid" not in pod.namespaces:
            raise SpecError("the container asks for its pod's PID namespace, but the pod has none",
                            where="config.linux.security_context.namespace_options.pid",
                            hint="run the pod with namespace_options.pid = POD (shareProcessNamespace)")
        if spec.pid_mode not in ("container", "pod"):
            raise SpecError("the node's PID namespace is refused", where="config.linux.security_context."
                            "namespace_options.pid", hint="hostPID pods are not supported")

    def _log_path(self, pod: Pod, spec: bundlemod.ContainerSpec) -> str:
        directory = pod.spec.get("log_directory") or os.path.join(self.pods.dir(pod.id), "logs")
        name = spec.log_path or f"{spec.name}/{spec.attempt}.log"
        path = os.path.normpath(os.path.join(directory, name))
        if not path.startswith(os.path.normpath(directory) + os.sep):
            raise SpecError(f"log_path {spec.log_path!r} leaves the pod's log directory",
                            where="config.log_path")
        return path

    def _signal(self, c: Container, sig: int, every: bool = False) -> None:
        try:
            oci.kill(self.oci_root, c.id, sig, all_processes=every)
        except StockadeError:
            pass  # exited meanwhile

    def _wait_exit(self, c: Container, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.refresh(c).state == EXITED:
                return True
            time.sleep(0.02)
        return False

    def _exited(self, c: Container, code: int, reason: str, finished: int = 0) -> None:
        with self.lock:
            c.state, c.exit_code, c.reason = EXITED, code, reason
            c.finished_at = max(finished or time.time_ns(), c.started_at)
            self.records.save(c)
        self.emit(c.id, events.STOPPED)

    def on_exit_file(self, cid: str) -> None:
        """conmon wrote CID's exit file: record the exit (and tell the subscribers) now."""
        c = self.find(cid)
        if c is not None:
            self.refresh(c)

    def _oom_killed(self, c: Container) -> bool:
        try:
            status = oci.status(self.oci_root, c.id)
            return oci.cgroup_of(status.state).oom_kills() > 0
        except (StockadeError, OSError):
            return False

    def _end_conmon(self, c: Container) -> None:
        """conmon leaves once the container is gone; wait for it (a removed container leaves no
        process behind), and end one that lingers."""
        try:
            with open(os.path.join(self.dir(c.id), "bundle", "conmon.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 5
        while _is_conmon_of(pid, c.id):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.01)

    def _pod_oom_killed(self, c: Container) -> bool:
        """The OOM killer struck in the pod's own cgroup (its limit is the pod's, not the
        container's)."""
        pod = self.pods.find(c.pod_id)
        if pod is None or not pod.own_cgroup:
            return False
        try:
            from stockade.runtime.cgroups import open_driver

            return open_driver().open(pod.cgroup_parent).oom_kills() > 0
        except (StockadeError, OSError):
            return False

    def _kill_exec(self, pid_file: str) -> None:
        try:
            with open(pid_file) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _wait_gone(bundle: str, timeout: float) -> None:
    """Until no `stockade-oci create` for BUNDLE runs. The container's init keeps that command
    line while it waits to be started, but lives in the container's PID namespace: only processes
    in ours count."""
    needle = f"--bundle\0{bundle}\0".encode()
    ours = os.readlink("/proc/self/ns/pid")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_creating(entry, needle, ours) for entry in os.listdir("/proc") if entry.isdigit()):
            return
        time.sleep(0.02)


def _creating(pid: str, needle: bytes, pidns: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if needle not in f.read():
                return False
        return os.readlink(f"/proc/{pid}/ns/pid") == pidns
    except OSError:
        return False


def _resident(pids: list[int]) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    return total


def _is_conmon_of(pid: int, cid: str) -> bool:
    """PID is still the conmon of CID (not a zombie, not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state != b"Z" and cid.encode() in cmdline and b"conmon" in cmdline


def _read_all(fd: int, timeout: float) -> str:
    import select

    data, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        if b"\n" in data:
            break
    return data.decode(errors="replace")


def _runtime_error(log: str, reply: object, stderr: str) -> str:
    """The runtime's own last error line (what runc users read from --log), else conmon's."""
    try:
        with open(log) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        errors = [e.get("msg", "") for e in lines if isinstance(e, dict) and e.get("level") == "error"]
        if errors:
            return errors[-1]
    except (OSError, ValueError):
        pass
    message = reply.get("message") if isinstance(reply, dict) else None
    return str(message or stderr or "conmon reported no container")
