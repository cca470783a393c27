#!/usr/bin/env python3
"""What each runtime-hardening step (issue: the runc-CVE classes) costs a container start.

Usage (root): .venv/bin/python bench/hardening.py [--runs 300]

Each step is timed on its own, as the init runs it, median of --runs (microseconds). The exec
through the trampoline is measured as the difference between fork+execve(/bin/true) through it
and directly, alternating in the same loop. bench/coldstart.py --baseline measures the sum of
all steps end to end against the code before them, and runc and crun, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from stockade.runtime import procfs, trampoline
from stockade.runtime import syscalls as sc


def _median_us(step, runs: int) -> float:  # noqa: ANN001
    samples = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        step()
        samples.append(time.perf_counter_ns() - start)
    return round(statistics.median(samples) / 1000, 1)


def _in_child(body) -> None:  # noqa: ANN001
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _exec_true(through_trampoline: bool) -> float:
    start = time.perf_counter_ns()
    pid = os.fork()
    if pid == 0:
        if through_trampoline:
            os.execve(*trampoline.argv("/bin/true", ["true"]), {})
        os.execve("/bin/true", ["true"], {})
    os.waitpid(pid, 0)
    return time.perf_counter_ns() - start


def exec_cost(runs: int) -> dict[str, float]:
    direct, via = [], []
    for _ in range(runs):
        direct.append(_exec_true(False))
        via.append(_exec_true(True))
    d, v = statistics.median(direct) / 1000, statistics.median(via) / 1000
    return {
        "fork_exec_true_us": round(d, 1),
        "through_trampoline_us": round(v, 1),
        "added_us": round(v - d, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=300)
    args = p.parse_args()
    result = {
        "sealed_memfd_once_per_process_us": _median_us(
            lambda: os.close(trampoline._sealed(trampoline.program())), args.runs
        ),
        "non_dumpable_us": _median_us(lambda: sc.set_dumpable(False), args.runs),
        "close_inherited_fds_us": _median_us(lambda: sc.close_fds_from(3 + 64, keep=(70,)), args.runs),
        "new_session_keyring_us": _median_us(lambda: _in_child(sc.join_session_keyring), args.runs)
        - _median_us(lambda: _in_child(lambda: None), args.runs),
        "cwd_check_us": _median_us(lambda: (os.chdir("/"), os.getcwd()), args.runs),
        "procfs_checked_open_us": _median_us(
            lambda: os.close(procfs.open_file("/proc/sys/kernel/hostname", os.O_RDONLY, "bench")), args.runs
        ),
        "plain_proc_open_us": _median_us(
            lambda: os.close(os.open("/proc/sys/kernel/hostname", os.O_RDONLY)), args.runs
        ),
        "exec": exec_cost(args.runs),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
