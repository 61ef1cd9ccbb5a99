"""The catalog's variant badges and the loader's variants come from one table: for a small file
of every variant (the trainers' own tensors, from test_module_math's table), the badges the
catalog reads from the header are the variants of the Network the loader builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_module_math import FORMATS, LAYERS, Format

from webui.networks.format import read_network
from webui.networks.library.header_facts import header_facts


def _write(path: Path, tensors: dict[str, torch.Tensor], prefix: str) -> Path:
    save_file({f"{prefix}.{k}": v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("case", FORMATS, ids=lambda f: f.name)
def test_catalog_badges_are_the_loaded_networks_variants(case: Format, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = case.build(LAYERS[case.layers[0]](), case.layers[0])
    path = _write(tmp_path / "one.safetensors", reference.tensors, reference.prefix)

    badges = header_facts(path).variants
    network = read_network(path)

    assert network.modules, "the fixture loads as a module"
    assert [b for b in badges if b != "dora"] == [v.value for v in network.variants]
    decomposed = any(getattr(m, "dora", None) is not None for m in network.modules.values())
    assert ("dora" in badges) == decomposed


def test_a_bare_weight_is_no_variant_for_either(tmp_path: Path) -> None:
    """A module holding only `weight` is no IA3 (that needs `on_input`): the loader rejects it,
    so the catalog shows no badge for it (the catalog's own table used to say "ia3")."""
    path = _write(tmp_path / "bare.safetensors", {"weight": torch.ones(8)}, "lora_unet_x")

    network = read_network(path)

    assert network.variants == () and list(network.unsupported) == ["lora_unet_x"]
    assert header_facts(path).variants == ()
