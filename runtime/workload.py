"""The workload's last steps, shared by the container init and `exec`: AppArmor, no_new_privs,
seccomp, capabilities, the user and working directory, the executable, then the exec itself.

`finalize` does all of it but the exec while the process is still held back, so a failure is
`create`'s (or `exec`'s) error, as with runc; after `start` only `exec_workload` is left.
"""

from __future__ import annotations

import errno
import os

from . import capabilities, procfs, trampoline
from . import syscalls as sc
from .channel import Reported, stderr
from .errors import StockadeError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .spec import Process

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _find_executable(process: Process, env: dict[str, str]) -> str:
    """Resolve args[0] in the container (after pivot_root) the way execvp would, so `create` can fail."""
    name = process.args[0]
    if "/" in name:
        path = os.path.join(process.cwd, name)
        if not os.path.isfile(path):
            raise StockadeError(f"exec: {name!r}: no such file", where="process.args[0]")
        if not os.access(path, os.X_OK):
            raise StockadeError(f"exec: {name!r}: permission denied", where="process.args[0]")
        return path
    for directory in env.get("PATH", DEFAULT_PATH).split(":"):
        path = os.path.join(directory or ".", name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise StockadeError(f"exec: {name!r}: executable file not found in $PATH", where="process.args[0]")


def environment(process: Process) -> dict[str, str]:
    env = dict(item.split("=", 1) for item in process.env)
    if "HOME" not in env:
        env["HOME"] = _home_of(process.user.uid)
    return env


def _home_of(uid: int) -> str:
    try:
        with open("/etc/passwd") as f:
            for line in f:
                parts = line.split(":")
                if len(parts) >= 6 and parts[2] == str(uid):
                    return parts[5]
    except OSError:
        pass
    return "/"


def apply_oom_score_adj(value: int | None, where: str) -> None:
    if value is None:
        return
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as exc:
        hint = "lowering the OOM score needs CAP_SYS_RESOURCE, which the runtime lacks" if value < 0 else ""
        raise StockadeError(
            f"cannot set oomScoreAdj to {value}: {exc.strerror}", where=where, hint=hint
        ) from None


def _become_user(process: Process) -> None:
    """Switch to process.user, keeping the permitted capabilities for the capset that follows."""
    user = process.user
    try:
        sc.set_keepcaps(True)
        os.setgroups(user.additional_gids)
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
        sc.set_keepcaps(False)
    except OSError as exc:
        raise StockadeError(
            f"cannot switch to uid {user.uid} gid {user.gid}: {exc.strerror}",
            where="process.user",
            hint="the IDs must be mapped in the user namespace",
        ) from None
    if user.umask is not None:
        os.umask(user.umask)
    _enter_cwd(process.cwd, user.uid)


def _enter_cwd(cwd: str, uid: int = 0) -> None:
    """chdir, then make sure the directory is inside the container's root: a cwd such as
    /proc/self/fd/N resolves to whatever descriptor N is and can leave the root (CVE-2024-21626);
    the kernel then reports the path as unreachable and getcwd fails."""
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise StockadeError(
            f"cannot enter cwd {cwd!r} as uid {uid}: {exc.strerror}", where="process.cwd"
        ) from None
    try:
        os.getcwd()
    except FileNotFoundError:
        raise StockadeError(
            f"cwd {cwd!r} is outside the container's root filesystem: refusing a possible breakout",
            where="process.cwd",
            hint="use a directory inside the container; /proc/self/fd/N names the runtime's descriptors",
        ) from None


def join_new_keyring() -> None:
    """A fresh anonymous session keyring, as runc does: the caller's session keyring (and the keys
    it links) stays out of the container. Where keyctl itself is unavailable (no CONFIG_KEYS, or a
    filter this process runs under already denies it), so is every keyring to the workload."""
    try:
        sc.join_session_keyring()
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM):
            raise StockadeError(
                f"cannot join a new session keyring: {exc.strerror}", where="container init"
            ) from None


def finalize(
    personality: int | None,
    process: Process,
    env: dict[str, str],
    preserve_fds: int,
    seccomp_program: bytes | None,
    seccomp_flags: list[str],
    keep: tuple[int, ...],
) -> str:
    """Everything from the AppArmor label to the seccomp filter, done before the process is
    released, so that a failure is `create`'s (or `exec`'s) error, as with runc: after `start`
    only the exec is left. Returns the executable, found with the user's permissions. `keep`:
    descriptors still needed until then (every other one past the preserved ones is closed)."""
    if seccomp_program is not None:
        from .seccomp import load_program
    # Without no_new_privs the kernel loads a filter only for CAP_SYS_ADMIN: then it goes in
    # while we still have it, and also covers the user switch and the capability drop (runc's
    # order; engines' default profiles allow those calls). With no_new_privs, as late as possible.
    early = seccomp_program is not None and not process.no_new_privileges
    if process.apparmor_profile:
        _set_apparmor(process.apparmor_profile)
    if process.no_new_privileges:
        sc.set_no_new_privs()
    if early:
        load_program(seccomp_program, seccomp_flags)
    capabilities.drop_bounding(process.capabilities)
    _become_user(process)
    capabilities.apply(process.capabilities)
    if personality is not None:
        sc.personality(personality)
    path = _find_executable(process, env)
    sc.close_fds_from(3 + preserve_fds, keep=(trampoline.fd(), *keep))
    if seccomp_program is not None and not early:
        load_program(seccomp_program, seccomp_flags)  # the filter applies to us from here on
    return path


def exec_workload(path: str, process: Process, env: dict[str, str]) -> None:
    """The last step, through the trampoline; a failure goes to the container's stderr."""
    exec_path, exec_argv = trampoline.argv(path, process.args)
    # Python ignores SIGPIPE and SIGXFSZ; ignored dispositions survive execve, so restore them.
    import _signal

    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(sig, _signal.SIG_DFL)
    try:
        os.execve(exec_path, exec_argv, env)
    except OSError as exc:
        stderr(f"stockade: exec {process.args[0]!r}: {exc.strerror}")
        raise Reported(127 if exc.errno == 2 else 126) from None


def _set_apparmor(profile: str) -> None:
    for name in ("attr/apparmor/exec", "attr/exec"):
        try:
            procfs.write(procfs.self_path(name), f"exec {profile}", "process.apparmorProfile")
            return
        except StockadeError:
            if os.path.exists(procfs.self_path(name)):
                raise
    raise StockadeError(f"cannot set AppArmor profile {profile!r}", where="process.apparmorProfile")
