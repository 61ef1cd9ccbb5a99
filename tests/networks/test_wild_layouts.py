"""LoRA key layouts from the wild, on full-size models built on the `meta` device.

Layouts are generated from each trainer's naming rule (named per layout) over the real modules of
the full SD1/SD2/SDXL architectures: every SD layout must resolve in full with the right base, and
every other family must be named and never written (regressions of issue 16)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from webui import families
from webui.arch import UNET_ARCHES, Arch
from webui.engine.lora_backends import LoraBackends
from webui.engine.model_factory import ModelSize, ModelSpec, component_configs
from webui.engine.network_set import ChosenNetwork
from webui.layouts.unet import unet_module_names
from webui.networks.apply.keys import KeyMap
from webui.networks.apply.strengths import Strengths
from webui.networks.format.base_detection import detect_base, fits
from webui.networks.format.modules import group_by_module, parse_module
from webui.networks.format.network import read_network
from webui.settings import LoraBackend

RANK = 2
Shapes = dict[str, tuple[int, ...]]
KOHYA = "kohya-ss/sd-scripts networks/lora.py (module path, dots -> '_', lora_unet_/lora_te*_)"
KOHYA_LDM = "kohya-ss/sd-scripts sdxl_model_util.py + networks/lora.py (SGM/LDM UNet names)"
DIFFUSERS_KOHYA = (
    "huggingface/diffusers src/diffusers/utils/state_dict_utils.py convert_state_dict_to_kohya"
)
PEFT = "huggingface/diffusers save_lora_weights (PEFT: unet./text_encoder., lora_A/lora_B)"
ONETRAINER = "Nerogar/OneTrainer modules/util/convert/lora/convert_sdxl_lora.py, convert_clip.py"
LYCORIS = "KohakuBlueleaf/LyCORIS lycoris/wrapper.py (LycorisNetwork, prefix 'lycoris')"
ATTN_PROC = "https://github.com/Comfy-Org/ComfyUI/issues/1144 (processor.to_q_lora keys)"


@dataclass(frozen=True)
class Layout:
    name: str
    expected: str  # family name
    source: str
    shapes: Shapes
    metadata: dict[str, str] = field(default_factory=dict)


@cache
def meta_model(arch: Arch) -> SimpleNamespace:
    """The full-size architecture on the meta device (no memory, real names and shapes)."""
    configs = component_configs(ModelSpec(arch, size=ModelSize.FULL))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        te1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        te2 = None
        if arch is Arch.SDXL:
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    return SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=te2)


def _targets(model: torch.nn.Module, wanted: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return {
        path: tuple(m.weight.shape)
        for path, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and path.endswith(wanted)
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


def _lora(prefix: str, shape: tuple[int, ...], sep: str = ".") -> Shapes:
    out_f, in_f, *kernel = shape
    return {
        f"{prefix}{sep}lora_down.weight": (RANK, in_f, *kernel),
        f"{prefix}{sep}lora_up.weight": (out_f, RANK, *([1] * len(kernel))),
        f"{prefix}{sep}alpha": (),
    }


def _peft(prefix: str, shape: tuple[int, ...]) -> Shapes:
    out_f, in_f, *kernel = shape
    return {
        f"{prefix}.lora_A.weight": (RANK, in_f, *kernel),
        f"{prefix}.lora_B.weight": (out_f, RANK, *([1] * len(kernel))),
    }


def _text_path(path: str) -> str:
    return (
        path
        if path.startswith("text_model.") or path == "text_projection"
        else f"text_model.{path}"
    )


def sd_layouts(arch: Arch) -> list[Layout]:
    """Seven trainers' spellings of the same modules of one architecture."""
    model = meta_model(arch)
    unet = _targets(model.unet, _UNET)
    ldm = unet_module_names(model.unet.config)
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
    text = [
        (k, p, o, _text_path(path), s)
        for k, p, o, m in texts
        for path, s in _targets(m, _TEXT).items()
    ]
    a = arch.value
    layouts: dict[str, Shapes] = {
        n: {}
        for n in (
            "kohya",
            "kohya_ldm",
            "diffusers_kohya",
            "peft",
            "onetrainer",
            "lycoris",
            "attn_proc",
        )
    }
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
        if path.endswith(("attn1.to_k", "attn2.to_k", "attn1.to_out.0")):
            proc = path.replace(".to_out.0", ".processor.to_out_lora").replace(
                ".to_k", ".processor.to_k_lora"
            )
            out_f, in_f = shape
            layouts["attn_proc"] |= {
                f"unet.{proc}.down.weight": (RANK, in_f),
                f"unet.{proc}.up.weight": (out_f, RANK),
            }
    for kohya, peft, ot, path, shape in text:
        flat = path.replace(".", "_")
        layouts["kohya"] |= _lora(f"{kohya}_{flat}", shape)
        layouts["kohya_ldm"] |= _lora(f"{kohya}_{flat}", shape)
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
    }
    if arch is not Arch.SDXL:
        del layouts["kohya_ldm"]  # sd-scripts writes SD1/SD2 in the diffusers layout
    return [Layout(f"{a}-{n}", a, sources[n], s) for n, s in layouts.items()]


