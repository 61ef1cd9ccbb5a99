"""The Networks tab shows every file's family, also families this app does not run: such a
card is dimmed, badged with its family and says why it is not applied (the refusal sentence);
the compatibility filter is base detection's `fits`. Files built in code, through the catalog
index and its disk cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch

from tests.lora_files import write_kohya_lora
from webui.arch import Arch
from webui.networks.library import CatalogIndex
from webui.ui.networks_cards import render_card
from webui.ui.networks_tab import Filters, NetworksView, PreviewCache, select_entries

FOREIGN_SENTENCE = (
    "tiny_sd3.safetensors is an SD3 LoRA (kohya format): "
    "this app runs SD1, SD2, SDXL and FLUX.1 models"
)


def write_folder(loras: Path) -> None:
    loras.mkdir()
    # kohya's SD3 names (sd-scripts networks/lora_sd3.py), rank 1 at SD3's width 1536
    sd3 = {
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(1, 1536),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(4608, 1),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(2.0),
    }
    safetensors.torch.save_file(sd3, str(loras / "tiny_sd3.safetensors"))
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {})


def test_foreign_family_is_badged_dimmed_and_explained(tmp_path: Path) -> None:
    write_folder(tmp_path / "loras")
    cache = tmp_path / "catalog.json"
    CatalogIndex(tmp_path / "loras", cache, hash_in_background=False).entries()
    index = CatalogIndex(tmp_path / "loras", cache, hash_in_background=False)  # from the cache
    entries = {e.name: e for e in index.entries()}
    assert (entries["tiny_sd3"].family, entries["tiny_sd3"].base) == ("SD3", None)
    for model_arch in (None, Arch.SD1):
        view = NetworksView(SimpleNamespace(model=None), index, PreviewCache())  # type: ignore[arg-type]
        view.model_arch = lambda arch=model_arch: arch  # type: ignore[method-assign]
        card = view.card(entries["tiny_sd3"], "", None)
        assert not card.compatible and card.reason == FOREIGN_SENTENCE
        html = render_card(card)
        assert "lw-incompatible" in html and ">SD3</span>" in html
        assert FOREIGN_SENTENCE in html  # the note and the tooltip
        assert view.card(entries["ink"], "", None).compatible
        # hidden by the compatibility filter (even with no model loaded), shown on request
        assert [e.name for e in select_entries(list(entries.values()), Filters(), model_arch)] == [
            "ink"
        ]
        everything = select_entries(list(entries.values()), Filters(show_all=True), model_arch)
        assert [e.name for e in everything] == ["ink", "tiny_sd3"]
    by_family = select_entries(list(entries.values()), Filters(base="SD3", show_all=True), None)
    assert [e.name for e in by_family] == ["tiny_sd3"]
