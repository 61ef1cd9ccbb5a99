"""Issue 18: ComfyUI's LoraSave writes the 1-D weights of a text-encoder diff as `.diff`, T5's
RMS norms among them (`text_encoders.t5xxl.transformer.encoder.block.N.layer.M.layer_norm.diff`).
T5's norm is its own class (transformers' T5LayerNorm, not nn.LayerNorm), so it was never a target
and these keys matched nothing. The reference is ComfyUI's math for `diff`: W + strength * diff."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from webui.arch import Arch
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.networks.apply.patcher import NetworkPatcher
from webui.networks.format.network import load_network

NORM = "encoder.block.0.layer.1.layer_norm"


def test_comfyui_t5_norm_diff_lands_and_restores(tmp_path) -> None:
    torch.manual_seed(0)
    pipe = build_pipeline(ModelSpec(Arch.FLUX1))
    norm = pipe.text_encoder_2.get_submodule(NORM)
    base = norm.weight.detach().clone()
    diff = torch.linspace(-1.0, 1.0, base.numel())
    path = tmp_path / "comfy.safetensors"
    save_file({f"text_encoders.t5xxl.transformer.{NORM}.diff": diff}, path)
    patcher = NetworkPatcher(pipe, Arch.FLUX1)
    report = patcher.apply([(load_network(path), 0.7)])
    assert all(r.applied and not r.unmatched for r in report.networks)
    torch.testing.assert_close(norm.weight.detach(), base + 0.7 * diff, rtol=1e-5, atol=1e-6)
    patcher.restore()
    assert torch.equal(norm.weight.detach(), base)
