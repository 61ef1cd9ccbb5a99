"""The cheap change check behind the Networks panel's refresh-on-open."""

from __future__ import annotations

import os
from pathlib import Path

from webui.ui.folder_watch import FolderWatch


def test_changes_in_the_folder_and_below_are_seen_once(tmp_path: Path) -> None:
    (tmp_path / "styles").mkdir()
    watch = FolderWatch(tmp_path)
    assert watch.changed()  # the first look
    assert not watch.changed()
    (tmp_path / "styles" / "new.safetensors").write_bytes(b"x")
    os.utime(tmp_path / "styles", ns=(1, 1))  # a distinct mtime, whatever the clock's grain
    assert watch.changed()
    assert not watch.changed()
    (tmp_path / "styles" / "new.safetensors").unlink()
    os.utime(tmp_path / "styles", ns=(2, 2))
    assert watch.changed()


def test_a_missing_folder_is_an_empty_stamp(tmp_path: Path) -> None:
    watch = FolderWatch(tmp_path / "absent")
    assert watch.changed()
    assert not watch.changed()
