"""Reviewing profiles: lint, explain, diff and merge. All work on the model; only `lint` asks libseccomp
(whether each name is a syscall it knows)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from stockade.profiles.groups import DANGEROUS, ESSENTIAL, GROUPS, group_of
from stockade.profiles.model import Context, Profile, Rule, Seccomp, is_allow, native_arch
from stockade.runtime.seccomp import NEWER_SYSCALLS


@dataclass
class Finding:
    severity: str  # error | warning | info
    code: str
    message: str
    where: str = ""

    def to_dict(self) -> dict:
        return {"severity": self.severity, "code": self.code, "message": self.message, "where": self.where}


_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def lint(profile: Profile, ctx: Context | None = None) -> list[Finding]:
    ctx = ctx or Context()
    sec = profile.seccomp
    if sec is None:
        return [Finding("warning", "unconfined", "no seccomp filter at all: every syscall is allowed")]
    out: list[Finding] = []
    out += _lint_names(sec)
    out += _lint_contradictions(sec, ctx)
    out += _lint_architectures(sec)
    out += _lint_dangerous(sec, ctx)
    out += _lint_essential(sec, ctx)
    if sec.default_action in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG"):
        out.append(
            Finding(
                "warning",
                "deny-list",
                "defaultAction allows: every syscall not listed (including "
                "ones added by future kernels) is allowed; prefer an allow-list",
                "defaultAction",
            )
        )
    if sec.listener_path:
        out.append(
            Finding(
                "error",
                "unsupported",
                "listenerPath (seccomp notify) is not supported by Stockade",
                "listenerPath",
            )
        )
    return sorted(out, key=lambda f: _SEVERITY_ORDER[f.severity])


def _lint_names(sec: Seccomp) -> list[Finding]:
    import seccomp as sc

    out = []
    for i, rule in enumerate(sec.rules()):
        if rule.action == "SCMP_ACT_NOTIFY":
            out.append(Finding("error", "unsupported", "SCMP_ACT_NOTIFY is not supported", f"syscalls[{i}]"))
        newer = []
        for name in rule.all_names():
            if sc.resolve_syscall(sc.Arch.NATIVE, name) != -1:
                continue
            if name in NEWER_SYSCALLS:
                newer.append(name)
            else:
                out.append(
                    Finding(
                        "error", "unknown-syscall", f"unknown syscall name {name!r}", f"syscalls[{i}].names"
                    )
                )
        if newer:
            out.append(
                Finding(
                    "info",
                    "newer-syscall",
                    ", ".join(newer)
                    + ": newer than this libseccomp; skipped when allowed, refused in deny rules",
                    f"syscalls[{i}].names",
                )
            )
    return out


def _lint_contradictions(sec: Seccomp, ctx: Context) -> list[Finding]:
    """The same syscall given different unconditional actions, or a rule that changes nothing."""
    out = []
    seen: dict[str, tuple[int, str, int | None]] = {}
    for i, rule in enumerate(sec.rules()):
        if not rule.applies(ctx):
            continue
        same_as_default = rule.action == sec.default_action and (
            rule.errno_ret is None or rule.errno_ret == sec.default_errno_ret
        )
        if same_as_default and not rule.args:
            out.append(
                Finding(
                    "warning",
                    "redundant",
                    f"rule repeats the default action {rule.action} for " + ", ".join(rule.all_names()),
                    f"syscalls[{i}]",
                )
            )
        if rule.args:
            continue
        for name in rule.all_names():
            prev = seen.get(name)
            if prev and (prev[1], prev[2]) != (rule.action, rule.errno_ret):
                out.append(
                    Finding(
                        "error",
                        "contradiction",
                        f"{name}: syscalls[{prev[0]}] says {prev[1]} but syscalls[{i}] says "
                        f"{rule.action}{'' if rule.errno_ret is None else f'({rule.errno_ret})'}",
                        f"syscalls[{i}]",
                    )
                )
            seen.setdefault(name, (i, rule.action, rule.errno_ret))
    for i, rule in enumerate(sec.rules()):
        if rule.args and rule.applies(ctx):
            for name in rule.all_names():
                if name in seen and seen[name][1] == rule.action:
                    out.append(
                        Finding(
                            "warning",
                            "shadowed",
                            f"{name}: argument checks in syscalls[{i}] never "
                            f"matter, syscalls[{seen[name][0]}] already gives {rule.action} "
                            "unconditionally",
                            f"syscalls[{i}]",
                        )
                    )
    return out


def _lint_architectures(sec: Seccomp) -> list[Finding]:
    arches = sec.oci_architectures()
    native = native_arch()[0]
    if not arches:
        if sec.arch_map:
            return [
                Finding(
                    "warning",
                    "missing-arch",
                    f"archMap has no entry for this host ({native}): only "
                    "the native ABI is filtered, others get the bad-architecture action (kill)",
                    "archMap",
                )
            ]
        return [
            Finding(
                "warning",
                "missing-arch",
                "no architectures: only the native ABI is filtered; 32-bit "
                "x86 and x32 programs are killed instead of filtered (Docker lists x86_64 with x86 and "
                "x32)",
                "architectures",
            )
        ]
    out = []
    if native not in arches:
        out.append(
            Finding(
                "warning",
                "missing-arch",
                f"this host's architecture {native} is not listed (libseccomp adds it anyway)",
                "architectures",
            )
        )
    if "SCMP_ARCH_X86_64" in arches:
        missing = [a for a in ("SCMP_ARCH_X86", "SCMP_ARCH_X32") if a not in arches]
        if missing:
            out.append(
                Finding(
                    "info",
                    "missing-arch",
                    "x86_64 without " + " and ".join(missing) + ": such "
                    "programs are killed instead of filtered",
                    "architectures",
                )
            )
    return out


def _lint_dangerous(sec: Seccomp, ctx: Context) -> list[Finding]:
    out = []
    everything = Context(caps=tuple(_all_caps(sec)), arch=ctx.arch, kernel=ctx.kernel)
    for name, why in DANGEROUS.items():
        action, _, conditional = sec.verdict(name, ctx)
        if is_allow(action):
            if conditional:
                out.append(
                    Finding("info", "dangerous-with-args", f"{name} allowed for some arguments: {why}")
                )
            else:
                out.append(Finding("warning", "dangerous", f"{name} allowed unconditionally: {why}"))
            continue
        action, _, _ = sec.verdict(name, everything)
        if is_allow(action):
            caps = sorted(
                {
                    c
                    for r in sec.rules()
                    if name in r.all_names() and r.includes
                    for c in (r.includes.caps or [])
                }
            )
            if caps:
                out.append(
                    Finding(
                        "info",
                        "dangerous-with-cap",
                        f"{name} allowed when the container has {' or '.join(caps)}: {why}",
                    )
                )
    return out


def _all_caps(sec: Seccomp) -> set[str]:
    caps = set(Context().caps)
    for r in sec.rules():
        if r.includes and r.includes.caps:
            caps.update(r.includes.caps)
    return caps


def _lint_essential(sec: Seccomp, ctx: Context) -> list[Finding]:
    out = []
    for name in ESSENTIAL:
        action, _, conditional = sec.verdict(name, ctx)
        if not is_allow(action):
            what = "nothing could start" if name == "execve" else "processes could not exit cleanly"
            out.append(Finding("error", "blocks-essential", f"{name} is not allowed ({action}): {what}"))
    return out


# ---------------------------------------------------------------------------------------------


def explain(profile: Profile, ctx: Context | None = None) -> dict:
    """A grouped summary, risky parts first."""
    ctx = ctx or Context()
    sec = profile.seccomp
    if sec is None:
        return {"name": profile.name, "unconfined": True, "risky": [], "groups": []}
    risky = []
    for name, why in DANGEROUS.items():
        action, _, conditional = sec.verdict(name, ctx)
        if is_allow(action):
            risky.append(
                {"syscall": name, "how": "with argument checks" if conditional else "allowed", "why": why}
            )
    conditions = []
    for rule in sec.rules():
        if rule.args and rule.applies(ctx):
            conditions.append(
                {
                    "syscalls": rule.all_names(),
                    "action": rule.action,
                    "when": " and ".join(a.describe() for a in rule.args),
                    "comment": rule.comment or "",
                }
            )
    gated = []
    for rule in sec.rules():
        if rule.includes and (rule.includes.caps or rule.includes.min_kernel) and is_allow(rule.action):
            gated.append(
                {"syscalls": rule.all_names(), "when": rule.includes.describe(), "active": rule.applies(ctx)}
            )
    explicit = []
    for rule in sec.rules():
        if not is_allow(rule.action) and rule.applies(ctx):
            explicit.append(
                {"syscalls": rule.all_names(), "action": _action_text(rule.action, rule.errno_ret)}
            )
    groups = []
    names = sec.names()
    for group, members in list(GROUPS.items()) + [
        ("other", tuple(sorted(n for n in names if group_of(n) == "other")))
    ]:
        allowed = [n for n in members if is_allow(sec.verdict(n, ctx)[0])]
        if allowed or group == "other":
            if group == "other" and not allowed:
                continue
            groups.append({"group": group, "allowed": len(allowed), "of": len(members), "syscalls": allowed})
    return {
        "name": profile.name,
        "version": profile.version,
        "description": profile.description,
        "default": _action_text(sec.default_action, sec.default_errno_ret),
        "architectures": sec.oci_architectures(ctx),
        "risky": risky,
        "conditional": conditions,
        "capabilityGated": gated,
        "explicitDenials": explicit,
        "groups": groups,
        "recorded": (profile.recorded or {}).get("commands", []),
    }


def _action_text(action: str, errno: int | None) -> str:
    if action in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
        import errno as errno_mod

        code = 1 if errno is None else errno
        return f"{action}({errno_mod.errorcode.get(code, code)})"
    return action


# ---------------------------------------------------------------------------------------------


def diff(a: Profile, b: Profile, ctx: Context | None = None) -> dict:
    """Per-syscall verdict changes from a to b in `ctx`."""
    ctx = ctx or Context()
    if a.seccomp is None or b.seccomp is None:
        return {"unconfined": [p.name for p in (a, b) if p.seccomp is None], "changes": []}
    names = sorted(a.seccomp.names() | b.seccomp.names())
    changes = []
    for name in names:
        va, vb = a.seccomp.verdict(name, ctx), b.seccomp.verdict(name, ctx)
        if va != vb:
            changes.append(
                {"syscall": name, "a": _verdict_text(va), "b": _verdict_text(vb), "change": _change(va, vb)}
            )
    out = {"a": a.name, "b": b.name, "changes": changes}
    if (a.seccomp.default_action, a.seccomp.default_errno_ret) != (
        b.seccomp.default_action,
        b.seccomp.default_errno_ret,
    ):
        out["default"] = {
            "a": _action_text(a.seccomp.default_action, a.seccomp.default_errno_ret),
            "b": _action_text(b.seccomp.default_action, b.seccomp.default_errno_ret),
        }
    arches_a, arches_b = a.seccomp.oci_architectures(ctx), b.seccomp.oci_architectures(ctx)
    if arches_a != arches_b:
        out["architectures"] = {"a": arches_a, "b": arches_b}
    return out


def _verdict_text(v: tuple[str, int | None, bool]) -> str:
    return _action_text(v[0], v[1]) + (" if args match" if v[2] else "")


def _change(va: tuple, vb: tuple) -> str:
    if is_allow(va[0]) and not is_allow(vb[0]):
        return "denied"
    if not is_allow(va[0]) and is_allow(vb[0]):
        return "allowed"
    return "changed"


# ---------------------------------------------------------------------------------------------


def merge(profiles: list[Profile], name: str | None = None) -> Profile:
    """The union: rules of each profile in order, identical rules once, names already allowed
    unconditionally by an earlier rule dropped from later unconditional allow rules. The default action
    and errno come from the first profile; architectures are united; recordings are summed."""
    confined = [p for p in profiles if p.seccomp is not None]
    if len(confined) != len(profiles):
        base = next(p for p in profiles if p.seccomp is None)
        return Profile(name=name or base.name, description="merge with unconfined is unconfined")
    first = confined[0].seccomp
    assert first is not None
    sec = Seccomp(
        default_action=first.default_action,
        default_errno_ret=first.default_errno_ret,
        flags=copy.deepcopy(first.flags),
        syscalls=[],
    )
    arches = [a for p in confined for a in (p.seccomp.architectures or [])]
    if arches:
        sec.architectures = list(dict.fromkeys(arches))
    else:
        sec.arch_map = copy.deepcopy(first.arch_map)
    plain_allowed: set[str] = set()
    seen_rules: list[dict] = []
    for p in confined:
        for rule in p.seccomp.rules():
            rule = copy.deepcopy(rule)
            plain = not rule.args and not rule.includes and not rule.excludes
            if plain and is_allow(rule.action):
                rule.names = [n for n in rule.all_names() if n not in plain_allowed]
                rule.name = None
                if not rule.names:
                    continue
                plain_allowed.update(rule.names)
            d = rule.to_dict()
            if d in seen_rules:
                continue
            seen_rules.append(d)
            sec.syscalls.append(rule)
    recorded = _merge_recorded([p.recorded for p in confined if p.recorded])
    return Profile(
        name=name or confined[0].name,
        version=confined[0].version,
        description=confined[0].description,
        seccomp=sec,
        bpf_policy=next((p.bpf_policy for p in confined if p.bpf_policy), None),
        recorded=recorded,
    )


def _merge_recorded(recs: list[dict]) -> dict | None:
    if not recs:
        return None
    commands: list = []
    counts: dict[str, int] = {}
    for r in recs:
        for c in r.get("commands", []):
            if c not in commands:
                commands.append(c)
        for k, v in (r.get("syscalls") or {}).items():
            counts[k] = counts.get(k, 0) + int(v)
    return {"commands": commands, "syscalls": dict(sorted(counts.items()))}


def allow_rule(names: list[str], comment: str | None = None) -> Rule:
    return Rule(names=sorted(set(names)), action="SCMP_ACT_ALLOW", comment=comment)
