"""Textual-inversion embeddings of `embeddings/` show in the Networks tab as their own cards:
an "embedding" badge, the vector count, the encoders, dimmed or hidden when their width does not
fit the loaded model, and a click writes the name in the prompt (A1111's behaviour)."""

from __future__ import annotations

from pathlib import Path

import torch
from engine_settings import cpu_settings
from safetensors.torch import save_file

from webui.engine.generate import DEMO_MODEL_NAME, Engine
from webui.ui.networks_cards import render_embedding_grid
from webui.ui.networks_tab import Filters, NetworksView
from webui.ui.prompt_edit import insert_embedding


def _engine(tmp_path: Path) -> Engine:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.zeros(3, 32)}, str(folder / "inkstyle.safetensors"))
    # SDXL's pair (CLIP-L 768 + CLIP-G 1280), as A1111 and kohya write it
    save_file(
        {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)},
        str(folder / "xlstyle.safetensors"),
    )
    return Engine(
        cpu_settings(tmp_path / "models", tmp_path / "loras", tmp_path, embeddings_dir=folder)
    )


def test_an_sd1_embedding_renders_a_card_with_its_badge(tmp_path: Path) -> None:
    view = NetworksView(_engine(tmp_path), index=None, previews=None)  # type: ignore[arg-type]

    cards, hidden = view.embedding_cards(Filters(query="ink"))
    shown = render_embedding_grid(cards, hidden)

    assert [(c.name, c.vectors, c.encoders) for c in cards] == [("inkstyle", 3, ("clip",))]
    assert "data-embedding='inkstyle'" in shown
    assert ">embedding</span>" in shown and "3 vectors · CLIP" in shown


def test_embeddings_that_do_not_fit_the_model_are_hidden_or_dimmed(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    engine.load(DEMO_MODEL_NAME)
    view = NetworksView(engine, index=None, previews=None)  # type: ignore[arg-type]
    width = Engine.embedding_widths(engine.model)
    assert width is not None and len(width) == 1

    cards, hidden = view.embedding_cards(Filters())
    every, none_hidden = view.embedding_cards(Filters(show_all=True))

    fitting = [c.name for c in cards]
    assert hidden == 1 and "xlstyle" not in fitting  # SDXL's pair never fits one encoder
    assert none_hidden == 0 and {c.name: c.compatible for c in every}["xlstyle"] is False
    assert "CLIP-L+G" in render_embedding_grid(every)


def test_a_click_inserts_the_name_once() -> None:
    assert insert_embedding("", "inkstyle") == "inkstyle"
    assert insert_embedding("a fox", "inkstyle") == "a fox, inkstyle"
    assert insert_embedding("a fox, inkstyle", "inkstyle") == "a fox, inkstyle"
