"""Linux ABI tables as plain data (x86_64 values): capabilities, resource limits, clone and
mount flags, prctl options. One source for the modules that speak to the kernel (syscalls,
capabilities, mounts), those that only validate (spec, profiles) and the BPF package.
"""

from __future__ import annotations

# clone/unshare/setns flags (linux/sched.h)
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount flags (linux/mount.h)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_I_VERSION = 1 << 23
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 2

# The new mount API (linux/mount.h): idmapped views of a directory tree
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_IDMAP = 0x100000
# mount_setattr(2) attributes and the mount(2) flags they stand for
MOUNT_ATTR_BY_FLAG = {0x1: 0x1, 0x2: 0x2, 0x4: 0x4, 0x8: 0x8}  # MS_RDONLY/NOSUID/NODEV/NOEXEC: ATTR_*

# prctl options (linux/prctl.h)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# openat2 resolve flags (linux/openat2.h)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10


CLONE_INTO_CGROUP = 0x200000000

_CAP_NAMES = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE "
    "NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO "
    "SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME "
    "SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG "
    "WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
).split()
CAP_NAMES = tuple(f"CAP_{name}" for name in _CAP_NAMES)  # in capability-number order
CAPABILITIES = {name: number for number, name in enumerate(CAP_NAMES)}  # name -> capability number

_RLIMIT_NAMES = (
    "CPU FSIZE DATA STACK CORE RSS NPROC NOFILE MEMLOCK AS LOCKS SIGPENDING MSGQUEUE NICE RTPRIO RTTIME"
)
RLIMITS = {f"RLIMIT_{name}": number for number, name in enumerate(_RLIMIT_NAMES.split())}  # x86_64 numbers
RLIM_INFINITY = 2**64 - 1

DEVICE_RULE_TYPES = ("a", "b", "c")  # cgroup device rules: all, block, character
DEVICE_NODE_TYPES = ("c", "b", "u", "p")  # linux.devices nodes: character, block, unbuffered, fifo


def sysctl_path(key: str) -> str:
    """`net.ipv4.ip_forward` -> `/proc/sys/net/ipv4/ip_forward` (a key with "/" is taken as a path)."""
    return "/proc/sys/" + (key.strip("/") if "/" in key else key.replace(".", "/"))
