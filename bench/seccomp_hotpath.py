"""Per-syscall cost of Stockade's seccomp filters, in one run:

  none             no filter
  runtime-default  Stockade's runtime-default (libseccomp binary tree)
  restricted       Stockade's restricted
  generated        a minimal profile recorded from the loop program itself
  runc-default     runc running the same loop with the Docker default profile (compiled by runc)

for a getppid loop and an openat/close loop (bench/seccomp_loop.c, raw syscall(2) calls).
Goal: generated <= runc-default on both loops, and within 5% of none on open/close.

usage (root): .venv/bin/python bench/seccomp_hotpath.py [--iterations N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LOOP_SRC = os.path.join(HERE, "seccomp_loop.c")


def build(workdir: str) -> str:
    exe = os.path.join(workdir, "seccomp_loop")
    # static: runs unchanged inside runc's minimal rootfs
    subprocess.run(["gcc", "-O2", "-static", "-o", exe, LOOP_SRC], check=True)
    return exe


def run_local(exe: str, mode: str, n: int, program: bytes | None) -> float:
    from stockade.runtime.seccomp import load_program, set_no_new_privs

    def hook() -> None:
        if program is not None:
            set_no_new_privs()
            load_program(program, [])

    out = subprocess.run(
        [exe, mode, str(n)], preexec_fn=hook, close_fds=False, capture_output=True, text=True, check=True
    )
    return float(out.stdout)


def runc_bundle(workdir: str, exe: str, seccomp: dict) -> str:
    bundle = os.path.join(workdir, "bundle")
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(os.path.join(rootfs, "dev"), exist_ok=True)
    shutil.copy(exe, os.path.join(rootfs, "seccomp_loop"))
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        config = json.load(f)
    config["process"]["terminal"] = False
    config["root"]["readonly"] = True
    config["linux"]["seccomp"] = seccomp
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(config, f)
    return bundle


def run_runc(bundle: str, mode: str, n: int) -> float:
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["process"]["args"] = ["/seccomp_loop", mode, str(n)]
    with open(path, "w") as f:
        json.dump(config, f)
    cid = f"stockade-bench-{os.getpid()}"
    out = subprocess.run(["runc", "run", "--bundle", bundle, cid], capture_output=True, text=True)
    subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
    if out.returncode != 0:
        raise RuntimeError(f"runc failed: {out.stderr.strip()}")
    return float(out.stdout)


def generated_profile(exe: str, n: int) -> dict:
    from stockade.profiles import profile_seccomp
    from stockade.profiles.generate import generate, merge_recorded
    from stockade.profiles.record import record

    recs = [
        record([exe, mode, str(n)], stdout=subprocess.DEVNULL).to_recorded()
        for mode in ("getppid", "openclose")
    ]
    return profile_seccomp(generate(merge_recorded(recs), "seccomp-loop"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--no-runc", action="store_true")
    args = ap.parse_args(argv)

    from stockade.profiles import load_profile, profile_seccomp
    from stockade.runtime.seccomp import compile_program

    with tempfile.TemporaryDirectory(prefix="stockade-bench-") as workdir:
        os.environ.setdefault("STOCKADE_CACHE_DIR", os.path.join(workdir, "cache"))
        exe = build(workdir)
        rd = profile_seccomp(load_profile("runtime-default"))
        configs: dict[str, object] = {
            "none": None,
            "runtime-default": compile_program(rd),
            "restricted": compile_program(profile_seccomp(load_profile("restricted"))),
            "generated": compile_program(generated_profile(exe, 1000)),
        }
        bundle = None
        if not args.no_runc and shutil.which("runc"):
            bundle = runc_bundle(workdir, exe, rd)
            configs["runc-default"] = "runc"
        results: dict[str, dict[str, float]] = {name: {} for name in configs}
        for mode, n in (("getppid", args.iterations), ("openclose", args.iterations // 4)):
            samples: dict[str, list[float]] = {name: [] for name in configs}
            for _ in range(args.repeat):  # interleaved so drift hits every config alike
                for name, program in configs.items():
                    if program == "runc":
                        samples[name].append(run_runc(bundle, mode, n))
                    else:
                        samples[name].append(run_local(exe, mode, n, program))
            for name in configs:
                results[name][mode] = statistics.median(samples[name])
    base = results["none"]
    report = {
        name: {mode: {"ns": round(v, 2), "ratio": round(v / base[mode], 3)} for mode, v in r.items()}
        for name, r in results.items()
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'config':16} {'getppid ns':>11} {'x none':>7} {'open/close ns':>14} {'x none':>7}")
        for name, r in report.items():
            g, o = r["getppid"], r["openclose"]
            print(f"{name:16} {g['ns']:11.1f} {g['ratio']:7.3f} {o['ns']:14.1f} {o['ratio']:7.3f}")
        if "runc-default" in report:
            gen, runc = report["generated"], report["runc-default"]
            ok = all(gen[m]["ns"] <= runc[m]["ns"] * 1.02 for m in ("getppid", "openclose"))
            print(
                f"\ngenerated no slower than runc-default (2% noise): {'yes' if ok else 'NO'}; "
                f"open/close within 5% of none: {'yes' if gen['openclose']['ratio'] <= 1.05 else 'NO'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
