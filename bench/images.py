"""Images: pull + unpack against skopeo + umoci, and `stockade run --image` cold start against
`podman run --runtime runc`, from the same run.

Pull: a four-layer image of about 100 MiB (gzip layers, half random, half text-like) pushed to
Debian's docker-registry on a loopback port; each round pulls into an empty store:
`stockade image pull` against `skopeo copy docker://... oci:DIR` + `umoci unpack` (both Debian).
Cold start: a busybox image in each tool's own store; `stockade run --image IMG -- /bin/true`
(user namespace, restricted seccomp, limits, BPF policy through the agent) against
`podman run --rm --runtime runc --network none IMG /bin/true` (podman's storage in a directory of
the benchmark's own). Rounds alternate the tools; medians in ms. Run as root after ./scripts/setup.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import as_root, parser, report  # bench/report.py (this directory is the script's path)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' image builders and registry runner

from bundles import make_rootfs  # noqa: E402
from images import PATH_ENV, Registry, oci_archive, tar_of  # noqa: E402

BIN = HERE.parent / ".venv" / "bin"
LAYER_MIB = 25


def big_layers(tmp: Path, count: int = 4) -> list[tuple[bytes, str]]:
    """COUNT layers of LAYER_MIB each: half random bytes, half repetitive text (gzip halves it)."""
    rng = random.Random(7)
    layers = []
    for n in range(count):
        root = tmp / f"layer{n}"
        (root / f"data{n}").mkdir(parents=True)
        for i in range(LAYER_MIB):
            body = rng.randbytes(1 << 19) + (f"line {i} of layer {n}\n" * 30000)[: 1 << 19].encode()
            (root / f"data{n}" / f"file{i}").write_bytes(body)
        layers.append((tar_of(root), "gzip"))
    return layers


def timed(cmd: list[str], **kw) -> float:  # noqa: ANN003
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr}")
    return elapsed


def pull_round(work: Path, ref: str, host: str) -> dict[str, float]:
    out = {}
    order = ["stockade", "skopeo+umoci"]
    random.shuffle(order)
    for tool in order:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        if tool == "stockade":
            out[tool] = timed([str(BIN / "stockade"), "image", "--store", str(work / "store"), "pull",
                               "--insecure-registry", host, ref])
        else:
            layout = f"{work}/layout:v1"
            out[tool] = timed(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                               f"oci:{layout}"]) + timed(["umoci", "unpack", "--image", layout,
                                                          str(work / "bundle")])
    return out


def bench_pull(tmp: Path, rounds: int) -> dict:
    (tmp / "registry").mkdir(parents=True)
    registry = Registry(tmp / "registry")
    try:
        archive = oci_archive(tmp / "big.tar", "localhost/bench/big:v1", big_layers(tmp / "build"),
                              {"Env": [PATH_ENV], "Cmd": ["true"]})
        registry.push(archive, "bench/big:v1")
        size = sum(p.stat().st_size for p in (registry.data).rglob("*") if p.is_file())
        ref = f"{registry.host}/bench/big:v1"
        samples: dict[str, list[float]] = {"stockade": [], "skopeo+umoci": []}
        pull_round(tmp / "work", ref, registry.host)  # warm-up
        for _ in range(rounds):
            for tool, ms in pull_round(tmp / "work", ref, registry.host).items():
                samples[tool].append(ms)
        shutil.rmtree(tmp / "work", ignore_errors=True)
        return {"registry_bytes": size, **_summary(samples, "skopeo+umoci")}
    finally:
        registry.stop()


def bench_run(tmp: Path, rounds: int) -> dict:
    tmp.mkdir(parents=True)
    rootfs = make_rootfs(tmp / "rootfs")
    archive = oci_archive(tmp / "bb.tar", "localhost/bench/busybox:v1", [(tar_of(rootfs), "gzip")],
                          {"Env": [PATH_ENV], "Cmd": ["/bin/sh"]})
    store = tmp / "store"
    store.mkdir(mode=0o711)
    tmp.chmod(0o711)
    stockade = str(BIN / "stockade")
    subprocess.run([stockade, "image", "--store", str(store), "import", str(archive)], check=True,
                   capture_output=True)
    runroot = tempfile.mkdtemp(prefix="sbpm-", dir="/run")  # podman wants a runroot under 50 characters
    podman = ["podman", "--root", str(tmp / "podman"), "--runroot", runroot]
    loaded = subprocess.run([*podman, "pull", f"oci-archive:{archive}"], capture_output=True, text=True)
    if loaded.returncode != 0:
        raise SystemExit(f"podman pull: {loaded.stderr}")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    commands = {
        "stockade run --image": [stockade, "run", "--allow-degraded", "--image-store", str(store),
                                 "--image", "localhost/bench/busybox:v1", "--", "/bin/true"],
        "podman run --runtime runc": [*podman, "run", "--rm", "--runtime", "runc", "--network", "none",
                                      "--ulimit", f"nofile={min(hard, 1024)}", "--ulimit",
                                      f"nproc={min(nproc, 4096)}", "localhost/bench/busybox:v1", "/bin/true"],
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    try:
        for n in range(rounds + 2):
            names = list(commands)
            random.shuffle(names)
            for name in names:
                ms = timed(commands[name], stdin=subprocess.DEVNULL)
                if n >= 2:  # two warm-up rounds
                    samples[name].append(ms)
    finally:
        subprocess.run([*podman, "rm", "-af"], capture_output=True)
        subprocess.run([*podman, "rmi", "-af"], capture_output=True)
        subprocess.run(["umount", "-R", str(tmp / "podman")], capture_output=True)
        shutil.rmtree(runroot, ignore_errors=True)
    return _summary(samples, "podman run --runtime runc")


def _summary(samples: dict[str, list[float]], reference: str) -> dict:
    ref = statistics.median(samples[reference])
    return {name: {"median_ms": round(statistics.median(v), 1), "min_ms": round(min(v), 1),
                   "max_ms": round(max(v), 1), f"vs_{reference}": round(statistics.median(v) / ref, 2),
                   "runs": len(v)} for name, v in samples.items()}


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--pull-rounds", type=int, default=5)
    p.add_argument("--run-rounds", type=int, default=20)
    p.add_argument("--only", choices=("pull", "run"))
    args = as_root(p)
    started = subprocess.run([str(BIN / "stockade"), "agent"], capture_output=True).returncode == 0
    tools = ("skopeo", "umoci", "podman", "runc")
    result: dict = {"versions": {name: subprocess.run([name, "--version"], capture_output=True, text=True)
                                 .stdout.strip().splitlines()[0] for name in tools}}
    try:
        with tempfile.TemporaryDirectory(prefix="stockade-bench-images-", dir="/var/tmp") as tmp:
            os.chmod(tmp, 0o711)  # the container's root passes through to its root filesystem
            if args.only != "run":
                result["pull"] = bench_pull(Path(tmp) / "pull", args.pull_rounds)
            if args.only != "pull":
                result["run_image"] = bench_run(Path(tmp) / "run", args.run_rounds)
    finally:
        if started:
            subprocess.run([str(BIN / "stockade"), "agent", "--stop"], capture_output=True)
    return report(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
