"""Issue 18: FLUX.1 LoRAs on the tiny FLUX.1 transformer. References are independent of our
mapping: kohya/XLabs/BFL-name files against each format's math on the fused BFL weight, split by
rows by hand here (q, k, v of `qkv`; q, k, v, MLP of `linear1`; the final modulation's halves
swapped); PEFT files against diffusers' own `load_lora_weights` + `fuse_lora`."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.arch import Arch, FluxVariant
from webui.engine.lora_backends import LoraBackends
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.network_set import ChosenNetwork
from webui.networks.apply.strengths import Strengths
from webui.networks.format.network import read_network
from webui.settings import LoraBackend

RANK, ALPHA = 4, 2.0
SPEC = ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV)


def _pipe(seed: int = 3):
    return build_pipeline(SPEC, seed=seed, with_vae=False)


def _hand_split(bfl: str, rows: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """A fused/renamed BFL delta as diffusers module deltas, written out by hand (BFL flux
    model.py: qkv = [q; k; v], linear1 = [q; k; v; mlp], adaLN_modulation = [shift; scale])."""
    block = bfl.split(".")[1] if "blocks" in bfl else ""
    q, k, v = rows[:hidden], rows[hidden : 2 * hidden], rows[2 * hidden : 3 * hidden]
    if bfl.endswith("img_attn.qkv"):
        d = f"transformer_blocks.{block}.attn."
        return {d + "to_q": q, d + "to_k": k, d + "to_v": v}
    if bfl.endswith("txt_attn.qkv"):
        d = f"transformer_blocks.{block}.attn."
        return {d + "add_q_proj": q, d + "add_k_proj": k, d + "add_v_proj": v}
    if bfl.endswith("linear1"):
        d = f"single_transformer_blocks.{block}."
        return {
            d + "attn.to_q": q,
            d + "attn.to_k": k,
            d + "attn.to_v": v,
            d + "proj_mlp": rows[3 * hidden :],
        }
    if bfl == "final_layer.adaLN_modulation.1":
        shift, scale = rows.chunk(2)
        return {"norm_out.linear": torch.cat([scale, shift])}
    renamed = {
        "img_mod.lin": "norm1.linear",
        "img_mlp.0": "ff.net.0.proj",
        "linear2": "proj_out",
        "modulation.lin": "norm.linear",
    }
    for tail, target in renamed.items():
        if bfl.endswith(tail):
            prefix = (
                "transformer_blocks" if bfl.startswith("double") else "single_transformer_blocks"
            )
            return {f"{prefix}.{block}.{target}": rows}
    raise AssertionError(bfl)


BFL_MODULES = (
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_attn.qkv",
    "double_blocks.0.img_mod.lin",
    "double_blocks.1.img_mlp.0",
    "single_blocks.0.linear1",
    "single_blocks.1.linear2",
    "single_blocks.1.modulation.lin",
    "final_layer.adaLN_modulation.1",
)


def _bfl_shape(transformer, bfl: str) -> tuple[int, int]:
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    parts = _hand_split(bfl, torch.zeros(1_000_000, 1), hidden)
    modules = dict(transformer.named_modules())
    rows = sum(modules[p].weight.shape[0] for p in parts)
    return rows, next(iter(modules[p] for p in parts)).weight.shape[1]


def _low_rank(seed: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], RANK, generator=g) * 0.1, torch.randn(
        RANK, shape[1], generator=g
    ) * 0.1


def _kohya(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


def _ai_toolkit(bfl: str) -> str:
    return "diffusion_model." + bfl


def _apply(pipe, path: Path, multiplier: float) -> LoraBackends:
    network = read_network(path)
    backends = LoraBackends(pipe, Arch.FLUX1)
    routed = backends.apply(
        [ChosenNetwork(network.name, network, Strengths.uniform(multiplier))], LoraBackend.AUTO
    )
    assert routed.applied and not routed.warnings, routed.warnings
    return backends


@pytest.mark.parametrize("multiplier", [1.0, 0.7])
@pytest.mark.parametrize(
    ("name", "key_of", "up", "down"),
    [
        ("kohya", _kohya, "lora_up.weight", "lora_down.weight"),
        ("ai-toolkit", _ai_toolkit, "lora_B.weight", "lora_A.weight"),
    ],
)
def test_bfl_name_lora_matches_fused_math_split_by_hand(
    tmp_path: Path,
    name: str,
    key_of: Callable[[str], str],
    up: str,
    down: str,
    multiplier: float,
) -> None:
    pipe = _pipe()
    transformer = pipe.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for i, bfl in enumerate(BFL_MODULES):
        u, d = _low_rank(i, _bfl_shape(transformer, bfl))
        key = key_of(bfl)
        tensors[f"{key}.{up}"], tensors[f"{key}.{down}"] = u, d
        scale = 1.0
        if name == "kohya":
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
            scale = ALPHA / RANK
        for path, rows in _hand_split(bfl, multiplier * scale * (u @ d), hidden).items():
            expected[f"{path}.weight"] = before[f"{path}.weight"] + rows
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    backends = _apply(pipe, path, multiplier)
    after = transformer.state_dict()
    for key, want in expected.items():
        assert (after[key] - want).abs().max() <= 1e-5 * want.abs().max(), key
    untouched = set(before) - set(expected)
    assert all(torch.equal(after[k], before[k]) for k in untouched)
    backends.restore()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


def test_xlabs_lora_lands_on_both_streams(tmp_path: Path) -> None:
    """XLabs: qkv_lora1/proj_lora1 are the image stream, qkv_lora2/proj_lora2 the text one; no
    alpha (scale 1)."""
    pipe = _pipe()
    transformer = pipe.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    tensors, expected = {}, {}
    names = {
        "qkv_lora1": ("double_blocks.1.img_attn.qkv", None),
        "qkv_lora2": ("double_blocks.1.txt_attn.qkv", None),
        "proj_lora1": (None, "transformer_blocks.1.attn.to_out.0"),
        "proj_lora2": (None, "transformer_blocks.1.attn.to_add_out"),
    }
    modules = dict(transformer.named_modules())
    for i, (xlabs, (bfl, target)) in enumerate(names.items()):
        shape = _bfl_shape(transformer, bfl) if bfl else tuple(modules[target].weight.shape)
        u, d = _low_rank(10 + i, shape)
        tensors[f"double_blocks.1.processor.{xlabs}.up.weight"] = u
        tensors[f"double_blocks.1.processor.{xlabs}.down.weight"] = d
        split = _hand_split(bfl, u @ d, hidden) if bfl else {target: u @ d}
        for p, rows in split.items():
            expected[f"{p}.weight"] = before[f"{p}.weight"] + rows
    path = tmp_path / "xlabs.safetensors"
    save_file(tensors, path)
    backends = _apply(pipe, path, 1.0)
    after = transformer.state_dict()
    for key, want in expected.items():
        assert (after[key] - want).abs().max() <= 1e-5 * want.abs().max(), key
    backends.restore()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_peft_lora_matches_diffusers_fuse(tmp_path: Path, multiplier: float) -> None:
    ours, reference = _pipe(), _pipe()
    modules = dict(ours.transformer.named_modules())
    targets = (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.1.ff.net.0.proj",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.1.proj_out",
        "single_transformer_blocks.1.attn.to_v",
    )
    tensors = {}
    for i, target in enumerate(targets):
        u, d = _low_rank(20 + i, tuple(modules[target].weight.shape))
        tensors[f"transformer.{target}.lora_A.weight"] = d
        tensors[f"transformer.{target}.lora_B.weight"] = u
    path = tmp_path / "peft.safetensors"
    # tiny widths name no family by keys alone (a 3072-wide file is FLUX.1 by its keys)
    save_file(tensors, path, metadata={"modelspec.architecture": "flux-1-dev/lora"})
    before = {k: v.clone() for k, v in ours.transformer.state_dict().items()}
    backends = _apply(ours, path, multiplier)
    reference.load_lora_weights({k: v.clone() for k, v in tensors.items()}, adapter_name="ref")
    reference.fuse_lora(components=["transformer"], lora_scale=multiplier)
    want = {k: v for k, v in reference.transformer.state_dict().items() if "lora" not in k}
    got = ours.transformer.state_dict()
    for key in got:
        stem, _, param = key.rpartition(".")
        ref_key = key if key in want else f"{stem}.base_layer.{param}"
        w = want[ref_key]
        assert (got[key] - w).abs().max() <= 1e-5 * max(w.abs().max(), 1e-12), key
    backends.restore()
    assert all(torch.equal(v, before[k]) for k, v in ours.transformer.state_dict().items())


def test_lokr_on_fused_qkv_is_split_by_rows(tmp_path: Path) -> None:
    """LoKr (LyCORIS, BFL names): ΔW = kron(w1, w2) on the fused weight, then its rows."""
    pipe = _pipe()
    transformer = pipe.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    rows, cols = _bfl_shape(transformer, "single_blocks.0.linear1")
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(2, 4, generator=g)
    w2 = torch.randn(rows // 2, cols // 4, generator=g) * 0.1
    path2 = tmp_path / "lokr2.safetensors"
    save_file(
        {
            "diffusion_model.single_blocks.0.linear1.lokr_w1": w1,
            "diffusion_model.single_blocks.0.linear1.lokr_w2": w2,
        },
        path2,
    )
    backends = _apply(pipe, path2, 0.5)
    after = transformer.state_dict()
    for p, delta in _hand_split(
        "single_blocks.0.linear1", 0.5 * torch.kron(w1, w2), hidden
    ).items():
        want = before[f"{p}.weight"] + delta
        assert (after[f"{p}.weight"] - want).abs().max() <= 1e-5 * want.abs().max(), p
    backends.restore()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


def test_sd_lora_on_flux_is_one_sentence_and_writes_nothing(tmp_path: Path) -> None:
    pipe = _pipe()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    path = tmp_path / "sd1.safetensors"
    prefix = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file(
        {
            f"{prefix}.lora_down.weight": torch.ones(4, 320, 1, 1),
            f"{prefix}.lora_up.weight": torch.ones(320, 4, 1, 1),
        },
        path,
    )
    network = read_network(path)
    routed = LoraBackends(pipe, Arch.FLUX1).apply(
        [ChosenNetwork(network.name, network, Strengths())], LoraBackend.AUTO
    )
    assert routed.warnings == ["sd1: made for SD1 (keys), not applied to this model"]
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_dora_on_fused_qkv_splits_the_magnitude_by_rows(tmp_path: Path, multiplier: float) -> None:
    """LyCORIS DoRA with the magnitude per output row ([out, 1]): the fused weight's rows are
    normed one by one, W' = merged * (m * (magnitude / |merged row| - 1) + 1), then split."""
    pipe = _pipe()
    transformer = pipe.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    bfl = "double_blocks.0.img_attn.qkv"
    u, d = _low_rank(7, _bfl_shape(transformer, bfl))
    fused = torch.cat(
        [before[f"{p}.weight"] for p in _hand_split(bfl, torch.zeros(3 * hidden, 1), hidden)]
    )
    magnitude = fused.norm(dim=1, keepdim=True) * 1.5
    key = "lora_unet_" + bfl.replace(".", "_")
    path = tmp_path / "dora.safetensors"
    save_file(
        {f"{key}.lora_up.weight": u, f"{key}.lora_down.weight": d, f"{key}.dora_scale": magnitude},
        path,
        metadata={"ss_base_model_version": "flux1"},
    )
    merged = fused + u @ d
    norm = merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    patched = merged * (multiplier * (magnitude / norm - 1) + 1)
    backends = _apply(pipe, path, multiplier)
    after = transformer.state_dict()
    for p, rows in _hand_split(bfl, patched, hidden).items():
        assert (after[f"{p}.weight"] - rows).abs().max() <= 1e-5 * rows.abs().max(), p
    backends.restore()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


