"""A misspelled LoRA name's warning suggests the closest catalog names."""

from __future__ import annotations

from pathlib import Path

from tests.lora_files import write_kohya_lora
from webui.arch import Arch
from webui.engine.network_set import choose_networks, did_you_mean
from webui.networks.library.catalog import NetworkCatalog
from webui.prompt import parse_prompt


def test_did_you_mean() -> None:
    assert did_you_mean("inkwash", ["ink_wash", "paper_cutout"]) == ' (did you mean "ink_wash"?)'
    assert did_you_mean("Paper_Cutuot", ["ink_wash", "paper_cutout"]) == (
        ' (did you mean "paper_cutout"?)'
    )
    assert did_you_mean("zebra", ["ink_wash", "paper_cutout"]) == ""


def test_generation_warning_suggests_the_close_name(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    write_kohya_lora(loras / "styles" / "ink_wash.safetensors", Arch.SD1, {})
    warnings: list[str] = []
    tags = parse_prompt("a cat, <lora:ink_wsh:0.5>").tags
    assert choose_networks(tags, NetworkCatalog(loras), warnings) == []
    assert len(warnings) == 1
    assert warnings[0].startswith("<lora:ink_wsh>: no LoRA file named 'ink_wsh'")
    assert warnings[0].endswith('(did you mean "ink_wash"?)')
