"""SECURITY.md's promise that pickles never run code, through every reader of pickled files: a
`.pt` / `.ckpt` whose `__reduce__` would write a marker file is refused by the LoRA loader, the
catalog scan, the embedding reader and the checkpoint reader, and the marker never appears."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from webui.engine.checkpoints import CheckpointError
from webui.engine.checkpoints import read_header as read_checkpoint_header
from webui.networks.format import NetworkFileError, load_tensors
from webui.networks.library import CatalogIndex
from webui.networks.library.embedding_library import read_embedding_file


class WritesAFile:
    """What a hostile pickle does: on load, call a function of its choice (here: write a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (Path.write_text, (self.marker, "code ran"))


def hostile_pickle(path: Path, marker: Path) -> Path:
    # a real-looking state dict with the payload as one more entry
    torch.save({"lora_unet_x.lora_up.weight": torch.ones(2, 1), "evil": WritesAFile(marker)}, path)
    return path


def _lora(path: Path) -> object:
    return load_tensors(path)


def _embedding(path: Path) -> object:
    return read_embedding_file(path)


def _checkpoint(path: Path) -> object:
    return read_checkpoint_header(path)


READERS: dict[str, tuple[str, Callable[[Path], object], type[Exception]]] = {
    "lora": (".pt", _lora, NetworkFileError),
    "embedding": (".pt", _embedding, NetworkFileError),
    "checkpoint": (".ckpt", _checkpoint, CheckpointError),
}


@pytest.mark.parametrize("reader", READERS)
def test_no_pickle_reader_runs_code(tmp_path: Path, reader: str) -> None:
    suffix, read, error = READERS[reader]
    marker = tmp_path / "marker.txt"
    path = hostile_pickle(tmp_path / f"hostile{suffix}", marker)
    with pytest.raises(error, match="hostile"):
        read(path)
    assert not marker.exists()


def test_the_catalog_scan_lists_a_hostile_pickle_as_broken_without_running_it(
    tmp_path: Path,
) -> None:
    loras = tmp_path / "loras"
    loras.mkdir()
    marker = tmp_path / "marker.txt"
    hostile_pickle(loras / "hostile.pt", marker)
    index = CatalogIndex(loras, None, hash_in_background=False)
    index.refresh()
    (entry,) = index.entries()
    assert entry.error and "weights_only" in entry.error
    assert not marker.exists()


def test_the_payload_really_runs_when_unpickled_without_weights_only(tmp_path: Path) -> None:
    """The fixture is a real attack: plain `torch.load` runs it (so the tests above mean it)."""
    marker = tmp_path / "marker.txt"
    path = hostile_pickle(tmp_path / "hostile.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"
    os.remove(marker)
