"""Kernel lab integration: tests marked `lab` run where the kernel can do what they test.

A `@pytest.mark.lab` test needs BPF-LSM or cgroup v2 controllers. When this host has both, the
test runs here like any other. Otherwise every selected lab test of the session runs in ONE
boot of the QEMU lab (vagrant/lab) and the guest's per-phase reports are replayed onto the host's
items: outcome, failure text, captured output, duration, and a `lab_kernel` user property naming
the kernel it ran on (the terminal summary says it too). A guest crash or timeout fails them all
with the console tail. When the lab cannot run at all (no QEMU, the kernel package does not
download) the tests skip with the reason, or fail under STOCKADE_REQUIRE_KERNEL_TESTS=1.

Options: --lab-kernel PKG (env STOCKADE_LAB_KERNEL; default Debian 12's current linux-image;
exported to the session's processes so every lab it starts boots that kernel), --lab
auto|always|never (env STOCKADE_LAB), --lab-timeout SECONDS (env STOCKADE_LAB_TIMEOUT).
Inside the guest STOCKADE_IN_LAB=1: tests run natively and their reports go to the JSON-lines
file named by STOCKADE_LAB_RESULTS.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parent.parent
# STOCKADE_LAB_BIN: the lab of another checkout (the plugin's own tests run copies of it).
LAB = Path(os.environ.get("STOCKADE_LAB_BIN") or CHECKOUT / "vagrant" / "lab").resolve()
LAB_CHECKOUT = LAB.parent.parent  # shared read-write with the guest by the lab itself


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stockade kernel lab")
    group.addoption(
        "--lab-kernel",
        default=os.environ.get("STOCKADE_LAB_KERNEL"),
        metavar="PKG",
        help="Debian kernel image package for lab tests (default: Debian's current one)",
    )
    group.addoption(
        "--lab",
        default=os.environ.get("STOCKADE_LAB", "auto"),
        choices=["auto", "always", "never"],
        help="run lab tests in the QEMU lab: when the host lacks the features (auto), "
        "always, or never (they run on the host and skip what it lacks)",
    )
    group.addoption(
        "--lab-timeout",
        type=float,
        default=float(os.environ.get("STOCKADE_LAB_TIMEOUT", 1800)),
        help="hard limit in seconds for the whole lab session (default 1800)",
    )


def pytest_configure(config: pytest.Config) -> None:
    kernel = config.getoption("--lab-kernel")
    if kernel:  # tests that run vagrant/lab themselves (tests/test_lab.py) boot the same kernel
        os.environ["STOCKADE_LAB_KERNEL"] = kernel


def host_lacks() -> list[str]:
    """What the host kernel misses for lab tests to run natively (empty: run them here)."""
    from stockade.runtime.doctor import probe_bpf_lsm

    missing = []
    ok, why = probe_bpf_lsm()
    if not ok:
        missing.append(why)
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    have = controllers.read_text().split() if controllers.exists() else []
    if not {"cpu", "memory", "pids", "io"} <= set(have):
        missing.append("no cgroup v2 controllers at /sys/fs/cgroup")
    return missing


@dataclass
class LabSession:
    """One lab boot for all lab items of this pytest session."""

    items: list[pytest.Item]
    kernel_pkg: str | None
    timeout: float
    why: str
    ran: bool = False
    results: dict[str, list[dict]] = field(default_factory=dict)
    kernel: str | None = None
    cannot_run: str | None = None  # the lab could not start: skip/fail by STOCKADE_REQUIRE_KERNEL_TESTS
    crashed: str | None = None  # the lab started and broke: every item without a result fails
    boot_seconds: float | None = None
    log: Path | None = None


def in_lab() -> bool:
    """Whether this process runs inside the QEMU kernel lab (vagrant/lab sets it)."""
    return os.environ.get("STOCKADE_IN_LAB") == "1"


def strict() -> bool:
    """CI: a lab test that cannot run fails instead of skipping (same switch as kernel.require)."""
    return os.environ.get("STOCKADE_REQUIRE_KERNEL_TESTS") == "1"


_STATE = pytest.StashKey[LabSession]()


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only selected tests go to the lab
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    lab_items = [i for i in items if i.get_closest_marker("lab")]
    if in_lab():
        kernel = platform.release()
        for item in items:
            item.user_properties.append(("lab_kernel", kernel))
        return
    mode = config.getoption("--lab")
    if not lab_items or mode == "never":
        return
    lacks = host_lacks() if mode == "auto" else ["--lab always"]
    if lacks:
        config.stash[_STATE] = LabSession(
            lab_items, config.getoption("--lab-kernel"), config.getoption("--lab-timeout"), "; ".join(lacks)
        )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    lab = item.config.stash.get(_STATE, None)
    if lab is None or item not in lab.items:
        return None
    if not lab.ran:
        lab.ran = True
        run_lab(item.config, lab)
    replay(item, lab)
    # What runtestprotocol's teardown would do: drop the fixtures/collectors NEXTITEM does not
    # share, or the next host test finds the previous module still set up.
    item.session._setupstate.teardown_exact(nextitem)
    return True


def run_lab(config: pytest.Config, lab: LabSession) -> None:
    """Boot the lab once and run every selected lab test in it."""
    where = subprocess.run([sys.executable, str(LAB), "cache-dir"], capture_output=True, text=True)
    if where.returncode != 0:
        lab.cannot_run = f"{LAB} cache-dir failed: {where.stderr.strip() or where.returncode}"
        return
    cache = Path(where.stdout.strip())  # the lab's own (STOCKADE_LAB_CACHE or ~/.cache/stockade/lab)
    cache.mkdir(parents=True, exist_ok=True)
    for old in sorted(cache.glob("session-*.log"), key=lambda p: p.stat().st_mtime)[:-20]:
        old.unlink(missing_ok=True)  # keep the last 20 session logs
    tag = f"session-{os.getpid()}"
    results, report, lab.log = cache / f"{tag}.jsonl", cache / f"{tag}.report.json", cache / f"{tag}.log"
    for f in (results, report):
        f.unlink(missing_ok=True)
    if not shutil.which("qemu-system-x86_64"):
        lab.cannot_run = "the kernel lab needs QEMU (apt-get install qemu-system-x86)"
        return
    argv = [sys.executable, str(LAB), "run", "--timeout", str(lab.timeout), "--report", str(report)]
    if lab.kernel_pkg:
        argv += ["--kernel", lab.kernel_pkg]
    root = config.rootpath.resolve()
    if LAB_CHECKOUT != root and LAB_CHECKOUT not in root.parents:  # the guest runs the tests there
        argv += ["--share", str(root)]
    if LAB_CHECKOUT not in cache.parents and root not in cache.parents:  # and writes results there
        argv += ["--share", str(cache)]
    argv += [
        "--",
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-v" if config.get_verbosity() > 0 else "-q",
        "-rN",
        "--color=no",
        "-o",
        "addopts=",
        *[i.nodeid for i in lab.items],
    ]
    env = dict(os.environ, STOCKADE_LAB_RESULTS=str(results))
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"lab: {len(lab.items)} tests go to the QEMU kernel lab ({lab.why})")
    t0 = time.monotonic()
    live = reporter if reporter and config.get_verbosity() > 0 else None  # -v: stream the guest's lines
    with open(lab.log, "w") as log:
        proc = subprocess.Popen(argv, cwd=config.rootpath, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            for line in proc.stdout:  # the lab enforces lab.timeout itself and then exits
                log.write(line)
                if live:
                    live.write_line(f"lab| {line.rstrip()}")
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        finally:
            proc.stdout.close()
    info = json.loads(report.read_text()) if report.exists() else {}
    lab.kernel, lab.boot_seconds = info.get("kernel"), info.get("boot_seconds")
    for line in results.read_text().splitlines() if results.exists() else []:
        rec = json.loads(line)
        lab.results.setdefault(rec["nodeid"], []).append(rec)
    for f in (results, report):
        f.unlink(missing_ok=True)
    tail = "\n".join(lab.log.read_text(errors="replace").splitlines()[-80:])
    if lab.kernel is None and info.get("stage") == "prepare":
        lab.cannot_run = f"the kernel lab could not start: {info.get('error')}"
    elif lab.kernel is None or code in (124, 125) or not lab.results:
        lab.crashed = (
            f"the kernel lab failed (exit {code}, {time.monotonic() - t0:.0f}s): "
            f"{info.get('error') or 'no result'}\n--- lab console tail ({lab.log}) ---\n{tail}"
        )


def replay(item: pytest.Item, lab: LabSession) -> None:
    """Report the guest's outcome for ITEM as if it had run here."""
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    keywords = {k: 1 for k in item.keywords}
    records = lab.results.get(item.nodeid, [])
    reports = [report_from(item, keywords, rec) for rec in records]
    if not any(r["when"] == "teardown" for r in records):  # never ran, or the guest died during it
        done = {r.when for r in reports}
        reports += [r for r in synthetic(item, keywords, lab) if r.when not in done]
    for rep in reports:
        ihook.pytest_runtest_logreport(report=rep)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)


