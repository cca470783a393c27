"""What this kernel lets the BPF layer do, asked for real with plain bpf(2) (no bcc).

A probe loads the smallest program of its kind, attaches it, and removes it again. The answer is
(True, what worked) or (False, why not, in words an operator can act on). `stockade doctor`
reports these answers, the agent names them when loading its own programs fails, and the test
suite uses them to decide where the lab tests run.
"""

from __future__ import annotations

import errno
import os

from stockade.bpf import bpfsys, btf

LSM_LIST = "/sys/kernel/security/lsm"
_ALLOW = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0 (allow); exit
_LSM_EPERM = ("the kernel refused a trivial BPF-LSM program with EPERM "
              "(BPF-LSM not active: lsm= lacks bpf, lockdown, or a restricted VM)")


def active_lsms() -> list[str] | None:
    """The active LSMs in order, or None when securityfs is not mounted."""
    try:
        with open(LSM_LIST) as f:
            return f.read().strip().split(",")
    except OSError:
        return None


def lsm(active: list[str] | None = None) -> tuple[bool, str]:
    """Can this kernel run BPF-LSM programs? Loads an allow-everything program for the file_open
    hook and links it, then closes both (nothing stays attached).

    ACTIVE is the active LSM list when the caller has read it (the doctor mounts securityfs for
    that); otherwise it is read here when securityfs is mounted.
    """
    lsms = active if active is not None else active_lsms()
    if lsms and "bpf" not in lsms:  # the program would load and link, and never run
        return False, f"'bpf' is not in the active LSM list ({','.join(lsms)}); boot with lsm=...,bpf"
    try:
        btf_id = btf.func_id("bpf_lsm_file_open")
    except OSError as e:
        return False, f"no vmlinux BTF ({e.strerror}); BPF-LSM needs CONFIG_DEBUG_INFO_BTF"
    if btf_id is None:
        return False, "the kernel has no bpf_lsm_file_open hook (CONFIG_BPF_LSM off)"
    try:
        prog = bpfsys.prog_load(bpfsys.PROG_LSM, _ALLOW, name="stockade_probe",
                                expected_attach_type=bpfsys.LSM_MAC, attach_btf_id=btf_id)
    except bpfsys.BpfError as e:
        return False, _refused("load", e)
    try:
        os.close(bpfsys.raw_tracepoint_open(prog))
    except bpfsys.BpfError as e:
        return False, _refused("attach", e)
    finally:
        os.close(prog)
    return True, "a BPF-LSM program loaded and attached"


def _refused(what: str, e: OSError) -> str:
    if e.errno == errno.EPERM:
        return _LSM_EPERM
    return f"the kernel refused to {what} a BPF-LSM program: {os.strerror(e.errno)}"
