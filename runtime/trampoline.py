"""The last exec into a container goes through a sealed in-memory trampoline (CVE-2019-5736).

Until its final execve the container init is the host's Python interpreter. A process in the
container that reaches that binary through /proc (/proc/<init>/exe, or /proc/self/exe resolved
by the kernel while it executes an entrypoint script whose interpreter line is
`#!/proc/self/exe`) can keep a handle on it and overwrite the host's interpreter once the runtime
has exited. runc closes this by re-executing itself from a sealed copy; re-executing Python would
cost a whole interpreter start on every container start. Instead the init (and every `exec`,
and every hook run inside the container) first executes this 200-byte static program from a
write-sealed memfd, which then executes the workload: at the workload's execve /proc/self/exe is
the sealed memfd, never a host file. Before that the runtime is non-dumpable (spawn.fork_child), so
/proc/<pid>/exe of a runtime process stays closed to the container.

The program takes argv = [MARKER, path, argv0, argv1, ...] and the environment, and calls
execve(path, &argv[2], envp); anything else (the kernel running it for `#!/proc/self/exe`) and
a failed execve end with exit status 126 (127: ENOENT) and one line on stderr.
"""

from __future__ import annotations

import os

from .errors import NotSupported

MARKER = "stkexec"  # argv[0]; compared as one 8-byte word with its NUL

_BASE = 0x400000
_MESSAGE = b"stockade: exec trampoline: cannot execute\n"

# x86_64 (intel syntax); `objdump -D -b binary -m i386:x86-64 -M intel` shows it back.
_X86_64 = (
    bytes.fromhex(
        "488b0c24"  # 00 mov rcx, [rsp]             argc
        "4883f902"  # 04 cmp rcx, 2
        "7234"  # 08 jb bad
        "488b442408"  # 0a mov rax, [rsp+8]         argv[0]
        "48ba"
        + MARKER.encode().ljust(8, b"\0").hex()  # 0f movabs rdx, MARKER
        + "483910"  # 19 cmp [rax], rdx
        "7520"  # 1c jne bad
        "488b7c2410"  # 1e mov rdi, [rsp+16]        path = argv[1]
        "488d742418"  # 23 lea rsi, [rsp+24]        &argv[2]
        "488d54cc10"  # 28 lea rdx, [rsp+rcx*8+16]  envp
        "b83b000000"  # 2d mov eax, 59 (execve)
        "0f05"  # 32 syscall
        "bb7f000000"  # 34 mov ebx, 127
        "83f8fe"  # 39 cmp eax, -ENOENT
        "7405"  # 3c je report
        "bb7e000000"  # 3e bad: mov ebx, 126
        "bf02000000"  # 43 report: mov edi, 2
        "488d3515000000"  # 48 lea rsi, [rip+0x15]  the message, at 0x64
        "ba"
        + len(_MESSAGE).to_bytes(4, "little").hex()  # 4f mov edx, len
        + "b801000000"  # 54 mov eax, 1 (write)
        "0f05"  # 59 syscall
        "89df"  # 5b mov edi, ebx
        "b8e7000000"  # 5d mov eax, 231 (exit_group)
        "0f05"  # 62 syscall
    )
    + _MESSAGE
)  # 64


def _elf(code: bytes, machine: int) -> bytes:
    """A static ELF64 executable: header, PT_LOAD (R+X) of the whole file, PT_GNU_STACK (RW)."""
    ehsize, phsize, phnum = 64, 56, 2
    entry = _BASE + ehsize + phsize * phnum
    size = ehsize + phsize * phnum + len(code)
    le = lambda value, width: value.to_bytes(width, "little")  # noqa: E731
    header = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)  # 64-bit, little-endian, version 1, System V
        + le(2, 2)
        + le(machine, 2)
        + le(1, 4)  # ET_EXEC, machine, version
        + le(entry, 8)
        + le(ehsize, 8)
        + le(0, 8)  # entry, program headers, no sections
        + le(0, 4)
        + le(ehsize, 2)
        + le(phsize, 2)
        + le(phnum, 2)
        + le(64, 2)
        + le(0, 2)
        + le(0, 2)
    )
    load = le(1, 4) + le(5, 4) + le(0, 8) + le(_BASE, 8) + le(_BASE, 8) + le(size, 8) * 2 + le(0x1000, 8)
    stack = le(0x6474E551, 4) + le(6, 4) + bytes(48)
    return header + load + stack + code


_PROGRAMS = {"x86_64": (_X86_64, 62)}

MFD_CLOEXEC, MFD_ALLOW_SEALING, MFD_EXEC = 0x1, 0x2, 0x10
F_ADD_SEALS = 1033
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 0x1, 0x2, 0x4, 0x8

_fd = -1  # one sealed copy per runtime process (the CRI daemon keeps it), inherited by its forks


def program() -> bytes:
    machine = os.uname().machine
    if machine not in _PROGRAMS:
        raise NotSupported(
            f"no exec trampoline for {machine}: the container could reach the runtime's binary",
            where="runtime",
            hint="Stockade runs containers on x86_64 only for now",
        )
    code, elf_machine = _PROGRAMS[machine]
    return _elf(code, elf_machine)


def fd() -> int:
    """The sealed memfd holding the trampoline (close-on-exec; created once per process)."""
    global _fd
    if _fd < 0:
        _fd = _sealed(program())
    return _fd


def _sealed(data: bytes) -> int:
    import fcntl

    try:  # Linux 6.3+ marks memfds non-executable unless asked (vm.memfd_noexec)
        memfd = os.memfd_create("stockade-exec", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC)
    except OSError:
        memfd = os.memfd_create("stockade-exec", MFD_CLOEXEC | MFD_ALLOW_SEALING)
    try:
        os.write(memfd, data)
        os.fchmod(memfd, 0o555)
        fcntl.fcntl(memfd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


def argv(path: str, args: list[str]) -> tuple[str, list[str]]:
    """(what to execve, its argv) to run `path` with `args` through the trampoline. The path goes
    through /proc/self/fd with execve(2), which every seccomp profile that runs a workload allows
    (execveat may be denied); the memfd is close-on-exec, so the workload never holds it."""
    return f"/proc/self/fd/{fd()}", [MARKER, path, *args]
