"""`stockade profile ...`: record, generate, review, test and ship profiles.

Tables for people by default, `--json` for tools. Errors: one line on stderr, exit status 1, and no
output file left behind (every file is written atomically).
"""

from __future__ import annotations

import argparse
import os
import sys

from stockade.profiles import load_profile
from stockade.profiles.formats import dump_json, write_atomic
from stockade.profiles.model import Context, Profile
from stockade.runtime.errors import NotSupported, SpecError, StockadeError


def table(rows: list[list[object]], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def _ctx(args: argparse.Namespace) -> Context:
    caps = getattr(args, "caps", None)
    if caps is None:
        return Context()
    return Context(
        caps=tuple(
            c.strip().upper() if c.strip().upper().startswith("CAP_") else "CAP_" + c.strip().upper()
            for c in caps.split(",")
            if c.strip()
        )
    )


def _out(args: argparse.Namespace, data: object, text: str) -> None:
    sys.stdout.write(dump_json(data) if getattr(args, "json", False) else text)


def _save_profile(profile: Profile, path: str | None) -> None:
    text = dump_json(profile.to_dict())
    if path and path != "-":
        write_atomic(path, text)
    else:
        sys.stdout.write(text)


# ---------------------------------------------------------------------------------------------
# subcommands


def cmd_list(args: argparse.Namespace) -> int:
    from stockade.profiles.formats import list_named, read_profile_file

    rows, data = [], []
    for kind, path in list_named():
        p = read_profile_file(path)
        rows.append([p.name, kind, p.version, (p.description or "")[:70]])
        data.append(
            {"name": p.name, "kind": kind, "version": p.version, "description": p.description, "path": path}
        )
    _out(args, data, table(rows, ["NAME", "KIND", "VERSION", "DESCRIPTION"]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    p = load_profile(args.profile)
    if args.json:
        sys.stdout.write(dump_json(p.to_dict()))
        return 0
    print(f"name: {p.name}  version: {p.version}")
    if p.description:
        print(f"description: {p.description}")
    if p.seccomp is None:
        print("seccomp: UNCONFINED (no filter)")
        return 0
    sec = p.seccomp
    print(
        f"default: {sec.default_action}"
        + (f" errno {sec.default_errno_ret}" if sec.default_errno_ret else "")
    )
    print("architectures: " + (", ".join(sec.oci_architectures()) or "native only"))
    print(f"bpf policy: {'yes' if p.bpf_policy else 'none'}")
    rows = []
    for rule in sec.rules():
        cond = " and ".join(a.describe() for a in rule.args or [])
        when = []
        if rule.includes:
            when.append("if " + rule.includes.describe())
        if rule.excludes:
            when.append("unless " + rule.excludes.describe())
        action = rule.action + (f"({rule.errno_ret})" if rule.errno_ret is not None else "")
        rows.append([action, _short(", ".join(rule.all_names()), 60), cond, " ".join(when)])
    sys.stdout.write(table(rows, ["ACTION", "SYSCALLS", "ARGS", "CONDITION"]))
    return 0


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def cmd_lint(args: argparse.Namespace) -> int:
    from stockade.profiles.analyze import lint

    p = load_profile(args.profile)
    findings = lint(p, _ctx(args))
    rows = [[f.severity, f.code, f.where or "-", f.message] for f in findings]
    _out(
        args,
        [f.to_dict() for f in findings],
        table(rows, ["SEVERITY", "CHECK", "WHERE", "FINDING"]) if rows else f"{p.name}: no findings\n",
    )
    bad = {"error"} | ({"warning"} if args.strict else set())
    return 1 if any(f.severity in bad for f in findings) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from stockade.profiles.analyze import explain

    p = load_profile(args.profile)
    e = explain(p, _ctx(args))
    if args.json:
        sys.stdout.write(dump_json(e))
        return 0
    if e.get("unconfined"):
        print(f"{p.name}: UNCONFINED: no seccomp filter, every syscall allowed")
        return 0
    print(f"{e['name']} (version {e['version']}): everything not listed -> {e['default']}")
    print("architectures: " + (", ".join(e["architectures"]) or "native only"))
    if e["recorded"]:
        print("recorded from: " + "; ".join(" ".join(c) for c in e["recorded"]))
    print("\nRISKY (allowed):" if e["risky"] else "\nRISKY: none of the dangerous syscalls is allowed")
    if e["risky"]:
        sys.stdout.write(
            table([[r["syscall"], r["how"], r["why"]] for r in e["risky"]], ["SYSCALL", "HOW", "WHY"])
        )
    if e["conditional"]:
        print("\nArgument checks:")
        sys.stdout.write(
            table(
                [[", ".join(c["syscalls"]), c["action"], c["when"], c["comment"]] for c in e["conditional"]],
                ["SYSCALLS", "ACTION", "WHEN", "WHY"],
            )
        )
    if e["explicitDenials"]:
        print("\nExplicit denials:")
        sys.stdout.write(
            table(
                [[", ".join(d["syscalls"]), d["action"]] for d in e["explicitDenials"]],
                ["SYSCALLS", "ACTION"],
            )
        )
    if e["capabilityGated"]:
        print("\nOnly with capabilities / kernels:")
        sys.stdout.write(
            table(
                [
                    [_short(", ".join(g["syscalls"]), 60), g["when"], "yes" if g["active"] else "no"]
                    for g in e["capabilityGated"]
                ],
                ["SYSCALLS", "WHEN", "ACTIVE NOW"],
            )
        )
    print("\nAllowed by group:")
    sys.stdout.write(
        table(
            [
                [g["group"], f"{g['allowed']}/{g['of']}", _short(", ".join(g["syscalls"]), 70)]
                for g in e["groups"]
            ],
            ["GROUP", "ALLOWED", "SYSCALLS"],
        )
    )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from stockade.profiles.analyze import diff

    d = diff(load_profile(args.a), load_profile(args.b), _ctx(args))
    if args.json:
        sys.stdout.write(dump_json(d))
    else:
        if d.get("default"):
            print(f"default: {d['default']['a']} -> {d['default']['b']}")
        if d.get("architectures"):
            print(f"architectures: {d['architectures']['a']} -> {d['architectures']['b']}")
        if d.get("unconfined"):
            print("unconfined: " + ", ".join(d["unconfined"]))
        rows = [[c["change"], c["syscall"], c["a"], c["b"]] for c in d["changes"]]
        sys.stdout.write(table(rows, ["CHANGE", "SYSCALL", args.a, args.b]) if rows else "no differences\n")
    return 1 if d["changes"] or d.get("default") or d.get("architectures") or d.get("unconfined") else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from stockade.profiles.analyze import merge

    merged = merge([load_profile(p) for p in args.profiles], name=args.name)
    _save_profile(merged, args.output)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from stockade.profiles import formats

    p = load_profile(args.profile)
    ctx = _ctx(args)
    if args.format == "k8s":
        import yaml

        if args.output_dir:
            where = formats.export_k8s(p, args.output_dir, ctx)
            _out(args, where, table([[k, v] for k, v in where.items()], ["WHAT", "WHERE"]))
        else:
            sys.stdout.write(yaml.safe_dump(formats.export_spo(p, ctx), sort_keys=False))
        return 0
    if args.format == "oci":
        data = formats.export_oci(p, ctx)
        if data is None:
            raise SpecError("unconfined has no seccomp section", where=p.name)
    else:
        data = formats.export_docker(p)
    text = dump_json(data)
    if args.output and args.output != "-":
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from stockade.profiles import profile_seccomp
    from stockade.runtime.seccomp import compile_program, instruction_count

    p = load_profile(args.profile)
    oci = profile_seccomp(p, caps=_ctx(args).caps)
    if oci is None:
        raise SpecError("unconfined: nothing to compile", where=p.name)
    program = compile_program(oci, where=p.name)
    load = "skipped" if args.no_load_check else _load_check(program, oci.get("flags") or [])
    data = {
        "profile": p.name,
        "architectures": oci.get("architectures", []),
        "rules": len(oci["syscalls"]),
        "syscalls": sum(len(r["names"]) for r in oci["syscalls"]),
        "instructions": instruction_count(program),
        "bytes": len(program),
        "load": load,
    }
    if args.output:
        with open(args.output, "wb") as f:
            f.write(program)
    _out(
        args,
        data,
        table(
            [
                [
                    data["profile"],
                    ",".join(a.removeprefix("SCMP_ARCH_") for a in data["architectures"]),
                    data["rules"],
                    data["syscalls"],
                    data["instructions"],
                    load,
                ]
            ],
            ["PROFILE", "ARCHES", "RULES", "SYSCALLS", "INSTRUCTIONS", "LOAD"],
        ),
    )
    return 0 if load in ("ok", "skipped") else 1


def _load_check(program: bytes, flags: list[str]) -> str:
    """Install the filter in a throwaway child: the kernel's verdict on the program."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            from stockade.runtime.seccomp import load_program, set_no_new_privs

            set_no_new_privs()
            load_program(program, flags)
            os.write(w, b"ok")
        except OSError as e:
            os.write(w, f"failed: {e}".encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        result = f.read().decode() or "failed: child died"
    os.waitpid(pid, 0)
    return result


def cmd_record(args: argparse.Namespace) -> int:
    from stockade.profiles import record as rec
    from stockade.profiles.generate import generate, merge_recorded

    rec.ensure_root()
    if args.container:
        if args.duration is None:
            raise SpecError("--container needs --duration", where="--duration")
        from stockade.runtime import container

        status = container.status(args.root, args.container)
        if status.status not in ("created", "running"):
            raise StockadeError(
                f"container is {status.status}: nothing to record",
                where=args.container,
                hint="record a created or running container",
            )
        state = status.state
        if not state.cgroup_id:
            raise NotSupported(
                "container has no cgroup2 id in its state",
                where=args.container,
                hint="the recorder needs a cgroup2 hierarchy (e.g. /sys/fs/cgroup/unified)",
            )
        recording = rec.record_cgroup(
            state.cgroup_id, args.duration, progress=True, label=f"container:{args.container}"
        )
    else:
        cmd = _command(args.command)
        recording = rec.record(
            cmd, timeout=args.timeout, progress=True, sandbox_factory=_sandbox(args), **_quiet(args)
        )
        if recording.exit_code == 127 or not recording.syscalls:
            raise StockadeError(f"the command did not run (exit {recording.exit_code})", where=" ".join(cmd))
    recorded = recording.to_recorded()
    name = args.name or (os.path.basename(args.output).split(".")[0] if args.output else "recorded")
    previous = None
    if args.output and os.path.exists(args.output) and not args.force:
        previous = load_profile(args.output)  # several recordings merge, never overwrite
        if previous.recorded:
            recorded = merge_recorded([previous.recorded, recorded])
    base = load_profile(args.base) if args.base else None
    profile = generate(
        recorded, name, widen=args.widen, base=base, description=previous.description if previous else ""
    )
    if args.output:
        _save_profile(profile, args.output)
    rows = [[n, c] for n, c in sorted(recording.syscalls.items(), key=lambda kv: -kv[1])]
    summary = {
        "command": recording.command,
        "exitCode": recording.exit_code,
        "seconds": round(recording.seconds, 3),
        "syscalls": recording.syscalls,
        "output": args.output,
    }
    if not args.output and not args.json:
        _save_profile(profile, None)
        return 0
    _out(
        args,
        summary,
        table(rows, ["SYSCALL", "COUNT"]) + f"{len(rows)} distinct syscalls, exit "
        f"{recording.exit_code}; profile written to {args.output}\n",
    )
    return 0


def _sandbox(args: argparse.Namespace):  # noqa: ANN202 - a sandbox factory
    """A real Stockade container by default; --sandbox local for a plain child in a fresh cgroup."""
    import functools

    from stockade.profiles.record import LocalSandbox, RuntimeSandbox

    if args.sandbox == "local":
        return functools.partial(LocalSandbox, netns=args.netns)
    if args.netns:
        raise SpecError(
            "--netns is for --sandbox local",
            where="--netns",
            hint="the runtime sandbox always has its own network namespace (loopback down); "
            "add --sandbox local for loopback",
        )
    from stockade.runtime.sandbox import SandboxOptions

    flags = ("memory", "cpus", "pids", "user", "workdir", "rootfs")
    given = {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}
    options = SandboxOptions(**given, bind=args.bind, env=args.env)
    return functools.partial(RuntimeSandbox, options)


def _quiet(args: argparse.Namespace) -> dict:
    """With --json our stdout is the report: the command's own output goes to stderr."""
    return {"stdout": 2} if args.json else {}  # fd 2, whatever sys.stderr is now


def _sandbox_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sandbox",
        choices=["runtime", "local"],
        default="runtime",
        help="runtime: a Stockade container as `stockade run` makes it (default); "
        "local: a plain child process in a fresh cgroup",
    )
    p.add_argument("--netns", action="store_true", help="local: private network namespace, loopback up")
    p.add_argument(
        "--bind", action="append", default=[], metavar="SRC:DST[:ro]", help="runtime: as stockade run"
    )
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="runtime: as stockade run")
    p.add_argument("--workdir", help="runtime: working directory inside (default /)")
    p.add_argument("--user", metavar="UID[:GID]", help="runtime: user inside (default 0:0)")
    p.add_argument("--memory", help="runtime: memory limit, e.g. 256M")
    p.add_argument("--cpus", help="runtime: CPU limit")
    p.add_argument("--pids", help="runtime: process limit")
    p.add_argument("--rootfs", help="runtime: root filesystem instead of the built-in one")


def _command(cmd: list[str]) -> list[str]:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise SpecError("no command given", where="command", hint="... -- CMD ARGS")
    return cmd


def cmd_generate(args: argparse.Namespace) -> int:
    from stockade.profiles.formats import parse_text
    from stockade.profiles.generate import generate, merge_recorded

    recordeds = []
    for path in args.inputs:
        try:
            with open(path, encoding="utf-8") as f:
                data = parse_text(f.read(), path)
        except OSError as e:
            raise SpecError(f"cannot read: {e.strerror}", where=path) from None
        rec = data.get("recorded") if isinstance(data, dict) and "recorded" in data else data
        if not isinstance(rec, dict) or not isinstance(rec.get("syscalls"), dict):
            raise SpecError(
                "not a recording: no recorded syscalls",
                where=path,
                hint="give files written by `stockade profile record`",
            )
        recordeds.append(rec)
    base = load_profile(args.base) if args.base else None
    profile = generate(merge_recorded(recordeds), args.name, widen=args.widen, base=base)
    _save_profile(profile, args.output)
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from stockade.profiles import profile_seccomp
    from stockade.profiles import record as rec

    rec.ensure_root()
    p = load_profile(args.profile)
    oci = profile_seccomp(p, caps=_ctx(args).caps)
    if oci is None:
        raise SpecError("unconfined: nothing would be denied", where=p.name)
    cmd = _command(args.command)
    result = rec.run_under(
        cmd, oci, mode=args.mode, timeout=args.timeout, sandbox_factory=_sandbox(args), **_quiet(args)
    )
    if args.mode == "errno":
        denied = result.denied
    else:
        denied = {n: c for n, c in result.syscalls.items() if not _allowed(p, n, _ctx(args))}
    data = {
        "profile": p.name,
        "mode": args.mode,
        "command": cmd,
        "exitCode": result.exit_code,
        "denied": denied,
    }
    verb = "denied" if args.mode == "errno" else "would be denied"
    rows = [[n, c] for n, c in sorted(denied.items(), key=lambda kv: -kv[1])]
    text = (table(rows, ["SYSCALL", "COUNT"]) if rows else "") + (
        f"{sum(denied.values())} calls {verb} ({len(denied)} syscalls); command exited {result.exit_code}\n"
    )
    if args.json:
        sys.stdout.write(dump_json(data))
    else:
        sys.stderr.write(text)
    return 1 if denied else 0


def _allowed(p: Profile, name: str, ctx: Context) -> bool:
    from stockade.profiles.model import is_allow

    assert p.seccomp is not None
    action, _, conditional = p.seccomp.verdict(name, ctx)
    return is_allow(action) or conditional


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="stockade profile", description="record, generate, review, test and ship seccomp profiles"
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name: str, func, help_: str, profile: bool = True) -> argparse.ArgumentParser:  # noqa: ANN001
        p = sub.add_parser(name, help=help_)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if profile:
            p.add_argument("profile", help="built-in/gallery name or profile file")
        return p

    add("list", cmd_list, "built-in and gallery profiles", profile=False)
    add("show", cmd_show, "a profile's rules")
    p = add("lint", cmd_lint, "find problems: unknown names, contradictions, dangerous syscalls, ...")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument("--caps", help="capabilities to resolve conditions for (comma-separated)")
    p = add("explain", cmd_explain, "grouped summary, risky parts first")
    p.add_argument("--caps", help="capabilities to resolve conditions for (comma-separated)")
    p = add("diff", cmd_diff, "per-syscall differences between two profiles", profile=False)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--caps")
    p = add("merge", cmd_merge, "union of profiles", profile=False)
    p.add_argument("profiles", nargs="+")
    p.add_argument("--name")
    p.add_argument("--output", "-o")
    p = add("export", cmd_export, "write as OCI, Docker or Kubernetes (SPO + kubelet Localhost)")
    p.add_argument("--format", "-f", choices=["oci", "docker", "k8s"], required=True)
    p.add_argument("--output", "-o")
    p.add_argument("--output-dir", help="k8s: write the SPO resource and kubelet layout here")
    p.add_argument("--caps")
    p = add("compile", cmd_compile, "BPF instruction count and a kernel load check")
    p.add_argument("--no-load-check", action="store_true")
    p.add_argument("--output", "-o", help="write the raw BPF program here")
    p.add_argument("--caps")
    p = add("record", cmd_record, "record a command's syscalls into a minimal profile", profile=False)
    p.add_argument("--output", "-o", help="profile file (merged into when it exists)")
    p.add_argument("--base", help="start from this profile")
    p.add_argument("--name")
    p.add_argument("--widen", action="store_true", help="allow whole syscall groups that were touched")
    p.add_argument("--force", action="store_true", help="overwrite --output instead of merging")
    p.add_argument("--timeout", type=float)
    _sandbox_options(p)
    p.add_argument("--container", help="record a running container instead of a command")
    p.add_argument("--duration", type=float, help="seconds to record a container for")
    p.add_argument("--root", default="/run/stockade", help="state root of --container")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = add("generate", cmd_generate, "profile from recordings", profile=False)
    p.add_argument("inputs", nargs="+", help="recorded profiles or recording files")
    p.add_argument("--name", default="generated")
    p.add_argument("--widen", action="store_true")
    p.add_argument("--base")
    p.add_argument("--output", "-o")
    p = add("test", cmd_test, "run a command under a profile and list denials", profile=False)
    p.add_argument("--profile", "-p", default="restricted")
    p.add_argument("--mode", choices=["errno", "log"], default="errno")
    p.add_argument("--timeout", type=float)
    _sandbox_options(p)
    p.add_argument("--caps")
    p.add_argument("command", nargs=argparse.REMAINDER)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except StockadeError as e:
        sys.stderr.write(f"stockade profile: {e.render()}\n")
        return e.exit_code
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
