"""Kernel-feature gates for tests: skip normally, fail when CI demands kernel tests.

`require(condition, reason)` skips (or fails under STOCKADE_REQUIRE_KERNEL_TESTS=1);
`strict()` says whether that variable is set; `in_lab()` is true inside the QEMU lab guest
(vagrant/lab sets STOCKADE_IN_LAB=1). `needs_root` is a fixture for modules whose every test
needs root: import it and set `pytestmark = pytest.mark.usefixtures("needs_root")`.
"""

from __future__ import annotations

import os

import pytest


def strict() -> bool:
    return os.environ.get("STOCKADE_REQUIRE_KERNEL_TESTS") == "1"


def in_lab() -> bool:
    return os.environ.get("STOCKADE_IN_LAB") == "1"


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if strict():
        pytest.fail(f"required kernel feature missing: {reason}")
    pytest.skip(reason)


@pytest.fixture
def needs_root() -> None:
    """The test runs as root, as the README's test command and CI do: skip as another user, fail
    under STOCKADE_REQUIRE_KERNEL_TESTS=1."""
    require(os.geteuid() == 0, "needs root")