def test_full_diff_and_bias_on_fused_linear1_split_by_rows(tmp_path: Path) -> None:
    """LyCORIS full layers (`diff`, `diff_b`) on BFL names: weight and bias rows both split."""
    pipe = _pipe()
    transformer = pipe.transformer
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    bfl = "single_blocks.1.linear1"
    rows, cols = _bfl_shape(transformer, bfl)
    g = torch.Generator().manual_seed(9)
    diff, diff_b = torch.randn(rows, cols, generator=g), torch.randn(rows, generator=g)
    path = tmp_path / "full.safetensors"
    key = f"diffusion_model.{bfl}"
    save_file({f"{key}.diff": diff, f"{key}.diff_b": diff_b}, path)
    backends = _apply(pipe, path, 0.7)
    after = transformer.state_dict()
    for p, part in _hand_split(bfl, 0.7 * diff, hidden).items():
        want = before[f"{p}.weight"] + part
        assert (after[f"{p}.weight"] - want).abs().max() <= 1e-5 * want.abs().max(), p
    for p, part in _hand_split(bfl, 0.7 * diff_b[:, None], hidden).items():
        want = before[f"{p}.bias"] + part[:, 0]
        assert (after[f"{p}.bias"] - want).abs().max() <= 1e-5 * want.abs().max(), p
    backends.restore()
    assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items())


