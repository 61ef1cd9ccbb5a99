"""`inspect-lora` opens with one plain verdict line (what the file is, and whether this app runs
it), then the details. Tiny files built in code; module counts taken from the files' own keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.app_in_process import run_app
from tests.lora_files import write_kohya_lora
from webui.arch import Arch
from webui.networks.format.inspection import format_text, inspect_network, verdict
from webui.networks.format.network import read_network


def onetrainer_sdxl_dora(path: Path) -> None:
    """OneTrainer's names (`clip_l.`/`clip_g.`, `bundle_emb.NAME.clip_*`), DoRA on every module."""
    tensors = {}
    for encoder, width in (("clip_l", 768), ("clip_g", 1280)):
        for proj in ("q_proj", "k_proj", "v_proj"):
            prefix = f"{encoder}.text_model.encoder.layers.0.self_attn.{proj}"
            tensors[f"{prefix}.lora_down.weight"] = torch.zeros(2, width)
            tensors[f"{prefix}.lora_up.weight"] = torch.zeros(width, 2)
            tensors[f"{prefix}.alpha"] = torch.tensor(2.0)
            tensors[f"{prefix}.dora_scale"] = torch.ones(width, 1)
    tensors["bundle_emb.sks_dog.clip_l"] = torch.zeros(1, 768)
    tensors["bundle_emb.sks_dog.clip_g"] = torch.zeros(1, 1280)
    safetensors.torch.save_file(tensors, str(path))


def flux_kohya(path: Path) -> None:
    """kohya's FLUX.1 names (sd-scripts networks/lora_flux.py), rank 1 at FLUX.1's width."""
    prefix = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {
        f"{prefix}.lora_down.weight": torch.zeros(1, 3072),
        f"{prefix}.lora_up.weight": torch.zeros(9216, 1),
        f"{prefix}.alpha": torch.tensor(1.0),
    }
    safetensors.torch.save_file(tensors, str(path))


def first_line(path: Path) -> str:
    return format_text(inspect_network(read_network(path))).splitlines()[0]


def test_verdict_of_an_sdxl_onetrainer_dora_file_with_an_embedding(tmp_path: Path) -> None:
    path = tmp_path / "dog.safetensors"
    onetrainer_sdxl_dora(path)
    expected = 'SDXL LoRA, OneTrainer format, DoRA, 6 modules, 1 bundled embedding "sks_dog"'
    assert first_line(path) == expected


def test_verdict_of_a_plain_sd1_kohya_file(tmp_path: Path) -> None:
    path = tmp_path / "ink.safetensors"
    write_kohya_lora(path, Arch.SD1, {"ss_v2": "False"})  # kohya's SD1 flag
    with safetensors.safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert first_line(path) == f"SD1 LoRA, kohya format, {len(modules)} modules"
    unknown = tmp_path / "unknown.safetensors"
    write_kohya_lora(unknown, Arch.SD1, {})  # tiny widths, no metadata: nothing says SD1
    assert first_line(unknown) == f"LoRA of unknown base, kohya format, {len(modules)} modules"


def test_verdict_of_a_flux_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """FLUX.1 runs since issue 18: its files read like any other family's."""
    path = tmp_path / "flux.safetensors"
    flux_kohya(path)
    assert verdict(inspect_network(read_network(path))) == ("FLUX.1 LoRA, kohya format, 1 module")
    run = run_app(capfd, "inspect-lora", str(path))  # app.py's own main, in this process
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "FLUX.1 LoRA, kohya format, 1 module"
    assert lines[1].startswith("flux  (")  # then the details
