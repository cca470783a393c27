"""Reading and writing profiles: Stockade profile files (JSON or YAML), bare Docker/moby or OCI seccomp
JSON, an OCI config.json's linux.seccomp, and the Security Profiles Operator's SeccompProfile resource.
Every write is atomic (temp file + rename) so a failure leaves no partial file behind."""

from __future__ import annotations

import json
import os

from stockade.profiles.model import BUILTIN_DIR, GALLERY_DIR, KIND, Context, Profile, Seccomp
from stockade.runtime import files
from stockade.runtime.errors import SpecError

SPO_API = "security-profiles-operator.x-k8s.io/v1beta1"


def parse_text(text: str, where: str) -> object:
    """JSON or YAML; errors carry line and column."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")) or where.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"malformed JSON: {e.msg}", where=f"{where}:{e.lineno}:{e.colno}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise SpecError(f"malformed YAML: {getattr(e, 'problem', None) or e}", where=loc) from None


def profile_from_data(data: object, where: str, default_name: str, source: str = "") -> Profile:
    """Recognise what kind of document `data` is and turn it into a Profile."""
    if not isinstance(data, dict):
        raise SpecError("not a profile: expected an object at the top level", where=where)
    if data.get("kind") == KIND:
        return Profile.from_dict(data, where, source)
    if data.get("kind") == "SeccompProfile" and str(data.get("apiVersion", "")).startswith(
        "security-profiles-operator"
    ):
        spec = data.get("spec") or {}
        meta = data.get("metadata") or {}
        sec = Seccomp.from_dict({k: v for k, v in spec.items() if k != "baseProfileName"}, f"{where}.spec")
        return Profile(
            name=meta.get("name") or default_name,
            seccomp=sec,
            source=source,
            description=(meta.get("annotations") or {}).get("description", ""),
        )
    if "defaultAction" in data:
        return Profile(name=default_name, seccomp=Seccomp.from_dict(data, where), source=source)
    if "ociVersion" in data:
        sec = (data.get("linux") or {}).get("seccomp")
        if sec is None:
            return Profile(name=default_name, seccomp=None, source=source)
        sec = Seccomp.from_dict(sec, f"{where}.linux.seccomp")
        return Profile(name=default_name, seccomp=sec, source=source)
    raise SpecError(
        "not a profile: no kind StockadeProfile, defaultAction, SeccompProfile or ociVersion",
        where=where,
        hint="give a Stockade profile, a Docker/OCI seccomp JSON or an SPO resource",
    )


def read_profile_file(path: str) -> Profile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"cannot read profile: {e.strerror}", where=path) from None
    except UnicodeDecodeError:
        raise SpecError("not a profile: not UTF-8 text", where=path) from None
    name = os.path.basename(path).split(".")[0]
    return profile_from_data(parse_text(text, path), path, name, source=path)


def find_named(name: str) -> str | None:
    for directory in (BUILTIN_DIR, GALLERY_DIR):
        for ext in (".json", ".yaml"):
            path = os.path.join(directory, name + ext)
            if os.path.isfile(path):
                return path
    return None


def list_named() -> list[tuple[str, str]]:
    """(kind, path) of every built-in and gallery profile."""
    out = []
    for kind, directory in (("builtin", BUILTIN_DIR), ("gallery", GALLERY_DIR)):
        if os.path.isdir(directory):
            for entry in sorted(os.listdir(directory)):
                if entry.endswith((".json", ".yaml")):
                    out.append((kind, os.path.join(directory, entry)))
    return out


def write_atomic(path: str, text: str) -> None:
    """A profile or export file, in place at once; its directory is made if need be."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_atomic(path, text, durable=True)


def dump_json(data: object) -> str:
    return json.dumps(data, indent=2) + "\n"


# ---------------------------------------------------------------------------------------------
# export


def export_oci(profile: Profile, ctx: Context | None = None) -> dict | None:
    return None if profile.seccomp is None else profile.seccomp.resolve(ctx)


def export_docker(profile: Profile) -> dict:
    if profile.seccomp is None:
        raise SpecError("unconfined has no seccomp profile to export", where=profile.name)
    return profile.seccomp.to_dict()


def export_spo(profile: Profile, ctx: Context | None = None, namespace: str | None = None) -> dict:
    """The Security Profiles Operator SeccompProfile resource (conditions resolved: SPO has none)."""
    oci = export_oci(profile, ctx)
    if oci is None:
        raise SpecError("unconfined has no seccomp profile to export", where=profile.name)
    spec = {k: v for k, v in oci.items() if k in ("defaultAction", "architectures", "syscalls", "flags")}
    if "defaultErrnoRet" in oci:
        spec["defaultErrnoRet"] = oci["defaultErrnoRet"]
    meta: dict = {"name": k8s_name(profile.name)}
    if namespace:
        meta["namespace"] = namespace
    meta["annotations"] = {"stockade.dev/profile-version": profile.version}
    if profile.description:
        meta["annotations"]["description"] = profile.description
    return {"apiVersion": SPO_API, "kind": "SeccompProfile", "metadata": meta, "spec": spec}


def k8s_name(name: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return out[:253] or "stockade-profile"


def export_k8s(profile: Profile, out_dir: str, ctx: Context | None = None) -> dict[str, str]:
    """Write the SPO resource and the kubelet Localhost layout under out_dir; returns what went where.

    kubelet reads Localhost profiles relative to <root-dir>/seccomp (default /var/lib/kubelet/seccomp), so
    `kubelet/seccomp/profiles/<name>.json` goes to /var/lib/kubelet/seccomp/profiles/<name>.json and the pod
    asks for it with securityContext.seccompProfile {type: Localhost, localhostProfile: profiles/<name>.json}.
    """
    import yaml

    name = k8s_name(profile.name)
    spo_path = os.path.join(out_dir, f"seccompprofile-{name}.yaml")
    local_rel = f"profiles/{name}.json"
    local_path = os.path.join(out_dir, "kubelet", "seccomp", local_rel)
    spo = export_spo(profile, ctx)
    write_atomic(spo_path, yaml.safe_dump(spo, sort_keys=False))
    write_atomic(local_path, dump_json(export_oci(profile, ctx)))
    pod = {"securityContext": {"seccompProfile": {"type": "Localhost", "localhostProfile": local_rel}}}
    write_atomic(os.path.join(out_dir, "pod-securitycontext.yaml"), yaml.safe_dump(pod, sort_keys=False))
    return {"seccompProfile": spo_path, "localhost": local_path, "localhostProfile": local_rel}
