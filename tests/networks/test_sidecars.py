"""Sidecar files: the user's A1111 `<name>.json` (read, and written without losing keys) and
civitai's `<name>.civitai.info`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from webui.networks.library.sidecars import (
    CivitaiInfo,
    UserMetadata,
    read_civitai_info,
    read_user_metadata,
    save_user_metadata,
    split_words,
)


@pytest.fixture
def network(tmp_path: Path) -> Path:
    path = tmp_path / "my.style.v2.safetensors"  # dots in the stem stay in sidecar names
    path.write_bytes(b"")
    return path


def write(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def test_reads_a1111_user_metadata(network: Path) -> None:
    write(
        network.with_name("my.style.v2.json"),
        {
            "description": "ink",
            "sd version": "SDXL",
            "activation text": " a, b ,, A, c d",
            "preferred weight": 0.8,
            "notes": "n",
        },
    )
    assert read_user_metadata(network) == UserMetadata(
        activation_text=("a", "b", "c d"),  # repeats and blanks dropped, first spelling kept
        preferred_weight=0.8,
        notes="n",
        sd_version="SDXL",
        description="ink",
    )


def test_a1111_unset_values(network: Path) -> None:
    write(network.with_name("my.style.v2.json"), {"preferred weight": 0, "sd version": "Unknown"})
    assert read_user_metadata(network) == UserMetadata()


def test_broken_sidecars_are_ignored(network: Path, caplog: pytest.LogCaptureFixture) -> None:
    network.with_name("my.style.v2.json").write_text("{oops", encoding="utf-8")
    write(network.with_name("my.style.v2.civitai.info"), ["not", "an", "object"])
    with caplog.at_level(logging.WARNING):
        assert read_user_metadata(network) is None
        assert read_civitai_info(network) is None
    assert len(caplog.records) == 2


def test_missing_sidecars(network: Path) -> None:
    assert read_user_metadata(network) is None
    assert read_civitai_info(network) is None


def test_reads_civitai_info(network: Path) -> None:
    write(
        network.with_name("my.style.v2.civitai.info"),
        {
            "trainedWords": ["ink wash, sumi-e", "brush", "Ink Wash", 7],
            "description": None,
            "model": {"name": "Ink", "description": "<p>Ink.</p>"},
        },
    )
    assert read_civitai_info(network) == CivitaiInfo(
        trained_words=("ink wash", "sumi-e", "brush"), description="<p>Ink.</p>"
    )


def test_save_keeps_keys_it_does_not_know(network: Path) -> None:
    sidecar = network.with_name("my.style.v2.json")
    write(
        sidecar,
        {
            "description": "kept",
            "sd version": "SD1",
            "activation text": "old",
            "preferred weight": 0.3,
            "notes": "old notes",
            "negative text": "blurry",
            "some_extension": {"nested": [1, 2]},
        },
    )
    assert save_user_metadata(network, "new words, more ", 0.9, "new notes") == sidecar
    assert json.loads(sidecar.read_text(encoding="utf-8")) == {
        "description": "kept",
        "sd version": "SD1",
        "activation text": "new words, more",
        "preferred weight": 0.9,
        "notes": "new notes",
        "negative text": "blurry",
        "some_extension": {"nested": [1, 2]},
    }


def test_save_creates_the_a1111_shape(network: Path) -> None:
    save_user_metadata(network, "", None, "")
    data = json.loads(network.with_name("my.style.v2.json").read_text(encoding="utf-8"))
    assert data == {
        "activation text": "",
        "preferred weight": 0.0,  # A1111's "not set"
        "notes": "",
        "description": "",
        "sd version": "Unknown",
    }
    assert read_user_metadata(network) == UserMetadata()


def test_save_replaces_a_broken_file(network: Path) -> None:
    network.with_name("my.style.v2.json").write_text("{oops", encoding="utf-8")
    save_user_metadata(network, "w", 1.2, "x")
    assert read_user_metadata(network) == UserMetadata(
        activation_text=("w",), preferred_weight=1.2, notes="x"
    )


def test_split_words() -> None:
    assert split_words("") == ()
    assert split_words("a,b, a ,B,c") == ("a", "b", "c")