SD_LAYOUTS = [layout for arch in UNET_ARCHES for layout in sd_layouts(arch)]


def _tensors(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.ones(()) * RANK if s == () else torch.zeros(s) for k, s in shapes.items()}


@pytest.mark.parametrize("layout", SD_LAYOUTS, ids=lambda x: x.name)
def test_sd_layout_applies_in_full_with_its_base(layout: Layout) -> None:
    arch = Arch(layout.expected)
    detection = detect_base(layout.metadata, layout.shapes)
    assert detection.arch is arch, detection.detail
    model = meta_model(arch)
    keymap = KeyMap(model.unet, model.text_encoder, model.text_encoder_2)
    groups = group_by_module(_tensors(layout.shapes))
    for prefix, tensors in groups.items():
        module = parse_module(prefix, tensors)
        ref = keymap.resolve(prefix)
        assert ref is not None, f"{layout.name}: {prefix} matches nothing"
        assert module.accepts(ref.module.weight.shape), prefix
    used = sum(len(g) for g in groups.values())
    embeddings = sum(1 for k in layout.shapes if k.startswith("bundle_emb."))
    assert used + embeddings == len(layout.shapes)  # every key used


def test_dotted_dora_magnitude_groups_into_one_module() -> None:
    """diffusers' kohya converter splits one DoRA module over two spellings."""
    layout = next(x for x in SD_LAYOUTS if x.name == "SD1-diffusers_kohya")
    groups = group_by_module(_tensors(layout.shapes))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    assert set(groups[name]) == {
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
        "lora_magnitude_vector",
    }
    assert parse_module(name, groups[name]).dora is not None


def test_diffusers_converted_sd15_is_sd1_not_sdxl() -> None:
    layout = next(x for x in SD_LAYOUTS if x.name == "SD1-diffusers_kohya")
    assert detect_base({}, layout.shapes).arch is Arch.SD1
    text_only = {k: s for k, s in layout.shapes.items() if k.startswith("lora_te1_")}
    assert detect_base({}, text_only).arch is Arch.SD1


def test_onetrainer_sdxl_is_native_in_full(tmp_path: Path) -> None:
    """clip_l/clip_g modules map, bundle_emb is set aside: nothing unsupported, so auto keeps it."""
    layout = next(x for x in SD_LAYOUTS if x.name == "SDXL-onetrainer")
    path = tmp_path / "ot.safetensors"
    save_file(_tensors(layout.shapes), path)
    network = read_network(path)
    assert not network.unsupported
    assert any(p.startswith("text_encoder_2.") for p in network.modules)
    assert network.base.arch is Arch.SDXL


# -- other families ---------------------------------------------------------------------------


def _clip_l_kohya(prefix: str = "lora_te1") -> Shapes:
    shapes: Shapes = {}
    for i in range(12):
        base = f"{prefix}_text_model_encoder_layers_{i}"
        for name, shape in (
            ("self_attn_q_proj", (768, 768)),
            ("self_attn_k_proj", (768, 768)),
            ("self_attn_v_proj", (768, 768)),
            ("self_attn_out_proj", (768, 768)),
            ("mlp_fc1", (3072, 768)),
            ("mlp_fc2", (768, 3072)),
        ):
            shapes |= _lora(f"{base}_{name}", shape)
    return shapes


def _many(rule, names: list[tuple[str, tuple[int, int]]]) -> Shapes:
    out: Shapes = {}
    for name, shape in names:
        out |= rule(name, shape)
    return out


