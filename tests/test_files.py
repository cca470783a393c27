"""The one atomic write: whole files only, no temporary left behind, threads never collide."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from stockade.runtime.files import write_atomic


def test_concurrent_writers_leave_one_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    payloads = [bytes([65 + i]) * 100_000 for i in range(8)]
    threads = [threading.Thread(target=write_atomic, args=(target, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["state.json"]
    assert target.stat().st_mode & 0o777 == 0o600


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, "old", 0o644, durable=True)
    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f"]
    assert target.stat().st_mode & 0o777 == 0o644
