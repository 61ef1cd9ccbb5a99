"""Writes the corpus listings (tests/corpus/<family>/<name>.json).

Three kinds of listing, each naming its public source:
- copied: key -> shape dicts of real public LoRAs held as test fixtures by a peer (InvokeAI),
  read from a local checkout given with `--invokeai PATH` (skipped without it);
- listed: key names from a public listing (an issue log, a peer's description of a real file),
  with each tensor's shape read off the full-size architecture the file was made for;
- generated: a trainer's naming rule (cited) applied to the real modules of the full-size
  architecture, where a real file holds thousands of keys in that spelling.

Run from the repository root: `python tests/corpus/build.py [--invokeai PATH]`."""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (1, 2)]

from corpus_layouts import CORPUS, Shapes, meta_model  # noqa: E402

from webui.arch import Arch  # noqa: E402
from webui.layouts.unet import unet_module_names  # noqa: E402

RANK = 2
KOHYA = "kohya-ss/sd-scripts networks/lora.py (module path, dots -> '_', lora_unet_/lora_te*_)"
KOHYA_LDM = "kohya-ss/sd-scripts sdxl_model_util.py + networks/lora.py (SGM/LDM UNet names)"
DIFFUSERS_KOHYA = (
    "huggingface/diffusers src/diffusers/utils/state_dict_utils.py convert_state_dict_to_kohya"
)
PEFT = "huggingface/diffusers save_lora_weights (PEFT: unet./text_encoder., lora_A/lora_B)"
ONETRAINER = "Nerogar/OneTrainer modules/util/convert/lora/convert_sdxl_lora.py, convert_clip.py"
LYCORIS = "KohakuBlueleaf/LyCORIS lycoris/wrapper.py (LycorisNetwork, prefix 'lycoris')"
LYCORIS_KOHYA = "KohakuBlueleaf/LyCORIS lycoris/kohya.py + modules/loha.py, lokr.py (kohya names)"
ATTN_PROC = "https://github.com/Comfy-Org/ComfyUI/issues/1144 (processor.to_q_lora keys)"
TRAINERS = {
    "kohya": "kohya sd-scripts",
    "kohya_ldm": "kohya sd-scripts",
    "diffusers_kohya": "diffusers convert_state_dict_to_kohya",
    "peft": "diffusers/PEFT",
    "onetrainer": "OneTrainer",
    "lycoris": "LyCORIS wrapper",
    "attn_proc": "diffusers < 0.21 attention processors",
    "loha": "LyCORIS (kohya names)",
    "lokr": "LyCORIS (kohya names)",
    "kohya_te_only": "kohya sd-scripts",
}
_UNET = (
    "attn1.to_k",
    "attn2.to_k",
    "attn1.to_out.0",
    "proj_in",
    "ff.net.2",
    "conv1",
    "time_emb_proj",
)
_TEXT = ("self_attn.q_proj", "mlp.fc1", "text_projection")


def _targets(model: torch.nn.Module, wanted: tuple[str, ...] | None) -> Shapes:
    return {
        path: tuple(m.weight.shape)
        for path, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and (wanted is None or path.endswith(wanted))
    }


def _lora(prefix: str, shape: tuple[int, ...]) -> Shapes:
    out_f, in_f, *kernel = shape
    return {
        f"{prefix}.lora_down.weight": (RANK, in_f, *kernel),
        f"{prefix}.lora_up.weight": (out_f, RANK, *([1] * len(kernel))),
        f"{prefix}.alpha": (),
    }


def _peft(prefix: str, shape: tuple[int, ...]) -> Shapes:
    out_f, in_f, *kernel = shape
    return {
        f"{prefix}.lora_A.weight": (RANK, in_f, *kernel),
        f"{prefix}.lora_B.weight": (out_f, RANK, *([1] * len(kernel))),
    }


def _loha(prefix: str, shape: tuple[int, ...]) -> Shapes:
    out_f, in_f, *kernel = shape
    flat_in = in_f * (kernel[0] * kernel[1] if kernel else 1)
    return {
        f"{prefix}.hada_w1_a": (out_f, RANK),
        f"{prefix}.hada_w1_b": (RANK, flat_in),
        f"{prefix}.hada_w2_a": (out_f, RANK),
        f"{prefix}.hada_w2_b": (RANK, flat_in),
        f"{prefix}.alpha": (),
    }


