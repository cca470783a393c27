"""Stockade: profiles (seccomp + BPF policy bundles) and the `stockade profile` CLI.

The container start path uses only `load_profile` and `profile_seccomp`; they import json and the
model, never libseccomp or bcc.
"""

from __future__ import annotations

import os

from stockade.profiles.model import Context, Profile, Seccomp
from stockade.runtime.errors import SpecError

__all__ = ["Context", "Profile", "Seccomp", "load_profile", "profile_seccomp", "main"]


def load_profile(name_or_path: str) -> Profile:
    """A built-in or gallery profile by name, or a profile file (Stockade, Docker/OCI seccomp JSON,
    SPO SeccompProfile, or an OCI config.json)."""
    from stockade.profiles import formats

    if not name_or_path:
        raise SpecError("empty profile name", hint="runtime-default, restricted, unconfined or a file")
    looks_like_path = os.sep in name_or_path or name_or_path.endswith((".json", ".yaml", ".yml"))
    if looks_like_path or os.path.isfile(name_or_path):
        if not os.path.isfile(name_or_path):
            raise SpecError("profile file does not exist", where=name_or_path)
        return formats.read_profile_file(name_or_path)
    path = formats.find_named(name_or_path)
    if path is None:
        names = sorted(os.path.basename(p).split(".")[0] for _, p in formats.list_named())
        raise SpecError(
            f"unknown profile {name_or_path!r}",
            where="profile",
            hint="one of " + ", ".join(names) + ", or a file path",
        )
    return formats.read_profile_file(path)


def profile_seccomp(
    profile: Profile,
    *,
    caps: list[str] | tuple[str, ...] | None = None,
    arch: str | None = None,
    kernel: str | None = None,
) -> dict | None:
    """The OCI LinuxSeccomp dict for config.json (None for unconfined).

    Capability, architecture and kernel conditions of the Docker format are resolved for `caps` (default:
    the OCI default capability set), the Go arch name `arch` and kernel release `kernel` (default: this
    host's).
    """
    if profile.seccomp is None:
        return None
    ctx = Context(
        **{
            k: v
            for k, v in (
                ("caps", tuple(caps) if caps is not None else None),
                ("arch", arch),
                ("kernel", kernel),
            )
            if v is not None
        }
    )
    return profile.seccomp.resolve(ctx)