def test_text_encoder_strengths_te1_clip_te2_t5(tmp_path: Path) -> None:
    """sd-scripts' FLUX.1 names: `lora_te1_` is CLIP-L, `lora_te3_` is T5 (OneTrainer: `lora_te2_`);
    `te1` scales CLIP-L, `te2` scales T5."""
    pipe = _pipe()
    clip_path = "text_model.encoder.layers.0.self_attn.q_proj"
    t5_paths = (
        "encoder.block.0.layer.0.SelfAttention.q",
        "encoder.block.1.layer.0.SelfAttention.v",
    )
    clip = dict(pipe.text_encoder.named_modules())
    clip = clip.get(clip_path) or clip[clip_path.removeprefix("text_model.")]
    t5 = dict(pipe.text_encoder_2.named_modules())
    targets = [
        ("lora_te1_" + clip_path.replace(".", "_"), clip, 0.5),
        ("lora_te3_" + t5_paths[0].replace(".", "_"), t5[t5_paths[0]], 0.25),
        ("lora_te2_" + t5_paths[1].replace(".", "_"), t5[t5_paths[1]], 0.25),
    ]
    tensors, expected = {}, []
    for i, (key, module, m) in enumerate(targets):
        u, d = _low_rank(40 + i, tuple(module.weight.shape))
        tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = u, d
        expected.append((module, module.weight.detach().clone() + m * (u @ d)))
    path = tmp_path / "te.safetensors"
    save_file(tensors, path, metadata={"ss_base_model_version": "flux1"})
    network = read_network(path)
    backends = LoraBackends(pipe, Arch.FLUX1)
    routed = backends.apply(
        [ChosenNetwork(network.name, network, Strengths(te1=0.5, te2=0.25))], LoraBackend.AUTO
    )
    assert routed.applied and not routed.warnings, routed.warnings
    for module, want in expected:
        assert (module.weight - want).abs().max() <= 1e-5 * want.abs().max()
    backends.restore()
