"""The gallery never rots: each recorded profile replays its own command under itself."""

from __future__ import annotations

import functools
import os
import shutil

import pytest
from kernel import require
from leftovers import new_since, snapshot
from stockade.profiles import load_profile, profile_seccomp
from stockade.profiles.analyze import lint
from stockade.profiles.formats import list_named
from stockade.profiles.record import LocalSandbox, run_under

GALLERY = [os.path.basename(path).split(".")[0] for kind, path in list_named() if kind == "gallery"]


def test_gallery_is_not_empty():
    assert {"python3-script", "busybox-httpd", "gcc-compile", "git-clone"} <= set(GALLERY)


@pytest.mark.parametrize("name", GALLERY)
def test_gallery_profile_lints_clean(name):
    profile = load_profile(name)
    assert profile.recorded and profile.recorded["commands"]
    assert "command" in profile.extra["gallery"]
    assert not [f for f in lint(profile) if f.severity == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("name", GALLERY)
def test_gallery_replays_under_its_profile(name, tmp_path, monkeypatch):
    try:
        import bcc  # noqa: F401

        have_bcc = True
    except ImportError:
        have_bcc = False
    require(have_bcc and os.geteuid() == 0, "replaying needs root and bcc")
    monkeypatch.setenv("STOCKADE_CACHE_DIR", str(tmp_path / "cache"))
    profile = load_profile(name)
    meta = profile.extra["gallery"]
    for tool in ("gcc", "git", "busybox"):
        if tool in " ".join(meta["command"]):  # setup installs gcc and busybox; git made the checkout
            require(shutil.which(tool) is not None, f"{tool} is not installed")
    before = snapshot()
    out = tmp_path / "stdout"
    with open(out, "w") as f:
        result = run_under(
            meta["command"],
            profile_seccomp(profile),
            timeout=120,
            sandbox_factory=functools.partial(LocalSandbox, netns=meta.get("netns", False)),
            stdout=f.fileno(),
        )
    assert result.exit_code == 0, f"denied: {result.denied}"
    assert meta["expectOutput"] in out.read_text()
    assert _mine(new_since(before)) == {}


def _mine(new: dict) -> dict:
    """Kernel objects these tests create: stockade-rec-* cgroups and mounts (other helpers' processes
    on this shared machine are not ours to judge)."""
    return {k: v for k, v in new.items() if k in ("cgroups", "mounts")}