FLUX_KOHYA = (
    "kohya-ss/sd-scripts networks/lora_flux.py (lora_unet_double_blocks_*, lora_te1_ CLIP-L)"
)
FOREIGN_LAYOUTS = [
    Layout(
        "flux1-kohya",
        "FLUX.1",
        FLUX_KOHYA,
        _clip_l_kohya()
        | _many(
            _lora,
            [
                ("lora_unet_double_blocks_0_img_attn_qkv", (9216, 3072)),
                ("lora_unet_double_blocks_0_img_mod_lin", (18432, 3072)),
                ("lora_unet_single_blocks_0_linear1", (21504, 3072)),
            ],
        ),
    ),
    Layout(
        "flux1-kohya-te-only-basever",
        "FLUX.1",
        FLUX_KOHYA,
        _clip_l_kohya(),
        {"ss_base_model_version": "flux1"},
    ),
    Layout(
        "flux1-kohya-te-only-modelspec",
        "FLUX.1",
        FLUX_KOHYA,
        _clip_l_kohya(),
        {"modelspec.architecture": "flux-1-dev/lora"},
    ),
    Layout(
        "flux1-diffusers",
        "FLUX.1",
        "diffusers FluxTransformer2DModel via save_lora_weights",
        _many(
            _peft,
            [
                ("transformer.transformer_blocks.0.attn.to_q", (3072, 3072)),
                ("transformer.transformer_blocks.0.attn.add_q_proj", (3072, 3072)),
                ("transformer.single_transformer_blocks.0.proj_mlp", (12288, 3072)),
            ],
        ),
    ),
    Layout(
        "flux1-diffusers-double-only",
        "FLUX.1",
        "diffusers FluxTransformer2DModel",
        _many(
            _peft,
            [
                ("transformer.transformer_blocks.1.attn.to_k", (3072, 3072)),
                ("transformer.transformer_blocks.1.attn.add_k_proj", (3072, 3072)),
            ],
        ),
    ),
    Layout(
        "chroma-ai-toolkit",
        "Chroma",
        "sd-scripts sai_model_spec.py ARCH_FLUX_1_CHROMA",
        _many(_peft, [("transformer.transformer_blocks.0.attn.to_q", (3072, 3072))]),
        {"modelspec.architecture": "chroma/lora"},
    ),
    Layout(
        "flux2-diffusers",
        "FLUX.2",
        "diffusers Flux2Transformer2DModel",
        _many(
            _peft, [("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", (55296, 6144))]
        ),
    ),
    Layout(
        "sd3-kohya",
        "SD3",
        "kohya-ss/sd-scripts networks/lora_sd3.py",
        _clip_l_kohya()
        | _many(
            _lora,
            [
                ("lora_unet_joint_blocks_0_x_block_attn_qkv", (4608, 1536)),
                ("lora_te2_text_projection", (1280, 1280)),
            ],
        ),
    ),
    Layout(
        "sd35-diffusers",
        "SD3",
        "diffusers SD3Transformer2DModel (3.5 large, width 2432)",
        _many(
            _peft,
            [
                ("transformer.transformer_blocks.0.attn.add_q_proj", (2432, 2432)),
                ("transformer.transformer_blocks.0.attn.to_q", (2432, 2432)),
            ],
        ),
    ),
    Layout(
        "qwen-image-diffusers",
        "Qwen-Image",
        "diffusers QwenImageTransformer2DModel",
        _many(
            _peft,
            [
                ("transformer.transformer_blocks.0.attn.to_q", (3072, 3072)),
                ("transformer.transformer_blocks.0.img_mlp.net.0.proj", (12288, 3072)),
            ],
        ),
    ),
    Layout(
        "anima-kohya",
        "Anima",
        "kohya-ss/sd-scripts docs/anima_train_network.md (Qwen3-0.6B TE)",
        _many(
            _lora,
            [
                ("lora_unet_blocks_0_self_attn_q_proj", (2048, 2048)),
                ("lora_te_layers_0_self_attn_q_proj", (2048, 1024)),
            ],
        ),
    ),
    Layout(
        "anima-te-only",
        "Anima",
        "Qwen3-0.6B hidden width 1024",
        _many(
            _lora,
            [
                ("lora_te_layers_0_self_attn_k_proj", (1024, 1024)),
                ("lora_te_layers_0_mlp_up_proj", (3072, 1024)),
            ],
        ),
    ),
    Layout(
        "wan-comfy",
        "Wan",
        "Wan2.1 wan/modules/model.py (blocks.N.self_attn.q)",
        _many(
            _peft,
            [
                ("diffusion_model.blocks.0.self_attn.q", (5120, 5120)),
                ("diffusion_model.blocks.0.ffn.0", (13824, 5120)),
            ],
        ),
    ),
    Layout(
        "hidream-diffusers",
        "HiDream",
        "Nerogar/OneTrainer convert_hidream_lora.py",
        _many(_peft, [("transformer.double_stream_blocks.0.block.attn1.to_q", (2560, 2560))]),
    ),
    Layout(
        "lumina2-comfy",
        "Lumina 2",
        "sd-scripts library/lumina_models.py (NextDiT, dim 2304)",
        _many(_peft, [("diffusion_model.layers.0.attention.qkv", (6912, 2304))]),
    ),
    Layout(
        "z-image-comfy",
        "Z-Image",
        "diffusers ZImageTransformer2DModel (dim 3840)",
        _many(_peft, [("diffusion_model.layers.0.attention.to_q", (3840, 3840))]),
    ),
    Layout(
        "hunyuan-image-kohya",
        "HunyuanImage",
        "sd-scripts hunyuan_image_train_network.py",
        _many(
            _lora,
            [
                ("lora_unet_double_blocks_0_img_attn_qkv", (10752, 3584)),
                ("lora_unet_double_blocks_0_img_mlp_fc1", (14336, 3584)),
            ],
        ),
    ),
    Layout(
        "krea2-metadata",
        "Krea 2",
        "metadata only",
        _clip_l_kohya(),
        {"modelspec.architecture": "krea-2/lora"},
    ),
]


