"""Tag names resolve to files below loras/: path, file name, case, and the ss_output_name alias."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from webui.networks.library.catalog import NetworkCatalog, UnknownNetworkError


def write(path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        {"lora_unet_x.alpha": torch.tensor(1.0)}, str(path), metadata=metadata
    )


@pytest.fixture
def catalog(tmp_path: Path) -> NetworkCatalog:
    write(tmp_path / "styles" / "Ink.safetensors", {"ss_output_name": "inkwash_v2"})
    write(tmp_path / "chars" / "ink.safetensors")
    write(tmp_path / "solo.safetensors")
    (tmp_path / "notes.txt").write_text("not a network")
    return NetworkCatalog(tmp_path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("styles/Ink", "styles/Ink"),  # path below loras/
        ("chars/ink", "chars/ink"),
        ("Ink", "styles/Ink"),  # exact file name wins over the case-insensitive match
        ("ink", "chars/ink"),
        ("SOLO", "solo"),  # case-insensitive when unambiguous
        ("InkWash_V2", "styles/Ink"),  # the trainer's ss_output_name
        ("styles\\Ink", "styles/Ink"),  # Windows separators
    ],
)
def test_resolves(catalog: NetworkCatalog, name: str, expected: str) -> None:
    assert catalog.resolve(name).name == expected


def test_ambiguous_name_asks_for_the_folder(tmp_path: Path) -> None:
    write(tmp_path / "a" / "Same.safetensors")
    write(tmp_path / "b" / "Same.safetensors")
    with pytest.raises(UnknownNetworkError, match=r"matches several files \(a/Same, b/Same\)"):
        NetworkCatalog(tmp_path).resolve("same")


def test_unknown_name(catalog: NetworkCatalog) -> None:
    with pytest.raises(UnknownNetworkError, match="no LoRA file named 'nothere'"):
        catalog.resolve("nothere")
    assert [f.name for f in catalog.files] == ["chars/ink", "solo", "styles/Ink"]
