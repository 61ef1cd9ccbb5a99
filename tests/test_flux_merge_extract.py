"""Issue 18, item 5: `merge` and `extract` on FLUX.1. Merges are checked against the source
file's own tensors plus the kohya delta computed here on the fused BFL weight (split into q, k, v
by hand for a diffusers-layout file); extracted files against diffusers' `load_lora_weights` +
`fuse_lora` where its kohya converter runs at the tiny width (double blocks, CLIP-L), and
against the delta computed here from the file's own factors where it does not (`linear1`, whose
split diffusers hard-codes at 3072/12288, and the final modulation)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import app
from webui.arch import Arch, FluxVariant
from webui.engine.checkpoints import (
    ModelKind,
    checkpoint_from_path,
    flux_part_state,
    load_checkpoint,
    save_single_file,
)
from webui.engine.extract import (
    CombinationPart,
    ExtractionError,
    extract_combination,
    extract_difference,
)
from webui.engine.merge import MergeError, merge_checkpoint
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.families.flux1 import model as flux1
from webui.networks.apply.extract import RankRule
from webui.networks.format import write_safetensors
from webui.networks.format.network import read_network

CPU = torch.device("cpu")
COMFY = "model.diffusion_model."
CLIP_Q = "text_model.encoder.layers.0.self_attn.q_proj"
# diffusers' kohya FLUX converter infers its text-encoder format from an out_proj key: with q_proj
# alone it raises "Could not automatically infer state dict type"
CLIP_O = "text_model.encoder.layers.1.self_attn.out_proj"
CLIP = (CLIP_Q, CLIP_O)
# BFL modules the test LoRAs touch: fused (qkv, linear1), swapped halves, and plain ones
TOUCHED = (
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_attn.qkv",
    "double_blocks.0.img_mlp.0",
    "single_blocks.0.linear1",
    "final_layer.adaLN_modulation.1",
)
RANK, ALPHA = 4, 2.0


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV), seed=3)


def _kind(variant: FluxVariant = FluxVariant.DEV) -> ModelKind:
    return ModelKind(Arch.FLUX1, None, variant=variant)


def _configs(pipe, *names: str) -> dict[str, str]:
    configs = {}
    for name in names:
        config = getattr(pipe, name).config
        raw = config.to_json_string() if hasattr(config, "to_json_string") else json.dumps(config)
        configs[name] = json.loads(raw)
    return {"lora_webui.component_configs": json.dumps(configs)}


def _write_parts(pipe, models: Path) -> None:
    """The separate downloads (clip_l, t5xxl, ae) a transformer-only file needs."""
    for part in flux1.PARTS:
        target = models / part.folder / f"{part.component}.safetensors"
        write_safetensors(target, flux_part_state(pipe, part), _configs(pipe, part.component))


def _write_model(pipe, models: Path, layout: str, dtype: torch.dtype) -> Path:
    """A FLUX.1 dev file as users have them: `comfy` all-in-one (ComfyUI names), `bfl` bare
    transformer (BFL's release names), `diffusers` bare transformer (diffusers names)."""
    path = models / f"flux-{layout}.safetensors"
    if layout == "comfy":
        save_single_file(pipe, _kind(), path, embed_configs=True, dtype=dtype)
        return path
    if layout == "bfl":
        save_single_file(pipe, _kind(), path, with_parts=False, dtype=dtype)
        state = {k.removeprefix(COMFY): v for k, v in load_file(path).items()}
    else:
        state = {k: v.to(dtype) for k, v in pipe.transformer.state_dict().items()}
    write_safetensors(path, state, _configs(pipe, "transformer"))
    _write_parts(pipe, models)
    return path


def _factors(seed: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, RANK, generator=g) * 0.1, torch.randn(RANK, cols, generator=g) * 0.1


def _bfl_shapes(pipe) -> dict[str, tuple[int, int]]:
    state = {k.removeprefix(COMFY): v for k, v in _comfy_state(pipe).items()}
    return {name: tuple(state[f"{name}.weight"].shape) for name in TOUCHED}


def _comfy_state(pipe) -> dict[str, torch.Tensor]:
    from webui.engine.checkpoints import flux_state_dict

    return flux_state_dict(pipe, with_parts=False)


def _write_kohya(
    pipe, path: Path, seed: int, modules=TOUCHED, clip: bool = True
) -> dict[str, torch.Tensor]:
    """A kohya FLUX LoRA on BFL names (and CLIP-L `lora_te1_`); returns each module's delta at
    strength 1 by the format's math, (alpha / rank) up @ down, keyed by BFL name / CLIP path."""
    shapes = _bfl_shapes(pipe)
    clip_width = pipe.text_encoder.config.hidden_size
    tensors, deltas = {}, {}
    targets = [(name, "lora_unet_" + name.replace(".", "_"), shapes[name]) for name in modules]
    if clip:
        targets += [(n, "lora_te1_" + n.replace(".", "_"), (clip_width,) * 2) for n in CLIP]
    for i, (name, key, shape) in enumerate(targets):
        up, down = _factors(seed * 100 + i, *shape)
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
        deltas[name] = ALPHA / RANK * (up @ down)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
    return deltas


def _split_qkv(name: str, delta: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """By hand, BFL flux/model.py's fused rows: qkv = [q; k; v], linear1 = [q; k; v; mlp],
    final adaLN = [shift; scale] (diffusers: [scale; shift])."""
    block = name.split(".")[1] if "blocks" in name else ""
    q, k, v = delta[:hidden], delta[hidden : 2 * hidden], delta[2 * hidden : 3 * hidden]
    d = f"transformer_blocks.{block}.attn."
    if name.endswith("img_attn.qkv"):
        return {d + "to_q": q, d + "to_k": k, d + "to_v": v}
    if name.endswith("txt_attn.qkv"):
        return {d + "add_q_proj": q, d + "add_k_proj": k, d + "add_v_proj": v}
    if name.endswith("linear1"):
        s = f"single_transformer_blocks.{block}."
        return {
            s + "attn.to_q": q,
            s + "attn.to_k": k,
            s + "attn.to_v": v,
            s + "proj_mlp": delta[3 * hidden :],
        }
    if name == "final_layer.adaLN_modulation.1":
        shift, scale = delta.chunk(2)
        return {"norm_out.linear": torch.cat([scale, shift])}
    if name == "double_blocks.0.img_mlp.0":
        return {"transformer_blocks.0.ff.net.0.proj": delta}
    raise AssertionError(name)


def _hidden(pipe) -> int:
    return pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim


def _close(
    got: torch.Tensor, want: torch.Tensor, ulps: int = 0, stored: torch.dtype | None = None
) -> bool:
    """Within 1e-5 of the largest value, plus `ulps` rounding steps of the stored dtype."""
    step = torch.finfo(stored or got.dtype).eps * want.abs() * ulps
    return bool(((got.float() - want).abs() <= step + 1e-5 * want.abs().max()).all())


# -- merge --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "dtype"),
    [
        ("comfy", torch.bfloat16),
        ("bfl", torch.bfloat16),
        ("diffusers", torch.bfloat16),
        ("comfy", torch.float8_e4m3fn),
    ],
    ids=str,
)
def test_merge_keeps_the_input_layout_and_adds_the_hand_delta(
    pipe, tmp_path: Path, layout: str, dtype: torch.dtype
) -> None:
    models = tmp_path / "models"
    source = _write_model(pipe, models, layout, dtype)
    lora = tmp_path / "style.safetensors"
    deltas = _write_kohya(pipe, lora, seed=1, clip=layout == "comfy")
    out = models / "merged.safetensors"
    result = merge_checkpoint(source, [(lora, 0.7)], out)

    before, after = load_file(source), load_file(out)
    assert list(after) == list(before)  # the very keys, in the same order
    prefix = COMFY if layout == "comfy" else ""
    expected: dict[str, torch.Tensor] = {}
    for name, delta in deltas.items():
        if name in CLIP:
            key = f"text_encoders.clip_l.transformer.{name}.weight"
            expected[key] = before[key].float() + 0.7 * delta
        elif layout == "diffusers":
            for path, rows in _split_qkv(name, 0.7 * delta, _hidden(pipe)).items():
                expected[f"{path}.weight"] = before[f"{path}.weight"].float() + rows
        else:
            key = f"{prefix}{name}.weight"
            expected[key] = before[key].float() + 0.7 * delta
    widened = torch.bfloat16 if dtype is torch.float8_e4m3fn else dtype
    for key, want in expected.items():
        assert after[key].dtype is widened, key
        assert _close(after[key], want, ulps=1), key
    transformer_keys = {k for k in before if not k.startswith(("text_encoders.", "vae."))}
    for key, tensor in before.items():
        if key in expected:
            continue
        if dtype is torch.float8_e4m3fn and key in transformer_keys:
            # the changed component is written whole in bf16, which holds fp8 exactly
            assert after[key].dtype is torch.bfloat16 and torch.equal(
                after[key].float(), tensor.float()
            )
        elif dtype is torch.float8_e4m3fn and key.startswith("text_encoders.clip_l."):
            assert torch.equal(after[key].float(), tensor.float()), key
        else:
            assert after[key].dtype is tensor.dtype and torch.equal(after[key], tensor), key
    if dtype is torch.float8_e4m3fn:
        assert any("written as bf16" in note for note in result.notes)
        assert after["vae.decoder.conv_in.weight"].dtype is torch.float8_e4m3fn  # copied as is
    else:
        assert result.notes == ()
    meta = safe_open(str(out), "pt").metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev"
    assert "modelspec.prediction_type" not in meta

    # the user's path reads it back: the merged weights, whichever layout
    loaded = load_checkpoint(checkpoint_from_path(out), CPU, torch.float32)
    assert loaded.kind == _kind()
    got = loaded.pipe.transformer.state_dict()
    for name, delta in deltas.items():
        if name in CLIP:
            continue
        for path, rows in _split_qkv(name, 0.7 * delta, _hidden(pipe)).items():
            want = pipe.transformer.state_dict()[f"{path}.weight"].to(dtype).float() + rows
            assert _close(got[f"{path}.weight"], want, ulps=1, stored=widened), path


def test_merge_into_transformer_only_file_says_text_encoder_changes_are_left_out(
    pipe, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    source = _write_model(pipe, models, "bfl", torch.bfloat16)
    lora = tmp_path / "with-te.safetensors"
    _write_kohya(pipe, lora, seed=2, modules=TOUCHED[:1], clip=True)
    out = models / "merged.safetensors"
    result = merge_checkpoint(source, [(lora, 1.0)], out)
    assert list(load_file(out)) == list(load_file(source))  # still transformer-only
    assert result.notes == (
        "the LoRAs' CLIP-L text encoder changes are left out: flux-bfl.safetensors does not "
        "hold it (it is read from text_encoder.safetensors)",
    )
    assert result.notes[0] in result.warnings


def test_merge_cli_prints_the_fp8_note(pipe, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(app, "setup_logging", lambda verbose: None)  # keeps pytest's handlers
    source = _write_model(pipe, tmp_path / "models", "comfy", torch.float8_e4m3fn)
    lora = tmp_path / "l.safetensors"
    _write_kohya(pipe, lora, seed=3, modules=TOUCHED[:1], clip=False)
    out = tmp_path / "merged.safetensors"
    code = app.main(["merge", "--model", str(source), "--lora", f"{lora}:0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "into FLUX.1 dev" in printed
    assert "note: " in printed and "written as bf16" in printed


def test_sd_lora_into_flux_merge_is_one_sentence_and_writes_nothing(pipe, tmp_path: Path) -> None:
    source = _write_model(pipe, tmp_path / "models", "comfy", torch.bfloat16)
    lora = tmp_path / "sd1.safetensors"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file(
        {
            f"{key}.lora_down.weight": torch.ones(4, 320, 1, 1),
            f"{key}.lora_up.weight": torch.ones(320, 4, 1, 1),
        },
        str(lora),
    )
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeError) as info:
        merge_checkpoint(source, [(lora, 1.0)], out)
    message = str(info.value)
    assert message.startswith("flux-comfy.safetensors is FLUX.1, but sd1 is for SD1 (")
    assert message.count(". ") == 0  # one sentence
    assert not out.exists()


# -- extract ------------------------------------------------------------------------------------


def _kohya_delta(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A kohya module's delta at strength 1 from the file's own tensors."""
    up, down = tensors[f"{key}.lora_up.weight"].float(), tensors[f"{key}.lora_down.weight"].float()
    return tensors[f"{key}.alpha"].float() / down.shape[0] * (up @ down)


def test_extracted_combination_at_full_rank_matches_diffusers_and_hand_math(
    pipe, tmp_path: Path
) -> None:
    source = _write_model(pipe, tmp_path / "models", "comfy", torch.float32)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    deltas_a = _write_kohya(pipe, a, seed=4)
    deltas_b = _write_kohya(pipe, b, seed=5, modules=TOUCHED[:3], clip=False)
    parts = [
        CombinationPart(read_network(a), 0.8),
        CombinationPart(read_network(b), -0.5),
    ]
    out = tmp_path / "combined.safetensors"
    result = extract_combination(source, parts, out, RankRule(rank=128))
    assert result.overall_error < 1e-5
    combined = {
        name: 0.8 * deltas_a[name] - 0.5 * deltas_b.get(name, torch.zeros(())) for name in deltas_a
    }

    tensors = load_file(out)
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_down.weight")}
    kohya = {"lora_unet_" + n.replace(".", "_") for n in TOUCHED} | {
        "lora_te1_" + n.replace(".", "_") for n in CLIP
    }
    assert names == kohya
    for name, delta in combined.items():
        prefix = "lora_te1_" if name in CLIP else "lora_unet_"
        assert _close(_kohya_delta(tensors, prefix + name.replace(".", "_")), delta), name

    meta = safe_open(str(out), "pt").metadata()
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_base_model_version"] == "flux1"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    network = read_network(out)
    assert network.base.arch is Arch.FLUX1 and network.base.key_format == "kohya"

    # diffusers' own kohya converter + fuse, on the parts it converts at this width
    reference = copy.deepcopy(pipe)
    before_t = {k: v.clone() for k, v in reference.transformer.state_dict().items()}
    before_c = {k: v.clone() for k, v in reference.text_encoder.state_dict().items()}
    runs = {k: v for k, v in tensors.items() if "single_blocks" not in k and "final_layer" not in k}
    reference.load_lora_weights(runs, adapter_name="extracted")
    reference.fuse_lora(components=["transformer", "text_encoder"], lora_scale=1.0)
    reference.unload_lora_weights()
    after_t = reference.transformer.state_dict()
    for name in TOUCHED[:3]:
        for path, rows in _split_qkv(name, combined[name], _hidden(pipe)).items():
            key = f"{path}.weight"
            assert _close(after_t[key] - before_t[key], rows), key
    for name in CLIP:
        key = next(k for k in before_c if k.endswith(name.removeprefix("text_model.") + ".weight"))
        got = reference.text_encoder.state_dict()[key] - before_c[key]
        assert _close(got, combined[name]), name


def test_extract_from_two_flux_checkpoints(pipe, tmp_path: Path) -> None:
    models = tmp_path / "models"
    base = _write_model(pipe, models, "comfy", torch.float32)
    lora = tmp_path / "l.safetensors"
    _write_kohya(pipe, lora, seed=6, clip=True)
    tuned = models / "tuned.safetensors"
    merge_checkpoint(base, [(lora, 1.0)], tuned)
    out = tmp_path / "difference.safetensors"
    result = extract_difference(base, tuned, out, RankRule(rank=128))
    assert result.overall_error < 1e-5
    tensors = load_file(out)
    before, after = load_file(base), load_file(tuned)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(TOUCHED) + len(CLIP)
    for key in changed:
        if key.startswith(COMFY):
            name = "lora_unet_" + key.removeprefix(COMFY).removesuffix(".weight").replace(".", "_")
        else:
            inner = key.removeprefix("text_encoders.clip_l.transformer.").removesuffix(".weight")
            name = "lora_te1_" + inner.replace(".", "_")
        assert _close(_kohya_delta(tensors, name), after[key] - before[key]), key
    assert {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".alpha")} == {
        (
            "lora_unet_" + k.removeprefix(COMFY).removesuffix(".weight").replace(".", "_")
            if k.startswith(COMFY)
            else "lora_te1_"
            + k.removeprefix("text_encoders.clip_l.transformer.")
            .removesuffix(".weight")
            .replace(".", "_")
        )
        for k in changed
    }


def test_extract_from_flux_pair_of_other_sizes_or_variants_is_one_sentence(
    pipe, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    base = _write_model(pipe, models, "comfy", torch.float32)
    smaller = models / "smaller.safetensors"
    state = {k: v for k, v in load_file(base).items() if ".single_blocks.1." not in k}
    write_safetensors(smaller, state, safe_open(str(base), "pt").metadata())
    out = tmp_path / "x.safetensors"
    with pytest.raises(ExtractionError) as info:
        extract_difference(base, smaller, out, RankRule(rank=4))
    assert str(info.value) == (
        "smaller.safetensors is a FLUX.1 transformer of 2 double and 1 single blocks of width "
        "32, but flux-comfy.safetensors has 2 double and 2 single blocks of width 32: no "
        "difference to take"
    )
    schnell_pipe = build_pipeline(ModelSpec(Arch.FLUX1, variant=FluxVariant.SCHNELL), seed=3)
    schnell = models / "schnell.safetensors"
    save_single_file(schnell_pipe, _kind(FluxVariant.SCHNELL), schnell, embed_configs=True)
    with pytest.raises(ExtractionError) as info:
        extract_difference(base, schnell, out, RankRule(rank=4))
    assert str(info.value) == (
        "schnell.safetensors is FLUX.1 schnell but flux-comfy.safetensors is FLUX.1 dev: no "
        "difference to take"
    )
    assert not out.exists()


def test_inspect_lora_shows_a_kohya_flux_file(pipe, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(app, "setup_logging", lambda verbose: None)
    lora = tmp_path / "kohya.safetensors"
    _write_kohya(pipe, lora, seed=7)
    assert app.main(["inspect-lora", str(lora), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "FLUX.1 LoRA, kohya format, 7 modules"
    assert report["family"] == "FLUX.1" and report["key_formats"] == ["kohya"]
    assert report["modules_by_component"] == {"te1": 2, "unet": 5}


def _lora(name: str, rows: int = 8, down: str = "lora_down", up: str = "lora_up") -> dict:
    return {f"{name}.{down}.weight": torch.zeros(2, 8), f"{name}.{up}.weight": torch.zeros(rows, 2)}


@pytest.mark.parametrize(
    ("tensors", "components", "formats"),
    [
        (  # sd-scripts: T5 is lora_te3_
            {
                **_lora("lora_unet_double_blocks_0_img_attn_qkv", 24),
                **_lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
                **_lora("lora_te3_encoder_block_0_layer_0_SelfAttention_q"),
            },
            {"te1": 1, "te2": 1, "unet": 1},
            ["kohya"],
        ),
        (  # OneTrainer: the transformer is lora_transformer_, T5 lora_te2_
            {
                **_lora("lora_transformer_transformer_blocks_0_attn_to_q"),
                **_lora("lora_te2_encoder_block_0_layer_0_SelfAttention_q"),
            },
            {"te2": 1, "unet": 1},
            ["kohya"],
        ),
        (  # ai-toolkit / diffusers: transformer.
            _lora("transformer.transformer_blocks.0.attn.to_q", down="lora_A", up="lora_B"),
            {"unet": 1},
            ["diffusers/PEFT"],
        ),
        (  # ComfyUI-saved: diffusion_model. and text_encoders.clip_l. / t5xxl.
            {
                **_lora("diffusion_model.double_blocks.0.img_mod.lin", 48),
                **_lora("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"),
                **_lora("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"),
            },
            {"te1": 1, "te2": 1, "unet": 1},
            ["LDM", "ComfyUI"],
        ),
    ],
    ids=["sd-scripts", "onetrainer", "ai-toolkit", "comfyui"],
)
def test_inspect_counts_flux_components_by_their_strength_names(
    tmp_path: Path, tensors: dict, components: dict, formats: list
) -> None:
    """CLIP-L counts as te1, T5-XXL as te2 and the transformer as unet, as the tag's strengths
    name them, whatever prefix the trainer used."""
    from webui.networks.format import inspect_network

    path = tmp_path / "flux.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "flux1"})
    inspection = inspect_network(read_network(path))
    assert inspection.family == "FLUX.1"
    assert dict(inspection.modules_by_component) == components
    assert list(inspection.key_formats) == formats


def test_extracted_text_encoder_names_are_sd_scripts_and_map_back(pipe) -> None:
    """sd-scripts' lora_flux names: CLIP-L under lora_te1_text_model_, T5-XXL under lora_te3_
    with T5's own module names; our key map reads them back onto the same modules."""
    from webui.networks.apply import Component, KeyMap, kohya_name

    keymap = KeyMap.from_pipeline(pipe)
    for component, path, expected in [
        (
            Component.TEXT_ENCODER_2,
            "encoder.block.0.layer.0.SelfAttention.q",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        ),
        (
            Component.TEXT_ENCODER_2,
            "encoder.block.1.layer.1.DenseReluDense.wi_0",
            "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0",
        ),
        (
            Component.TEXT_ENCODER,
            "encoder.layers.0.self_attn.q_proj",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        ),
    ]:
        name = kohya_name(component, path, Arch.FLUX1, {})
        assert name == expected
        ref = keymap.resolve(name)
        assert ref is not None and ref.component is component
        assert ref.path.removeprefix("text_model.") == path
