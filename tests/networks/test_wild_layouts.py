"""The regressions of issue 16 on real key layouts: a diffusers-converted SD1.5 file is SD1, a
dotted DoRA magnitude joins its module, OneTrainer SDXL loads natively in full (SD layouts from
`tests/corpus/`, whose every layout `test_corpus_layouts.py` checks in full), and layouts of other
families, written from their trainers' naming rules, are named and never written."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from corpus_layouts import CORPUS, load_layout, meta_model
from safetensors.torch import save_file

from webui import families
from webui.arch import Arch
from webui.engine.lora_backends import LoraBackends
from webui.engine.network_set import ChosenNetwork
from webui.networks.apply.strengths import Strengths
from webui.networks.format.base_detection import detect_base, fits
from webui.networks.format.modules import group_by_module, parse_module
from webui.networks.format.network import read_network
from webui.settings import LoraBackend

RANK = 2
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Layout:
    name: str
    expected: str  # family name
    source: str
    shapes: Shapes
    metadata: dict[str, str] = field(default_factory=dict)


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


def corpus_layout(name: str) -> Shapes:
    """An SD layout of `tests/corpus/` (written by `tests/corpus/build.py` from the trainers'
    naming rules; every one is checked in full by `test_corpus_layouts.py`)."""
    return load_layout(CORPUS / name.split("-", 1)[0] / f"{name}.json").keys


def _tensors(shapes: Shapes) -> dict[str, torch.Tensor]:
    return {k: torch.ones(()) * RANK if s == () else torch.zeros(s) for k, s in shapes.items()}


def test_dotted_dora_magnitude_groups_into_one_module() -> None:
    """diffusers' kohya converter splits one DoRA module over two spellings."""
    groups = group_by_module(_tensors(corpus_layout("sd1-diffusers-kohya")))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    assert set(groups[name]) == {
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
        "lora_magnitude_vector",
    }
    assert parse_module(name, groups[name]).dora is not None


def test_diffusers_converted_sd15_is_sd1_not_sdxl() -> None:
    shapes = corpus_layout("sd1-diffusers-kohya")
    assert detect_base({}, shapes).arch is Arch.SD1
    text_only = {k: s for k, s in shapes.items() if k.startswith("lora_te1_")}
    assert detect_base({}, text_only).arch is Arch.SD1


def test_onetrainer_sdxl_is_native_in_full(tmp_path: Path) -> None:
    """clip_l/clip_g modules map, bundle_emb is set aside: nothing unsupported, so auto keeps it."""
    path = tmp_path / "ot.safetensors"
    save_file(_tensors(corpus_layout("sdxl-onetrainer")), path)
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
