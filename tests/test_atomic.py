"""veil.atomic.atomic_write: the file and its directory are fsynced, and nothing is left half-written."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from veil import atomic
from veil.atomic import atomic_write


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    order: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        order.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        order.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_write(target, "new")

    assert order == ["fsync file", "replace", "fsync dir"]
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt("power cut"), OSError(28, "No space left on device")])
def test_a_failure_inside_the_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path,
                                                                          failure: BaseException) -> None:
    target = tmp_path / "weights.npz"
    target.write_bytes(b"old")

    def half_then_fail(fh: object) -> None:
        fh.write(b"half")  # type: ignore[attr-defined]
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, half_then_fail)

    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.npz"]


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ledger.json"
    target.write_text("old")

    def disk_full(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, "new")

    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_a_writer_function_text_and_bytes_all_round_trip(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6.0).reshape(2, 3)}
    atomic_write(tmp_path / "a.npz", lambda fh: np.savez(fh, **arrays))
    atomic_write(tmp_path / "b.txt", "é\n")
    atomic_write(tmp_path / "c.bin", b"\x00\x01")

    with np.load(tmp_path / "a.npz") as data:
        np.testing.assert_array_equal(data["w"], arrays["w"])
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"


def test_mode_sets_the_permission_bits_of_a_private_file(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "ledger.json", "{}", mode=0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