def _lokr(prefix: str, shape: tuple[int, ...]) -> Shapes:
    out_f, in_f, *kernel = shape  # LyCORIS factor 2: w1 (2, 2) (x) w2 (out/2, in/2, k, k)
    return {
        f"{prefix}.lokr_w1": (2, 2),
        f"{prefix}.lokr_w2": (out_f // 2, in_f // 2, *kernel),
        f"{prefix}.alpha": (),
    }


def _text_path(path: str) -> str:
    if path.startswith("text_model.") or path == "text_projection":
        return path
    return f"text_model.{path}"


def _text_targets(arch: Arch) -> list[tuple[str, str, str, str, tuple[int, ...]]]:
    model = meta_model(arch)
    texts = [
        (
            "lora_te1" if arch is Arch.SDXL else "lora_te",
            "text_encoder",
            "clip_l",
            model.text_encoder,
        )
    ]
    if model.text_encoder_2 is not None:
        texts.append(("lora_te2", "text_encoder_2", "clip_g", model.text_encoder_2))
    return [
        (k, p, o, _text_path(path), s)
        for k, p, o, m in texts
        for path, s in _targets(m, _TEXT).items()
    ]


def generated_sd(arch: Arch) -> dict[str, tuple[str, Shapes]]:
    """Nine trainers' spellings of the same modules of one architecture."""
    model = meta_model(arch)
    unet = _targets(model.unet, _UNET)
    ldm = unet_module_names(model.unet.config)
    layouts: dict[str, Shapes] = {n: {} for n in TRAINERS if n != "kohya_te_only"}
    for path, shape in unet.items():
        flat = path.replace(".", "_")
        layouts["kohya"] |= _lora(f"lora_unet_{flat}", shape)
        if path in ldm:
            layouts["kohya_ldm"] |= _lora(f"lora_unet_{ldm[path].replace('.', '_')}", shape)
            layouts["onetrainer"] |= _lora(f"unet.{ldm[path]}", shape)
        # convert_state_dict_to_kohya keeps the last two dots: the DoRA magnitude keeps three
        dk = _lora(f"lora_unet_{flat}", shape)
        if path.endswith(".to_k"):
            head = path.rsplit(".", 1)[0].replace(".", "_")
            dk[f"lora_unet_{head}.to_k.lora_magnitude_vector"] = (shape[0],)
        layouts["diffusers_kohya"] |= dk
        layouts["peft"] |= _peft(f"unet.{path}", shape)
        layouts["lycoris"] |= _lora(f"lycoris_{flat}", shape)
        layouts["loha"] |= _loha(f"lora_unet_{flat}", shape)
        layouts["lokr"] |= _lokr(f"lora_unet_{flat}", shape)
        if path.endswith(("attn1.to_k", "attn2.to_k", "attn1.to_out.0")):
            proc = path.replace(".to_out.0", ".processor.to_out_lora").replace(
                ".to_k", ".processor.to_k_lora"
            )
            out_f, in_f = shape
            layouts["attn_proc"] |= {
                f"unet.{proc}.down.weight": (RANK, in_f),
                f"unet.{proc}.up.weight": (out_f, RANK),
            }
    for kohya, peft, ot, path, shape in _text_targets(arch):
        flat = path.replace(".", "_")
        layouts["kohya"] |= _lora(f"{kohya}_{flat}", shape)
        layouts["kohya_ldm"] |= _lora(f"{kohya}_{flat}", shape)
        layouts["loha"] |= _loha(f"{kohya}_{flat}", shape)
        layouts["lokr"] |= _lokr(f"{kohya}_{flat}", shape)
        dk_prefix = "lora_te1" if peft == "text_encoder" else "lora_te2"
        layouts["diffusers_kohya"] |= _lora(f"{dk_prefix}_{flat}", shape)
        layouts["peft"] |= _peft(f"{peft}.{path}", shape)
        layouts["onetrainer"] |= _lora(f"{ot}.{path}", shape)
    layouts["onetrainer"]["bundle_emb.myemb.clip_l"] = (2, 768)
    if arch is Arch.SDXL:
        layouts["onetrainer"]["bundle_emb.myemb.clip_g"] = (2, 1280)
    sources = {
        "kohya": KOHYA,
        "kohya_ldm": KOHYA_LDM,
        "diffusers_kohya": DIFFUSERS_KOHYA,
        "peft": PEFT,
        "onetrainer": ONETRAINER,
        "lycoris": LYCORIS,
        "attn_proc": ATTN_PROC,
        "loha": LYCORIS_KOHYA,
        "lokr": LYCORIS_KOHYA,
    }
    # text-encoder-only files (sd-scripts --network_train_text_encoder_only): widths alone decide
    layouts["kohya_te_only"] = {
        k: v for k, v in layouts["kohya"].items() if k.startswith("lora_te")
    }
    sources["kohya_te_only"] = KOHYA
    if arch is not Arch.SDXL:
        del layouts["kohya_ldm"]  # sd-scripts writes SD1/SD2 in the diffusers layout
    return {n: (sources[n], s) for n, s in layouts.items()}


def _shapes_by_kohya_name(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Every Linear/Conv of the architecture under its kohya names (diffusers and LDM)."""
    model = meta_model(arch)
    unet = _targets(model.unet, None)
    ldm = unet_module_names(model.unet.config)
    names = {"lora_unet_" + p.replace(".", "_"): s for p, s in unet.items()}
    names |= {"lora_unet_" + ldm[p].replace(".", "_"): s for p, s in unet.items() if p in ldm}
    return names


def listed_sd() -> dict[str, dict]:
    """Real key names from public listings; shapes off the architecture they were made for."""
    sdxl = _shapes_by_kohya_name(Arch.SDXL)
    slider: Shapes = {}
    # InvokeAI reads the block layout of civitai 1105685 off the real file: 840 keys, attn1 only
    for group, depth in (
        ("down_blocks_1_attentions_0", 2),
        ("down_blocks_1_attentions_1", 2),
        ("down_blocks_2_attentions_0", 10),
        ("down_blocks_2_attentions_1", 10),
        ("mid_block_attentions_0", 10),
        ("up_blocks_0_attentions_0", 10),
        ("up_blocks_0_attentions_1", 10),
        ("up_blocks_0_attentions_2", 10),
        ("up_blocks_1_attentions_0", 2),
        ("up_blocks_1_attentions_1", 2),
        ("up_blocks_1_attentions_2", 2),
    ):
        for block in range(depth):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                name = f"lora_unet_{group}_transformer_blocks_{block}_attn1_{proj}"
                slider |= _lora(name, sdxl[name])
    assert len(slider) == 840
    # the log of ComfyUI issue 5655: an SDXL kohya file in LDM names, attn2/ff of output block 4
    logged: Shapes = {}
    for block in (0, 1):
        for part in ("attn2_to_out_0", "attn2_to_q", "attn2_to_v", "ff_net_0_proj", "ff_net_2"):
            name = f"lora_unet_output_blocks_4_1_transformer_blocks_{block}_{part}"
            logged |= _lora(name, sdxl[name])
    return {
        "sdxl-slider-dramatic-lighting": {
            "source": "invoke-ai/InvokeAI:tests/backend/model_manager/configs/"
            "test_sdxl_slider_lora_identification.py@8e71a8a5 (_DRAMATIC_LIGHTING_SLIDER_BLOCKS: "
            "block layout of https://civitai.com/models/1105685, read off the real file)",
            "trainer": "kohya sd-scripts (slider)",
            "family": "SDXL",
            "keys": slider,
        },
        "sdxl-comfyui-5655-log": {
            "source": "https://github.com/Comfy-Org/ComfyUI/issues/5655 ('lora key not loaded' "
            "log: lora_unet_output_blocks_4_1_transformer_blocks_{0,1}_*)",
            "trainer": "kohya sd-scripts (LDM names)",
            "family": "SDXL",
            "keys": logged,
        },
    }


# FLUX.1 naming rules of public trainers and savers, applied to a few blocks of FLUX.1-dev (shapes
# off the meta model): each real file holds every block in the same spelling.
OMI = (
    "invoke-ai/InvokeAI:invokeai/backend/model_manager/omi/vendor/convert/lora/"
    "convert_flux_lora.py@cce1b56c, convert_clip.py@a585b2ef, convert_t5.py@a585b2ef "
    "(OneTrainer's OMI names, vendored)"
)
COMFY_SAVE = (
    "comfyanonymous/ComfyUI:comfy_extras/nodes_lora_extract.py@962638c9 (LoraSave: "
    "'diffusion_model.' and 'text_encoders.' + ComfyUI's module names, lora_up/lora_down without "
    "alpha, 1-D weights as .diff and biases as .diff_b when bias_diff; full_diff: .diff)"
)
KOHYA_FLUX = (
    "kohya-ss/sd-scripts:networks/lora_flux.py@450630c6 (lora_unet_/lora_te1_/lora_te3_, "
    "train_t5xxl, in_dims: img_in/time_in/vector_in/guidance_in/txt_in"
)
FAL = (
    "huggingface/diffusers:src/diffusers/loaders/lora_conversion_utils.py@v0.42.1 "
    "(_convert_fal_kontext_lora_to_diffusers: the keys it pops, 'base_model.model.' + BFL names)"
)
SIMPLETUNER = (
    "https://github.com/Comfy-Org/ComfyUI/issues/4347 ('lora key not loaded' log of a SimpleTuner "
    "FLUX_LORA_TARGET=all+ffs file: transformer.base_model.model. + diffusers names)"
)
THELASTBEN = (
    "https://github.com/kohya-ss/sd-scripts/issues/1463 (TheLastBen, 2024-08-16) and "
    "https://github.com/Comfy-Org/ComfyUI/issues/4347 (TheLastBen, 2024-08-14): 'lora key not "
    "loaded' logs of a FLUX.1 LoRA trained with sd-scripts' networks on diffusers' FluxTransformer"
    "2DModel: lora_unet_ + the diffusers module path flattened, a trailing '_', alpha per module; "
    "only the module names those logs show"
)
_DOUBLE_BFL = (
    "img_mod.lin",
    "txt_mod.lin",
    "img_attn.qkv",
    "txt_attn.qkv",
    "img_attn.proj",
    "txt_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mlp.0",
    "txt_mlp.2",
)
_SINGLE_BFL = ("linear1", "linear2", "modulation.lin")
_TOP_BFL = (
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)
_CLIP = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_T5 = (
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.k",
    "layer.0.SelfAttention.v",
    "layer.0.SelfAttention.o",
    "layer.1.DenseReluDense.wi_0",
    "layer.1.DenseReluDense.wi_1",
    "layer.1.DenseReluDense.wo",
)


def _flux_shapes() -> tuple[Shapes, Shapes, Shapes]:
    """FLUX.1-dev's BFL-named transformer tensors, CLIP-L's and T5-XXL's, full size."""
    from webui.layouts.flux import diffusers_to_bfl

    model = meta_model(Arch.FLUX1)
    bfl = {k: tuple(v.shape) for k, v in diffusers_to_bfl(model.transformer.state_dict()).items()}
    clip = {k: tuple(v.shape) for k, v in model.text_encoder.state_dict().items()}
    t5 = {k: tuple(v.shape) for k, v in model.text_encoder_2.state_dict().items()}
    return bfl, clip, t5


def listed_flux() -> dict[str, dict]:
    bfl, clip, t5 = _flux_shapes()
    blocks = [f"double_blocks.{i}.{m}" for i in (0, 18) for m in _DOUBLE_BFL]
    blocks += [f"single_blocks.{i}.{m}" for i in (0, 37) for m in _SINGLE_BFL]
    clip_layers = [f"encoder.layers.{i}.{m}" for i in (0, 11) for m in _CLIP]
    t5_layers = [f"encoder.block.{i}.{m}" for i in (0, 23) for m in _T5]
    w = lambda name: bfl[f"{name}.weight"]  # noqa: E731

    omi: Shapes = {}
    for name in (*_TOP_BFL, *blocks):
        split = re.match(r"(.+)\.(img_attn\.qkv|txt_attn\.qkv|linear1)$", name)
        out_f, in_f = w(name)
        if split is None:
            omi |= _lora(
                f"transformer.{'img_in.proj' if name == 'img_in' else name}", (out_f, in_f)
            )
            continue
        parts = [3072] * 3 + ([out_f - 9216] if split.group(2) == "linear1" else [])
        for i, rows in enumerate(parts):
            omi |= _lora(f"transformer.{name}.{i}", (rows, in_f))
    for name in clip_layers:
        omi |= _lora(f"clip_l.text_model.{name}", clip[f"{name}.weight"])
    for name in t5_layers:
        omi |= _lora(f"t5.{name}", t5[f"{name}.weight"])

    comfy: Shapes = {}
    full: Shapes = {}
    for name in (*_TOP_BFL, *blocks):
        out_f, in_f = w(name)
        comfy[f"diffusion_model.{name}.lora_up.weight"] = (out_f, RANK)
        comfy[f"diffusion_model.{name}.lora_down.weight"] = (RANK, in_f)
        comfy[f"diffusion_model.{name}.diff_b"] = bfl[f"{name}.bias"]
        full[f"diffusion_model.{name}.diff"] = (out_f, in_f)
        full[f"diffusion_model.{name}.diff_b"] = bfl[f"{name}.bias"]
    te = [(f"text_encoders.clip_l.transformer.text_model.{n}", clip, n) for n in clip_layers]
    te += [(f"text_encoders.t5xxl.transformer.{n}", t5, n) for n in t5_layers]
    for key, shapes, name in te:
        comfy[f"{key}.lora_up.weight"] = (shapes[f"{name}.weight"][0], RANK)
        comfy[f"{key}.lora_down.weight"] = (RANK, shapes[f"{name}.weight"][1])
        if f"{name}.bias" in shapes:
            comfy[f"{key}.diff_b"] = shapes[f"{name}.bias"]
    for i in (0, 11):
        for norm in ("layer_norm1", "layer_norm2"):
            name = f"encoder.layers.{i}.{norm}"
            comfy[f"text_encoders.clip_l.transformer.text_model.{name}.diff"] = clip[
                f"{name}.weight"
            ]
            comfy[f"text_encoders.clip_l.transformer.text_model.{name}.diff_b"] = clip[
                f"{name}.bias"
            ]
    for i in (0, 23):
        for layer in (0, 1):
            name = f"encoder.block.{i}.layer.{layer}.layer_norm"
            comfy[f"text_encoders.t5xxl.transformer.{name}.diff"] = t5[f"{name}.weight"]

    kohya_t5: Shapes = {}
    for name in (
        *_TOP_BFL[:8],
        *blocks,
    ):  # in_dims trains the five input embedders, never the final layer
        kohya_t5 |= _lora(f"lora_unet_{name.replace('.', '_')}", w(name))
    for name in clip_layers:
        kohya_t5 |= _lora(f"lora_te1_text_model_{name.replace('.', '_')}", clip[f"{name}.weight"])
    for name in t5_layers:
        kohya_t5 |= _lora(f"lora_te3_{name.replace('.', '_')}", t5[f"{name}.weight"])

    # split_qkv=True: the q/k/v (and MLP) LoRAs are saved fused, a rank-3r (4r) block-sparse up
    split: Shapes = {}
    for name in blocks:
        out_f, in_f = w(name)
        parts = 3 if name.endswith("qkv") else 4 if name.endswith("linear1") else 1
        split[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = (RANK * parts, in_f)
        split[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = (out_f, RANK * parts)
        split[f"lora_unet_{name.replace('.', '_')}.alpha"] = ()

    fal: Shapes = {}
    for name in (*blocks, "final_layer.linear"):
        fal |= _peft(f"base_model.model.{name}", w(name))

    model = meta_model(Arch.FLUX1)
    linears = _targets(model.transformer, None)
    simpletuner: Shapes = {"transformer.base_model.model.proj_out.lora_A.weight": (RANK, 3072)}
    simpletuner["transformer.base_model.model.proj_out.lora_B.weight"] = (64, RANK)
    for i in (0, 1):
        for m in (
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
        ):
            simpletuner |= _peft(
                f"transformer.base_model.model.transformer_blocks.{i}.{m}",
                linears[f"transformer_blocks.{i}.{m}"],
            )
    for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        simpletuner |= _peft(
            f"transformer.base_model.model.single_transformer_blocks.0.{m}",
            linears[f"single_transformer_blocks.0.{m}"],
        )

    # TheLastBen: every name the logs show, double blocks at block 10 (the one shown), single
    # blocks at 0 and 1
    thelastben: Shapes = {}
    shown = [
        "context_embedder",
        "norm_out.linear",
        "proj_out",
        *(
            f"time_text_embed.{e}_embedder.linear_{i}"
            for e in ("guidance", "text", "timestep")
            for i in (1, 2)
        ),
        *(
            f"transformer_blocks.10.{m}"
            for m in (
                "attn.to_k",
                "attn.to_out.0",
                "attn.to_q",
                "attn.to_v",
                "ff_context.net.0.proj",
                "ff_context.net.2",
            )
        ),
        *(
            f"single_transformer_blocks.{i}.{m}"
            for i in (0, 1)
            for m in ("attn.to_k", "attn.to_q", "attn.to_v", "norm.linear", "proj_mlp", "proj_out")
        ),
    ]
    for path in shown:
        thelastben |= _lora(f"lora_unet_{path.replace('.', '_')}_", linears[path])

    flux = "FLUX.1"
    return {
        "flux-lora-onetrainer-omi-format": {
            "source": OMI,
            "trainer": "OneTrainer (OMI names)",
            "family": flux,
            "keys": omi,
        },
        "flux-lora-comfyui-lorasave-format": {
            "source": COMFY_SAVE,
            "trainer": "ComfyUI LoraSave",
            "family": flux,
            "keys": comfy,
        },
        "flux-lora-comfyui-full-diff-format": {
            "source": COMFY_SAVE,
            "trainer": "ComfyUI LoraSave (full_diff)",
            "family": flux,
            "keys": full,
        },
        "flux-lora-kohya-t5-in-dims-format": {
            "source": KOHYA_FLUX + ")",
            "trainer": "kohya sd-scripts (train_t5xxl, in_dims)",
            "family": flux,
            "keys": kohya_t5,
        },
        "flux-lora-kohya-split-qkv-format": {
            "source": KOHYA_FLUX + ", split_qkv=True: state_dict() saves fused down [r*n, in], "
            "block-diagonal up [out, r*n])",
            "trainer": "kohya sd-scripts (split_qkv)",
            "family": flux,
            "keys": split,
        },
        "flux-lora-fal-kontext-format": {
            "source": FAL,
            "trainer": "fal (Kontext trainer)",
            "family": flux,
            "keys": fal,
        },
        "flux-lora-thelastben-format": {
            "source": THELASTBEN,
            "trainer": "TheLastBen (sd-scripts networks, diffusers names)",
            "family": flux,
            "keys": thelastben,
        },
        "flux-lora-simpletuner-nested-prefix-format": {
            "source": SIMPLETUNER,
            "trainer": "SimpleTuner (PEFT)",
            "family": flux,
            "keys": simpletuner,
        },
    }


# InvokeAI fixtures: file stem -> (family, trainer); each file names the model it was read from.
INVOKEAI_FIXTURES = {
    "anima_lora_kohya_format": ("Anima", "kohya sd-scripts"),
    "anima_lora_kohya_with_te_format": ("Anima", "kohya sd-scripts"),
    "anima_lora_lokr_format": ("Anima", "LyCORIS LoKr + DoRA"),
    "anima_lora_peft_format": ("Anima", "diffusers/PEFT"),
    "flux_control_lora_format": ("FLUX.1", "BFL (FLUX.1-Depth-dev-lora)"),
    "flux_dora_onetrainer_format": ("FLUX.1", "OneTrainer DoRA"),
    "flux_lokr_bfl_format": ("FLUX.1", "LyCORIS LoKr (BFL names)"),
    "flux_lora_aitoolkit_format": ("FLUX.1", "ai-toolkit"),
    "flux_lora_diffusers_base_model_format": ("FLUX.1", "PEFT (base_model.model.)"),
    "flux_lora_diffusers_format": ("FLUX.1", "diffusers/PEFT"),
    "flux_lora_diffusers_no_proj_mlp_format": ("FLUX.1", "diffusers/PEFT"),
    "flux_lora_kohya_format": ("FLUX.1", "kohya sd-scripts"),
    "flux_lora_kohya_with_te1_format": ("FLUX.1", "kohya sd-scripts"),
    "flux_lora_xlabs_format": ("FLUX.1", "XLabs"),
    "krea2_lora_kohya_format": ("Krea 2", "kohya sd-scripts"),
    "qwen_image_lora_diffusers_format": ("Qwen-Image", "diffusers/PEFT"),
    "qwen_image_lora_kohya_format": ("Qwen-Image", "kohya sd-scripts (LoKr)"),
}
# Layouts we fail on today, and why (the test marks them xfail, strict).
XFAIL = {
    "qwen-image-lora-diffusers-format": "bare `transformer_blocks.N.attn.to_q/to_k` at width 3072, blocks 0-1 only, no metadata: the same names and widths as a FLUX.1 diffusers file, so it is named FLUX.1 (still never written)",
    "flux-lokr-bfl-format": "LoKr factors whose product is not a FLUX.1 width (w1 [32, 96] x w2 [32, 288] on img_attn.qkv), and BFL double_blocks names that HunyuanImage and Chroma share: no family is named; it matches no SD module, so nothing is written, but it reaches the patcher",
}
INVOKEAI_DIR = "tests/backend/patches/lora_conversions/lora_state_dicts"


def _dict_literal(text: str) -> tuple[dict, str]:
    """The `state_dict_keys = {...}` literal of a fixture (parsed as data, never run) and the
    comment or docstring above it that names its model."""
    tree = ast.parse(text)
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "state_dict_keys":
            head = text[: text.find("state_dict_keys")]
            note = " ".join(line.strip('#" ').strip() for line in head.splitlines() if line.strip())
            return ast.literal_eval(node.value), note
    raise ValueError("no state_dict_keys")


def copied_from_invokeai(checkout: Path) -> dict[str, dict]:
    commit = subprocess.run(
        ["git", f"--git-dir={checkout}", "rev-parse", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    out = {}
    for stem, (family, trainer) in INVOKEAI_FIXTURES.items():
        path = f"{INVOKEAI_DIR}/{stem}.py"
        text = subprocess.run(
            ["git", f"--git-dir={checkout}", "show", f"HEAD:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        keys, note = _dict_literal(text)
        out[stem.replace("_", "-")] = {
            "source": f"invoke-ai/InvokeAI:{path}@{commit[:8]} ({note[:300]})".replace("  ", " "),
            "trainer": trainer,
            "family": family,
            "keys": keys,
            "xfail": XFAIL.get(stem.replace("_", "-")),
        }
    return out


def _write(name: str, listing: dict) -> None:
    folder = CORPUS / listing["family"].lower().replace(" ", "-").replace(".", "")
    folder.mkdir(parents=True, exist_ok=True)
    ordered = {
        "source": listing["source"],
        "trainer": listing["trainer"],
        "family": listing["family"],
        "metadata": listing.get("metadata", {}),
    }
    if listing.get("xfail"):
        ordered["xfail"] = listing["xfail"]
    keys = ",\n".join(
        f"    {json.dumps(k)}: {json.dumps(list(s))}" for k, s in listing["keys"].items()
    )
    head = json.dumps(ordered, indent=2, ensure_ascii=False)[:-2]
    (folder / f"{name}.json").write_text(f'{head},\n  "keys": {{\n{keys}\n  }}\n}}\n', "utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--invokeai", type=Path, help="git dir of an invoke-ai/InvokeAI clone")
    args = parser.parse_args()
    for arch in (Arch.SD1, Arch.SD2, Arch.SDXL):  # FLUX.1's listings are `listed_flux`'s
        for name, (source, keys) in generated_sd(arch).items():
            trainer = TRAINERS[name]
            _write(
                f"{arch.value.lower()}-{name.replace('_', '-')}",
                {"source": source, "trainer": trainer, "family": arch.value, "keys": keys},
            )
    for name, listing in (listed_sd() | listed_flux()).items():
        _write(name, listing)
    if args.invokeai is not None:
        for name, listing in copied_from_invokeai(args.invokeai).items():
            _write(name, listing)


if __name__ == "__main__":
    main()
