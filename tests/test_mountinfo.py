"""The one mountinfo parser: real mounts, including paths the kernel escapes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kernel import needs_root  # noqa: F401 - a fixture, used by name
from stockade.runtime import mountinfo

pytestmark = pytest.mark.usefixtures("needs_root")  # mounting needs root


def test_escaped_point_and_propagation_tags(tmp_path: Path) -> None:
    point = tmp_path / "a b\\c\td"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "stockade test", str(point)], check=True)
    try:
        m = mountinfo.containing(str(point / "inside"))
        assert (m.point, m.fstype, m.source, m.shared) == (str(point), "tmpfs", "stockade test", False)
        subprocess.run(["mount", "--make-shared", str(point)], check=True)
        assert mountinfo.containing(str(point)).shared
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert mountinfo.containing(str(point)).point != str(point)
