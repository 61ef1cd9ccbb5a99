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

FLUX_SENTENCE = (
    "tiny_flux.safetensors is a FLUX.1 LoRA (kohya format): this app runs SD1, SD2 and SDXL models"
)


def write_folder(loras: Path) -> None:
    loras.mkdir()
    # kohya's FLUX.1 names (sd-scripts networks/lora_flux.py), rank 1 at FLUX.1's width 3072
    flux = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(1, 3072),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 1),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
    }
    safetensors.torch.save_file(flux, str(loras / "tiny_flux.safetensors"))
    write_kohya_lora(loras / "ink.safetensors", Arch.SD1, {})


def test_foreign_family_is_badged_dimmed_and_explained(tmp_path: Path) -> None:
    write_folder(tmp_path / "loras")
    cache = tmp_path / "catalog.json"
    CatalogIndex(tmp_path / "loras", cache, hash_in_background=False).entries()
    index = CatalogIndex(tmp_path / "loras", cache, hash_in_background=False)  # from the cache
    entries = {e.name: e for e in index.entries()}
    assert (entries["tiny_flux"].family, entries["tiny_flux"].base) == ("FLUX.1", None)
    for model_arch in (None, Arch.SD1):
        view = NetworksView(SimpleNamespace(model=None), index, PreviewCache())  # type: ignore[arg-type]
        view.model_arch = lambda arch=model_arch: arch  # type: ignore[method-assign]
        card = view.card(entries["tiny_flux"], "", None)
        assert not card.compatible and card.reason == FLUX_SENTENCE
        html = render_card(card)
        assert "lw-incompatible" in html and ">FLUX.1</span>" in html
        assert FLUX_SENTENCE in html  # the note and the tooltip
        assert view.card(entries["ink"], "", None).compatible
        # hidden by the compatibility filter (even with no model loaded), shown on request
        assert [e.name for e in select_entries(list(entries.values()), Filters(), model_arch)] == [
            "ink"
        ]
        everything = select_entries(list(entries.values()), Filters(show_all=True), model_arch)
        assert [e.name for e in everything] == ["ink", "tiny_flux"]
    by_family = select_entries(list(entries.values()), Filters(base="FLUX.1", show_all=True), None)
    assert [e.name for e in by_family] == ["tiny_flux"]