def report_from(item: pytest.Item, keywords: dict, rec: dict) -> pytest.TestReport:
    longrepr = rec["longrepr"]
    if isinstance(longrepr, list):  # a skip: (path, lineno, message)
        longrepr = tuple(longrepr)
    extra = {"wasxfail": rec["wasxfail"]} if "wasxfail" in rec else {}
    return pytest.TestReport(
        item.nodeid,
        item.location,
        keywords,
        rec["outcome"],
        longrepr,
        rec["when"],
        sections=[tuple(s) for s in rec["sections"]],
        duration=rec["duration"],
        user_properties=[tuple(p) for p in rec["user_properties"]],
        **extra,
    )


def synthetic(item: pytest.Item, keywords: dict, lab: LabSession) -> list[pytest.TestReport]:
    """Reports for an item the guest gave no result for: a skip or a failure of its call phase."""
    path, lineno, _ = item.location

    def rep(outcome: str, longrepr: object, when: str) -> pytest.TestReport:
        return pytest.TestReport(item.nodeid, item.location, keywords, outcome, longrepr, when)

    if lab.cannot_run and not strict():
        return [
            rep("skipped", (path, (lineno or 0) + 1, f"Skipped: {lab.cannot_run}"), "setup"),
            rep("passed", None, "teardown"),
        ]
    if lab.cannot_run:
        why = f"{lab.cannot_run} (STOCKADE_REQUIRE_KERNEL_TESTS=1)"
    else:
        why = lab.crashed or f"the kernel lab returned no result for {item.nodeid} (see {lab.log})"
    return [rep("passed", None, "setup"), rep("failed", why, "call"), rep("passed", None, "teardown")]


# --- inside the guest -----------------------------------------------------------------------


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    out = os.environ.get("STOCKADE_LAB_RESULTS")
    if not (in_lab() and out):
        return
    longrepr = report.longrepr
    rec = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "longrepr": list(longrepr)
        if isinstance(longrepr, tuple)
        else (report.longreprtext if longrepr is not None else None),
        "duration": report.duration,
        "sections": [list(s) for s in report.sections],
        "user_properties": [[k, str(v)] for k, v in report.user_properties],
    }
    if hasattr(report, "wasxfail"):
        rec["wasxfail"] = report.wasxfail
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lab = config.stash.get(_STATE, None)
    if lab is None or not lab.ran:
        return
    if lab.kernel:
        ran = sum(1 for recs in lab.results.values() if any(r["when"] == "call" for r in recs))
        terminalreporter.write_line(
            f"lab: {ran} tests ran on {lab.kernel} (QEMU, boot {lab.boot_seconds}s; log {lab.log})"
        )
    else:
        terminalreporter.write_line(f"lab: no lab tests ran: {lab.cannot_run or lab.crashed.splitlines()[0]}")
