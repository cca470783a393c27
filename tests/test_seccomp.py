"""runtime/seccomp.py: OCI LinuxSeccomp -> BPF (libseccomp, cached) and installation with seccomp(2).

Filters are installed in forked children only; each child reports the errno its probes got through a
pipe, so the assertions are about what the kernel really returns.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest
from stockade.profiles import load_profile, profile_seccomp
from stockade.runtime import seccomp
from stockade.runtime.errors import NotSupported, SpecError

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
NR = {
    "getppid": 110,
    "unshare": 272,
    "keyctl": 250,
    "ptrace": 101,
    "clone3": 435,
    "getpriority": 140,
    "personality": 135,
    "bpf": 321,
    "io_uring_setup": 425,
    "userfaultfd": 323,
    "perf_event_open": 298,
}
CLONE_NEWUSER = 0x10000000


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STOCKADE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def probe_in_child(program: bytes, probes: list[tuple], flags: list[str] | None = None) -> list[int]:
    """Fork; the child sets no_new_privs, installs `program`, runs raw syscalls and sends back
    0 (success) or the errno of each. Raw syscall() calls, so libc wrappers cannot hide anything."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            seccomp.set_no_new_privs()
            seccomp.load_program(program, flags or [])
            out = []
            for name, *args in probes:
                ret = LIBC.syscall(ctypes.c_long(NR[name]), *[ctypes.c_long(a) for a in args])
                out.append(0 if ret >= 0 else ctypes.get_errno())
            os.write(w, json.dumps(out).encode())
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            os.write(w, json.dumps(repr(e)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = json.loads(f.read() or '"child died"')
    os.waitpid(pid, 0)
    assert isinstance(data, list), data
    return data


def oci(name: str) -> dict:
    result = profile_seccomp(load_profile(name))
    assert result is not None
    return result


def test_compile_builtins_and_cache_hit(cache):
    program = seccomp.compile_program(oci("restricted"))
    assert len(program) % 8 == 0 and 100 < seccomp.instruction_count(program) <= 4096
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.endswith(".bpf")
    assert seccomp.compile_program(oci("restricted")) == program
    # a fresh interpreter on a warm cache never imports the libseccomp bindings
    code = (
        "import json,sys;from stockade.runtime.seccomp import compile_program;"
        "compile_program(json.load(sys.stdin));print('seccomp' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(oci("restricted")),
        text=True,
        capture_output=True,
        check=True,
        env=os.environ,
    )
    assert out.stdout.strip() == "False"


def test_corrupt_cache_entry_is_recompiled(cache):
    program = seccomp.compile_program(oci("runtime-default"))
    (entry,) = cache.iterdir()
    entry.write_bytes(entry.read_bytes()[:-8] + b"\xff" * 8)
    assert seccomp.compile_program(oci("runtime-default")) == program
    entry.write_bytes(b"garbage")
    assert seccomp.compile_program(oci("runtime-default")) == program


def test_cache_key_depends_on_content(cache):
    a = oci("restricted")
    b = json.loads(json.dumps(a))
    b["defaultErrnoRet"] = 13
    assert seccomp.compile_program(a) != seccomp.compile_program(b)
    assert len(list(cache.iterdir())) == 2


def test_unwritable_cache_still_compiles(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("STOCKADE_CACHE_DIR", str(blocker / "sub"))
    assert seccomp.compile_program(oci("restricted"))


BASE = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW"}]}


@pytest.mark.parametrize(
    "patch, needle",
    [
        ({"defaultAction": "SCMP_ACT_BOGUS"}, "unknown seccomp action"),
        ({"syscalls": [{"names": ["opne"], "action": "SCMP_ACT_ALLOW"}]}, "unknown syscall name 'opne'"),
        ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOPE"}]}, "unknown seccomp action"),
        ({"architectures": ["SCMP_ARCH_VAX"]}, "unknown architecture"),
        ({"flags": ["SECCOMP_FILTER_FLAG_BOGUS"]}, "unsupported seccomp flag"),
        (
            {
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_SIMILAR"}],
                    }
                ]
            },
            "unknown operator",
        ),
        (
            {
                "syscalls": [
                    {
                        "names": ["read"],
                        "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}],
                    }
                ]
            },
            "out of range",
        ),
        ({"syscalls": [{"names": [], "action": "SCMP_ACT_ALLOW"}]}, "non-empty list"),
        ({"syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO", "errnoRet": 99999}]}, "errno"),
    ],
)
def test_bad_input_is_refused_with_where(patch, needle):
    with pytest.raises(SpecError) as e:
        seccomp.compile_program({**BASE, **patch}, where="config.json: linux.seccomp")
    assert needle in str(e.value) and "linux.seccomp" in str(e.value)


