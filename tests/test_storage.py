"""Atomic writes: the new content or the old one, never a partial file or a stray temporary."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fl_common.storage import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writes_text_bytes_and_json_into_a_new_folder(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"  # does not exist yet
    assert atomic_write_text(folder / "t.txt", "héllo\n") == folder / "t.txt"
    assert (folder / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_bytes(folder / "b.bin", b"\x00\x01")
    assert (folder / "b.bin").read_bytes() == b"\x00\x01"
    value = {"b": [1, 2.5], "a": None}
    atomic_write_json(folder / "v.json", value, indent=2, sort_keys=True, trailing_newline=True)
    text = (folder / "v.json").read_text()
    assert text == json.dumps(value, indent=2, sort_keys=True) + "\n"
    atomic_write_json(folder / "w.json", value)
    assert (folder / "w.json").read_text() == json.dumps(value)
    assert _leftovers(folder) == []


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_json(path, {"round": 1})
    atomic_write_json(path, {"round": 2})
    assert json.loads(path.read_text()) == {"round": 2}
    assert _leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_old_content_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "ledger.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(path) as handle:
        handle.write("half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    with pytest.raises(ValueError, match="not JSON compliant"):
        atomic_write_json(path, {"x": float("nan")}, allow_nan=False)
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


def test_permissions_are_set_from_the_first_moment(tmp_path: Path) -> None:
    secret = atomic_write_bytes(tmp_path / "key", b"k", permissions=0o600)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    umask = os.umask(0)
    os.umask(umask)
    public = atomic_write_text(tmp_path / "cert", "c")
    assert stat.S_IMODE(public.stat().st_mode) == 0o666 & ~umask


def test_text_mode_passes_newline_through(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    with atomic_open(path, "w", newline="") as handle:
        handle.write("a,b\r\n")
    assert path.read_bytes() == b"a,b\r\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(path, "a"):  # type: ignore[arg-type]
            pass