@pytest.mark.parametrize("layout", FOREIGN_LAYOUTS, ids=lambda x: x.name)
def test_other_family_is_named_and_fits_no_model(layout: Layout) -> None:
    """Every family is named; FLUX.1 (run since issue 18) fits FLUX.1 models only, the others
    fit nothing and are refused in one sentence."""
    detection = detect_base(layout.metadata, layout.shapes)
    if layout.expected == Arch.FLUX1.value:
        assert (detection.family, detection.arch) == (layout.expected, Arch.FLUX1)
        assert [a for a in Arch if fits(detection, a)] == [Arch.FLUX1]
        assert detection.refusal("x.safetensors") is None
        return
    assert (detection.family, detection.arch) == (layout.expected, None), detection.detail
    assert not any(fits(detection, arch) for arch in (*Arch, None))
    sentence = detection.refusal("x.safetensors")
    assert sentence is not None and sentence.endswith(f"this app runs {families.RUN_NAMES} models")


@pytest.mark.parametrize("choice", list(LoraBackend), ids=lambda c: c.value)
@pytest.mark.parametrize("name", ["flux1-kohya", "sd3-kohya"])
def test_flux_and_sd3_parts_never_written_into_sdxl(
    tmp_path: Path, name: str, choice: LoraBackend
) -> None:
    layout = next(x for x in FOREIGN_LAYOUTS if x.name == name)
    path = tmp_path / f"{name}.safetensors"
    save_file(_tensors(layout.shapes), path)
    network = read_network(path)
    model = meta_model(Arch.SDXL)
    before = {
        n: p
        for c in (model.unet, model.text_encoder, model.text_encoder_2)
        for n, p in c.named_parameters()
    }
    backends = LoraBackends(model, Arch.SDXL)
    routed = backends.apply([ChosenNetwork(network.name, network, Strengths())], choice)
    after = {
        n: p
        for c in (model.unet, model.text_encoder, model.text_encoder_2)
        for n, p in c.named_parameters()
    }
    assert all(after[n] is before[n] for n in before)
    assert routed.report.modules_changed == 0 and not routed.applied
    if layout.expected == Arch.FLUX1.value:  # a family this app runs, on the wrong model
        assert routed.warnings == [
            f"{network.name}: made for FLUX.1 (keys), not applied to this model"
        ]
        return
    assert routed.report.warnings == [
        f"{path.name} is an SD3 LoRA (kohya format): this app runs {families.RUN_NAMES} models"
    ]