def test_notify_and_listener_are_not_supported():
    with pytest.raises(NotSupported):
        seccomp.compile_program({**BASE, "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]})
    with pytest.raises(NotSupported):
        seccomp.compile_program({**BASE, "listenerPath": "/run/agent.sock"})


def test_names_newer_than_libseccomp_only_skipped_when_that_is_stricter():
    # an allow under a deny default: skipping mseal can only deny more
    assert seccomp.compile_program(
        {**BASE, "syscalls": [{"names": ["read", "mseal"], "action": "SCMP_ACT_ALLOW"}]}
    )
    # a deny under an allow default: skipping would weaken the filter in silence
    with pytest.raises(SpecError, match="mseal"):
        seccomp.compile_program(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mseal"], "action": "SCMP_ACT_ERRNO"}],
            }
        )


def test_restricted_filter_denies_in_the_kernel():
    program = seccomp.compile_program(oci("restricted"))
    got = probe_in_child(
        program,
        [
            ("getppid",),
            ("unshare", CLONE_NEWUSER),
            ("keyctl", 0, 0),
            ("ptrace", 16, 1),
            ("clone3", 0, 0),
            ("bpf", 0, 0, 0),
            ("io_uring_setup", 1, 0),
            ("userfaultfd", 0),
            ("perf_event_open", 0, 0),
            ("personality", 0x0400000),
            ("personality", 0xFFFFFFFF),
        ],
    )
    eperm, enosys = 1, 38
    assert got == [0, eperm, eperm, eperm, enosys, eperm, eperm, eperm, eperm, eperm, 0]


def test_runtime_default_keeps_ptrace_but_not_namespaces():
    program = seccomp.compile_program(oci("runtime-default"))
    got = probe_in_child(program, [("unshare", CLONE_NEWUSER), ("ptrace", 0x4206, 999999999)])
    assert got[0] == 1  # EPERM from the filter
    assert got[1] == 3  # ESRCH from ptrace itself: the filter let it through


def test_errno_ret_and_or_semantics_for_one_argument():
    config = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
            {
                "names": ["getpriority"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": 13,
                "args": [
                    {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                    {"index": 0, "value": 1, "op": "SCMP_CMP_EQ"},
                ],
            },
        ],
    }
    got = probe_in_child(
        seccomp.compile_program(config),
        [("getppid",), ("getpriority", 0, 0), ("getpriority", 1, 0), ("getpriority", 2, 0)],
    )
    assert got == [38, 13, 13, 0]


def test_load_flags(monkeypatch):
    program = seccomp.compile_program(BASE | {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []})
    assert probe_in_child(
        program, [("getppid",)], flags=["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_TSYNC"]
    ) == [0]
    with pytest.raises(OSError):
        seccomp.load_program(program, ["SECCOMP_FILTER_FLAG_NOPE"])
    with pytest.raises(OSError):
        seccomp.load_program(b"\x00" * 7, [])


def test_supported():
    s = seccomp.supported()
    assert "SCMP_ACT_ERRNO" in s["actions"] and "SCMP_ARCH_X86_64" in s["archs"]
    assert "SCMP_CMP_MASKED_EQ" in s["operators"] and "SECCOMP_FILTER_FLAG_TSYNC" in s["supportedFlags"]
    assert s["knownSyscalls"] > 300
