"""Issue 18: one fidelity test over every FLUX.1 LoRA format. After `apply` at 1.0 and 0.7, the
weights that change are exactly the ones an independent reference changes, and equal it within
1e-5 relative; `restore` gives the base back bit-exact.

References, never our own mapping: kohya, XLabs, OneTrainer, BFL/fal and ComfyUI files against
each format's math on the fused BFL weight, split by rows by hand here (`_bfl_rows`); PEFT files,
and TheLastBen's under their PEFT names, against diffusers' `load_lora_weights` + `fuse_lora`; LyCORIS files (LoKr, LoHa, full, DoRA)
against LyCORIS' own module classes, whose training forward is read off on the identity, wrapping
the tiny transformer's own layer where the names allow and a fused layer built here where BFL
fuses several; and, at full width (one double and one single block, 3072 wide), kohya and XLabs
files against diffusers' own converters."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from lora_files import one_torch_thread
from lycoris.functional import weight_decompose
from lycoris.modules.full import FullModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from safetensors.torch import save_file
from torch import Tensor, nn

from webui.arch import Arch, FluxVariant
from webui.engine.lora_backends import LoraBackends
from webui.engine.model_factory import ModelSpec, build_pipeline
from webui.engine.network_set import ChosenNetwork
from webui.networks.apply.strengths import Strengths
from webui.networks.format.network import read_network
from webui.settings import LoraBackend

RANK = 4
MULTIPLIERS = (1.0, 0.7)
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
FLUX_META = {"modelspec.architecture": "flux-1-dev/lora"}  # tiny widths name no family alone
KOHYA_META = {"ss_base_model_version": "flux1"}
CLIP_Q = "text_model.encoder.layers.0.self_attn.q_proj"
T5_Q = "encoder.block.0.layer.0.SelfAttention.q"
T5_WO = "encoder.block.1.layer.1.DenseReluDense.wo"

Weights = dict[str, Tensor]  # "component.path.weight" -> tensor


# --- the BFL layout, written out by hand (BFL flux/modules/layers.py and model.py) -------------


def _bfl_rows(bfl: str, hidden: int) -> list[tuple[str, slice]]:
    """The diffusers modules a BFL module's rows make, with the rows each takes: `qkv` is
    [q; k; v], single-block `linear1` is [q; k; v; mlp]; the final modulation is (shift, scale)
    in BFL and (scale, shift) in diffusers' AdaLayerNormContinuous."""
    kind, index = bfl.split(".")[:2] if "blocks" in bfl else (bfl, "")
    h = hidden
    if bfl.endswith("img_attn.qkv"):
        d = f"transformer_blocks.{index}.attn."
        return [(d + "to_q", slice(0, h)), (d + "to_k", slice(h, 2 * h)), (d + "to_v", slice(2 * h, 3 * h))]  # fmt: skip
    if bfl.endswith("txt_attn.qkv"):
        d = f"transformer_blocks.{index}.attn."
        return [(d + "add_q_proj", slice(0, h)), (d + "add_k_proj", slice(h, 2 * h)), (d + "add_v_proj", slice(2 * h, 3 * h))]  # fmt: skip
    if bfl.endswith("linear1"):
        d = f"single_transformer_blocks.{index}."
        return [(d + "attn.to_q", slice(0, h)), (d + "attn.to_k", slice(h, 2 * h)), (d + "attn.to_v", slice(2 * h, 3 * h)), (d + "proj_mlp", slice(3 * h, None))]  # fmt: skip
    if bfl == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", slice(None))]  # halves swapped in `_split`
    renamed = {
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
        "img_mlp.0": "ff.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
        "linear2": "proj_out",
        "modulation.lin": "norm.linear",
    }
    tail = bfl.split(".", 2)[2]
    block = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
    return [(f"{block}.{index}.{renamed[tail]}", slice(None))]


def _split(bfl: str, rows: Tensor, hidden: int) -> dict[str, Tensor]:
    """A BFL module's weight (or bias) rows as the diffusers modules' rows."""
    if bfl == "final_layer.adaLN_modulation.1":
        shift, scale = rows.chunk(2)
        return {"norm_out.linear": torch.cat([scale, shift])}
    return {path: rows[part] for path, part in _bfl_rows(bfl, hidden)}


def _fused(base: Weights, bfl: str, hidden: int, param: str = "weight") -> Tensor:
    """The BFL (fused) tensor of the base model, put together by hand."""
    if bfl == "final_layer.adaLN_modulation.1":
        scale, shift = base[f"transformer.norm_out.linear.{param}"].chunk(2)
        return torch.cat([shift, scale])
    return torch.cat([base[f"transformer.{p}.{param}"] for p, _ in _bfl_rows(bfl, hidden)])


# --- the model, once per module --------------------------------------------------------------


@dataclass
class Tiny:
    pipe: object
    base: Weights  # every parameter of the three components, at base
    hidden: int

    def modules(self, component: str) -> dict[str, nn.Module]:
        return dict(getattr(self.pipe, component).named_modules())

    def module(self, component: str, path: str) -> nn.Module:
        modules = self.modules(component)
        return modules.get(path) or modules[path.removeprefix("text_model.")]

    def key(self, component: str, path: str, param: str = "weight") -> str:
        key = f"{component}.{path}.{param}"
        return key if key in self.base else key.replace(".text_model.", ".", 1)

    def shape(self, bfl: str) -> tuple[int, int]:
        rows = _fused(self.base, bfl, self.hidden)
        return tuple(rows.shape)  # type: ignore[return-value]


def _weights(pipe: object) -> Weights:
    return {
        f"{c}.{name}": p.detach()
        for c in COMPONENTS
        for name, p in getattr(pipe, c).named_parameters()
    }


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    pipe = build_pipeline(ModelSpec(Arch.FLUX1, variant=FluxVariant.DEV), seed=3, with_vae=False)
    config = pipe.transformer.config
    base = {k: v.clone() for k, v in _weights(pipe).items()}
    return Tiny(pipe, base, config.num_attention_heads * config.attention_head_dim)


# --- writing files and their references ------------------------------------------------------


@dataclass
class Built:
    """A file's tensors and metadata, and the weights the reference changes (new values)."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    expected: Weights


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _low_rank(
    g: torch.Generator, shape: tuple[int, int], rank: int = RANK
) -> tuple[Tensor, Tensor]:
    up = torch.randn(shape[0], rank, generator=g) * 0.1
    down = torch.randn(rank, shape[1], generator=g) * 0.1
    return up, down


class Hand:
    """A low-rank file written module by module, its reference computed by hand."""

    def __init__(self, tiny: Tiny, name: str, multiplier: float) -> None:
        self.tiny, self.m, self.g = tiny, multiplier, _generator(name)
        self.tensors: dict[str, Tensor] = {}
        self.deltas: Weights = {}

    def _add(self, key: str, delta: Tensor) -> None:
        self.deltas[key] = self.deltas.get(key, 0) + delta

    def lora(
        self,
        key: str,
        shape: tuple[int, int],
        names: tuple[str, str] = ("lora_up.weight", "lora_down.weight"),
        alpha: float | None = None,
    ) -> Tensor:
        """Write one module; its delta at the multiplier (alpha / rank, or 1 with no alpha)."""
        up, down = _low_rank(self.g, shape)
        self.tensors[f"{key}.{names[0]}"], self.tensors[f"{key}.{names[1]}"] = up, down
        scale = 1.0
        if alpha is not None:
            self.tensors[f"{key}.alpha"] = torch.tensor(alpha)
            scale = alpha / RANK
        return self.m * scale * (up @ down)

    def bfl(self, key: str, bfl: str, **kwargs) -> None:
        """A module on a BFL name: the delta of the fused weight, split by rows."""
        delta = self.lora(key, self.tiny.shape(bfl), **kwargs)
        for path, rows in _split(bfl, delta, self.tiny.hidden).items():
            self._add(f"transformer.{path}.weight", rows)

    def split(self, key: str, bfl: str, part: int, **kwargs) -> None:
        """OneTrainer's OMI names: one row block of a fused BFL weight (`qkv.1` = k)."""
        path, rows = _bfl_rows(bfl, self.tiny.hidden)[part]
        shape = tuple(self.tiny.base[f"transformer.{path}.weight"].shape)
        self._add(f"transformer.{path}.weight", self.lora(key, shape, **kwargs))  # type: ignore[arg-type]
        del rows

    def plain(self, key: str, component: str, path: str, **kwargs) -> None:
        """A module on the model's own (diffusers / transformers) name."""
        weight = self.tiny.key(component, path)
        shape = tuple(self.tiny.base[weight].shape)
        self._add(weight, self.lora(key, shape, **kwargs))  # type: ignore[arg-type]

    def bias_diff(self, key: str, bfl: str) -> None:
        """ComfyUI's `diff_b` on a fused bias: rows split like the weight's."""
        bias = torch.randn(
            _fused(self.tiny.base, bfl, self.tiny.hidden, "bias").shape, generator=self.g
        )
        self.tensors[f"{key}.diff_b"] = bias * 0.1
        for path, rows in _split(bfl, self.m * 0.1 * bias, self.tiny.hidden).items():
            self._add(f"transformer.{path}.bias", rows)

    def built(self, metadata: dict[str, str]) -> Built:
        return Built(
            self.tensors,
            metadata,
            {k: self.tiny.base[k] + d for k, d in self.deltas.items()},
        )


def kohya(tiny: Tiny, m: float) -> Built:
    """sd-scripts' FLUX.1 names (networks/lora_flux.py): BFL modules flattened under lora_unet_,
    CLIP-L as lora_te1_, T5-XXL as lora_te3_."""
    hand = Hand(tiny, "kohya", m)
    for bfl, alpha in (
        ("double_blocks.0.img_attn.qkv", 2.0),
        ("double_blocks.1.txt_attn.qkv", 4.0),
        ("double_blocks.0.img_attn.proj", 1.0),
        ("double_blocks.1.txt_mlp.2", 2.0),
        ("double_blocks.0.img_mod.lin", 8.0),
        ("single_blocks.0.linear1", 2.0),
        ("single_blocks.1.linear2", 3.0),
        ("single_blocks.1.modulation.lin", 2.0),
        ("final_layer.adaLN_modulation.1", 2.0),
    ):
        hand.bfl("lora_unet_" + bfl.replace(".", "_"), bfl, alpha=alpha)
    hand.plain("lora_te1_" + CLIP_Q.replace(".", "_"), "text_encoder", CLIP_Q, alpha=2.0)
    hand.plain("lora_te3_" + T5_Q.replace(".", "_"), "text_encoder_2", T5_Q, alpha=2.0)
    hand.plain("lora_te3_" + T5_WO.replace(".", "_"), "text_encoder_2", T5_WO, alpha=1.0)
    return hand.built(KOHYA_META)


def xlabs(tiny: Tiny, m: float) -> Built:
    """x-flux: processor.qkv_lora1/proj_lora1 (image stream), *_lora2 (text); no alpha."""
    hand = Hand(tiny, "xlabs", m)
    names = ("up.weight", "down.weight")
    for block in (0, 1):
        p = f"double_blocks.{block}.processor."
        hand.bfl(p + "qkv_lora1", f"double_blocks.{block}.img_attn.qkv", names=names)
        hand.bfl(p + "qkv_lora2", f"double_blocks.{block}.txt_attn.qkv", names=names)
        hand.bfl(p + "proj_lora1", f"double_blocks.{block}.img_attn.proj", names=names)
        hand.bfl(p + "proj_lora2", f"double_blocks.{block}.txt_attn.proj", names=names)
    return hand.built({})


def onetrainer(tiny: Tiny, m: float) -> Built:
    """OneTrainer's own names: diffusers paths flattened under lora_transformer_, CLIP-L
    lora_te1_, T5 lora_te2_."""
    hand = Hand(tiny, "onetrainer", m)
    for path in (
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.1.attn.add_v_proj",
        "transformer_blocks.0.ff_context.net.0.proj",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.1.attn.to_q",
        "norm_out.linear",
        "x_embedder",
    ):
        hand.plain("lora_transformer_" + path.replace(".", "_"), "transformer", path, alpha=2.0)
    hand.plain("lora_te1_" + CLIP_Q.replace(".", "_"), "text_encoder", CLIP_Q, alpha=2.0)
    hand.plain("lora_te2_" + T5_Q.replace(".", "_"), "text_encoder_2", T5_Q, alpha=4.0)
    return hand.built(FLUX_META)


def onetrainer_omi(tiny: Tiny, m: float) -> Built:
    """OneTrainer's OMI names (convert_flux_lora.py): BFL names under `transformer.`, the fused
    weights split (`qkv.0/1/2` = q/k/v, `linear1.0..3` = q/k/v/mlp), the final modulation in BFL
    order, `clip_l.` and `t5.` for the encoders."""
    hand = Hand(tiny, "onetrainer-omi", m)
    for bfl, parts in (
        ("double_blocks.0.img_attn.qkv", (0, 1, 2)),
        ("double_blocks.1.txt_attn.qkv", (1, 2)),
        ("single_blocks.0.linear1", (0, 1, 2, 3)),
        ("single_blocks.1.linear1", (2,)),
    ):
        for part in parts:
            hand.split(f"transformer.{bfl}.{part}", bfl, part, alpha=2.0)
    for bfl in ("double_blocks.1.img_attn.proj", "single_blocks.0.linear2"):
        hand.bfl(f"transformer.{bfl}", bfl, alpha=2.0)
    hand.bfl("transformer.final_layer.adaLN_modulation.1", "final_layer.adaLN_modulation.1", alpha=2.0)  # fmt: skip
    hand.plain(f"clip_l.{CLIP_Q}", "text_encoder", CLIP_Q, alpha=2.0)
    hand.plain(f"t5.{T5_Q}", "text_encoder_2", T5_Q, alpha=2.0)
    return hand.built(FLUX_META)


def bfl_peft(prefix: str) -> Callable[[Tiny, float], Built]:
    def build(tiny: Tiny, m: float) -> Built:
        """ai-toolkit / fal / BFL: BFL names with PEFT's lora_A/lora_B, no alpha."""
        hand = Hand(tiny, f"bfl-{prefix}", m)
        for bfl in (
            "double_blocks.0.img_attn.qkv",
            "double_blocks.0.txt_attn.qkv",
            "double_blocks.1.txt_mod.lin",
            "double_blocks.1.img_mlp.0",
            "single_blocks.1.linear1",
            "single_blocks.0.linear2",
            "final_layer.adaLN_modulation.1",
        ):
            hand.bfl(prefix + bfl, bfl, names=("lora_B.weight", "lora_A.weight"))
        return hand.built(FLUX_META)

    return build


def comfyui(tiny: Tiny, m: float) -> Built:
    """ComfyUI's LoraSave: `diffusion_model.` BFL names, `diff_b` bias diffs, and the encoders
    under `text_encoders.clip_l.transformer.` / `text_encoders.t5xxl.transformer.`; no alpha."""
    hand = Hand(tiny, "comfyui", m)
    for bfl in (
        "double_blocks.1.img_attn.qkv",
        "single_blocks.0.linear1",
        "single_blocks.1.linear2",
    ):
        hand.bfl("diffusion_model." + bfl, bfl)
    hand.bias_diff("diffusion_model.single_blocks.0.linear1", "single_blocks.0.linear1")
    hand.plain(f"text_encoders.clip_l.transformer.{CLIP_Q}", "text_encoder", CLIP_Q)
    hand.plain(f"text_encoders.t5xxl.transformer.{T5_Q}", "text_encoder_2", T5_Q)
    return hand.built(FLUX_META)


# --- PEFT files: diffusers is the reference ---------------------------------------------------

PEFT_TARGETS = (
    ("transformer", "transformer_blocks.0.attn.to_q"),
    ("transformer", "transformer_blocks.1.attn.add_k_proj"),
    ("transformer", "transformer_blocks.1.ff.net.0.proj"),
    ("transformer", "single_transformer_blocks.0.proj_mlp"),
    ("transformer", "single_transformer_blocks.1.proj_out"),
    ("transformer", "single_transformer_blocks.1.attn.to_v"),
    ("transformer", "norm_out.linear"),
    ("text_encoder", CLIP_Q),
)


def _diffusers_fused(tiny: Tiny, tensors: dict[str, Tensor], m: float) -> Weights:
    """The weights diffusers' load_lora_weights + fuse_lora change, on a copy of the model."""
    pipe = copy.copy(tiny.pipe)
    for component in COMPONENTS:
        setattr(pipe, component, copy.deepcopy(getattr(tiny.pipe, component)))
    pipe.load_lora_weights({k: v.clone() for k, v in tensors.items()}, adapter_name="reference")
    components = sorted({k.split(".", 1)[0] for k in tensors})
    pipe.fuse_lora(components=components, lora_scale=m)
    out = {}
    for key, value in _weights(pipe).items():
        if "lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        if not torch.equal(value, tiny.base[key]):
            out[key] = value.clone()
    return out


def peft(
    wrapper: str = "", dora: bool = False, alpha: bool = False
) -> Callable[[Tiny, float], Built]:
    def build(tiny: Tiny, m: float) -> Built:
        """diffusers / SimpleTuner / ai-toolkit (diffusers names) PEFT files."""
        g = _generator(f"peft-{wrapper}-{dora}-{alpha}")
        tensors: dict[str, Tensor] = {}
        for component, path in PEFT_TARGETS:
            # PEFT's wrapper holds one model; diffusers 0.42.1 leaves a CLIP DoRA magnitude at
            # PEFT's initial ‖W‖ (checked by hand), so DoRA is checked on the transformer
            if (wrapper or dora) and component != "transformer":
                continue
            shape = tuple(tiny.base[tiny.key(component, path)].shape)
            up, down = _low_rank(g, shape)  # type: ignore[arg-type]
            tensors[f"{component}.{path}.lora_A.weight"] = down
            tensors[f"{component}.{path}.lora_B.weight"] = up
            if dora:
                norm = (tiny.base[tiny.key(component, path)] + up @ down).norm(dim=1)
                tensors[f"{component}.{path}.lora_magnitude_vector"] = norm * (1 + 0.3 * torch.rand(norm.shape, generator=g))  # fmt: skip
            if alpha:  # diffusers reads `.alpha` keys as network alphas (scale alpha / rank)
                tensors[f"{component}.{path}.alpha"] = torch.tensor(float(2 + len(tensors) % 3))
        expected = _diffusers_fused(tiny, tensors, 1.0 if dora else m)
        if dora:  # strength as ComfyUI and LyCORIS mean it (PEFT's lora_scale would scale ΔW
            # inside the norm, and still rescale W at 0): LyCORIS' weight_decompose, checked
            # against diffusers' fuse at full strength
            for key in expected:
                stem = key.removesuffix(".weight")
                merged = tiny.base[key] + tensors[f"{stem}.lora_B.weight"] @ tensors[f"{stem}.lora_A.weight"]  # fmt: skip
                magnitude = tensors[f"{stem}.lora_magnitude_vector"][:, None]
                assert (
                    _close({key: weight_decompose(merged, magnitude, 1.0)}, {key: expected[key]})
                    == []
                )
                expected[key] = weight_decompose(merged, magnitude, m)
        if wrapper:  # the reference loads `transformer.`; the file names PEFT's wrapper
            tensors = {wrapper + k.removeprefix("transformer."): v for k, v in tensors.items()}
        return Built(tensors, FLUX_META, expected)

    return build


THELASTBEN_TARGETS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.1.attn.to_out.0",
    "transformer_blocks.0.ff_context.net.0.proj",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.norm.linear",
    "single_transformer_blocks.1.proj_out",
    "norm_out.linear",
    "context_embedder",
    "time_text_embed.guidance_embedder.linear_1",
)


def thelastben(tiny: Tiny, m: float) -> Built:
    """TheLastBen's files (sd-scripts issue #1463): diffusers paths flattened under lora_unet_,
    each name ending in `_`, an alpha per module. The reference is diffusers' load_lora_weights +
    fuse_lora on the same tensors under their PEFT names (`.alpha` read as network alphas)."""
    g = _generator("thelastben")
    tensors: dict[str, Tensor] = {}
    reference: dict[str, Tensor] = {}
    for i, path in enumerate(THELASTBEN_TARGETS):
        up, down = _low_rank(g, tuple(tiny.base[f"transformer.{path}.weight"].shape))  # type: ignore[arg-type]
        alpha = torch.tensor(float(1 + i % 4))
        key = f"lora_unet_{path.replace('.', '_')}_"
        tensors |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}
        tensors[f"{key}.alpha"] = alpha
        peft_key = f"transformer.{path}"
        reference |= {f"{peft_key}.lora_B.weight": up, f"{peft_key}.lora_A.weight": down}
        reference[f"{peft_key}.alpha"] = alpha
    return Built(tensors, FLUX_META, _diffusers_fused(tiny, reference, m))


# --- LyCORIS files: LyCORIS' own modules are the reference -------------------------------------


def _trained(module: nn.Module, g: torch.Generator) -> None:
    """Trainers start at a zero delta: make every tensor matter."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if isinstance(module, FullModule):
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
            elif name == "dora_scale":
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


@torch.no_grad()
def _lycoris_weights(module: nn.Module, inputs: int, m: float) -> tuple[Tensor, Tensor]:
    """The weight and bias LyCORIS' training forward uses at multiplier m, read off its output
    on the identity (y = x W'^T + b')."""
    module.multiplier = m
    bias = module(torch.zeros(1, inputs))[0]
    return (module(torch.eye(inputs)) - bias).T, bias


def lycoris(
    algo: type[nn.Module], key_of: Callable[[str], str], **options
) -> Callable[[Tiny, float], Built]:
    def build(tiny: Tiny, m: float) -> Built:
        """LyCORIS modules on BFL names; fused weights get a fused layer built here."""
        g = _generator(f"{algo.__name__}-{options}")
        tensors: dict[str, Tensor] = {}
        expected: Weights = {}
        targets = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1")
        targets += ("double_blocks.1.img_attn.proj", "final_layer.adaLN_modulation.1")
        for bfl in targets:
            parts = _bfl_rows(bfl, tiny.hidden)
            if len(parts) == 1 and bfl != "final_layer.adaLN_modulation.1":
                # names allow: wrap the model's layer (a copy: apply_to takes its weight over)
                layer = copy.deepcopy(tiny.module("transformer", parts[0][0]))
            else:
                weight = _fused(tiny.base, bfl, tiny.hidden)
                layer = nn.Linear(weight.shape[1], weight.shape[0])
                with torch.no_grad():
                    layer.weight.copy_(weight)
                    layer.bias.copy_(_fused(tiny.base, bfl, tiny.hidden, "bias"))
            weight_shape = tuple(layer.weight.shape)
            extra = {} if algo is FullModule else {"lora_dim": RANK, "alpha": 2.0}
            module = algo("lycoris", layer, **extra, **options)
            module.apply_to()  # as trainers do (Full's state dict assumes it)
            _trained(module, g)
            for name, value in module.state_dict().items():
                tensors[f"{key_of(bfl)}.{name}"] = value.detach().clone()
            weight, bias = _lycoris_weights(module, weight_shape[1], m)
            for path, rows in _split(bfl, weight, tiny.hidden).items():
                expected[f"transformer.{path}.weight"] = rows
            if algo is FullModule:
                for path, rows in _split(bfl, bias, tiny.hidden).items():
                    expected[f"transformer.{path}.bias"] = rows
        return Built(tensors, FLUX_META, expected)

    return build


def _diffusion_model(bfl: str) -> str:
    return "diffusion_model." + bfl


def _kohya_name(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


def _onetrainer_dora(tiny: Tiny, m: float) -> Built:
    """OneTrainer DoRA (lora_transformer_ names, dora_scale [1, in]: the norm over each input
    column, as LyCORIS with wd_on_out=False), wrapping the tiny transformer's own layers."""
    g = _generator("onetrainer-dora")
    tensors: dict[str, Tensor] = {}
    expected: Weights = {}
    for path in ("transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_out"):
        layer = copy.deepcopy(tiny.module("transformer", path))
        module = LoConModule("x", layer, lora_dim=RANK, alpha=2.0, weight_decompose=True, wd_on_out=False)  # fmt: skip
        module.apply_to()
        _trained(module, g)
        for name, value in module.state_dict().items():
            tensors[f"lora_transformer_{path.replace('.', '_')}.{name}"] = value.detach().clone()
        expected[f"transformer.{path}.weight"] = _lycoris_weights(module, layer.in_features, m)[0]
    return Built(tensors, FLUX_META, expected)


CASES: dict[str, Callable[[Tiny, float], Built]] = {
    "kohya": kohya,
    "xlabs": xlabs,
    "onetrainer": onetrainer,
    "onetrainer-omi": onetrainer_omi,
    "onetrainer-dora": _onetrainer_dora,
    "ai-toolkit": bfl_peft("diffusion_model."),
    "bfl-bare": bfl_peft(""),
    "fal": bfl_peft("base_model.model."),
    "comfyui": comfyui,
    "diffusers": peft(),
    "simpletuner-alpha": peft(alpha=True),
    "thelastben": thelastben,
    "peft-base-model": peft(wrapper="base_model.model."),
    "peft-dora": peft(dora=True),
    "lycoris-lokr": lycoris(LokrModule, _diffusion_model, factor=4),
    "lycoris-lokr-dora": lycoris(LokrModule, _kohya_name, factor=4, weight_decompose=True),
    "lycoris-loha": lycoris(LohaModule, _kohya_name),
    "lycoris-locon-dora": lycoris(LoConModule, _kohya_name, weight_decompose=True),
    "lycoris-full": lycoris(FullModule, _diffusion_model),
}


@contextmanager
def _applied(model: object, path: Path, m: float) -> Iterator[None]:
    """The file applied at multiplier m, whole (no warning), restored on the way out."""
    network = read_network(path)
    backends = LoraBackends(model, Arch.FLUX1)
    try:
        routed = backends.apply(
            [ChosenNetwork(network.name, network, Strengths.uniform(m))], LoraBackend.AUTO
        )
        assert routed.applied and not routed.warnings, routed.warnings
        yield
    finally:
        backends.restore()


def _close(got: Weights, want: Weights) -> list[str]:
    """Keys where max |got - want| > 1e-5 max |want|. Uses `want` up (it ends as the differences:
    full-width deltas are 1 GB, and fresh temporaries cost more than the arithmetic)."""
    bad = []
    for key, w in want.items():
        scale = torch.linalg.vector_norm(w, float("inf")).item()
        error = torch.linalg.vector_norm(w.sub_(got[key]), float("inf")).item()
        if error > 1e-5 * max(scale, 1e-12):
            bad.append(f"{key}: max error {error:.3g}")
    return bad


@pytest.mark.parametrize("multiplier", MULTIPLIERS)
@pytest.mark.parametrize("case", list(CASES))
def test_format_matches_its_reference(
    case: str, multiplier: float, tiny: Tiny, tmp_path: Path
) -> None:
    built = CASES[case](tiny, multiplier)
    assert built.expected, "the reference changes nothing"
    path = tmp_path / f"{case}.safetensors"
    save_file(built.tensors, path, metadata=built.metadata or None)
    with _applied(tiny.pipe, path, multiplier):
        after = _weights(tiny.pipe)
        changed = {k for k, v in after.items() if not torch.equal(v, tiny.base[k])}
        assert changed == set(built.expected)
        assert _close(after, built.expected) == []
    assert all(torch.equal(v, tiny.base[k]) for k, v in _weights(tiny.pipe).items())


# --- full width: diffusers' own converters ---------------------------------------------------

FULL = 3072


@pytest.fixture(scope="module")
def wide() -> SimpleNamespace:
    """FLUX.1-dev's transformer with one double and one single block (~0.5 B parameters, 2 GB in
    fp32), weights zero: the delta is then the weight itself."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
        )
    transformer.to_empty(device="cpu")
    with torch.no_grad():
        for param in transformer.parameters():
            param.zero_()
    return SimpleNamespace(
        unet=None, transformer=transformer, text_encoder=None, text_encoder_2=None
    )


def _wide_kohya(g: torch.Generator) -> dict[str, Tensor]:
    tensors = {}
    shapes = {
        "double_blocks_0_img_attn_qkv": (3 * FULL, FULL),
        "double_blocks_0_txt_attn_qkv": (3 * FULL, FULL),
        "double_blocks_0_img_attn_proj": (FULL, FULL),
        "double_blocks_0_img_mod_lin": (6 * FULL, FULL),
        "single_blocks_0_linear1": (7 * FULL, FULL),
        "single_blocks_0_linear2": (FULL, 5 * FULL),
    }
    for i, (name, shape) in enumerate(shapes.items()):
        up, down = _low_rank(g, shape)
        key = f"lora_unet_{name}"
        tensors |= {f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down}
        tensors[f"{key}.alpha"] = torch.tensor(float(2 + i % 3))
    return tensors


def _wide_xlabs(g: torch.Generator) -> dict[str, Tensor]:
    tensors = {}
    for name, shape in {
        "qkv_lora1": (3 * FULL, FULL),
        "qkv_lora2": (3 * FULL, FULL),
        "proj_lora1": (FULL, FULL),
        "proj_lora2": (FULL, FULL),
    }.items():
        up, down = _low_rank(g, shape)
        key = f"double_blocks.0.processor.{name}"
        tensors |= {f"{key}.up.weight": up, f"{key}.down.weight": down}
    return tensors


# one strength: the strength path is checked on the tiny model; this checks the converters' names
@pytest.mark.parametrize("multiplier", [0.7])
@pytest.mark.parametrize("case", ["kohya", "xlabs"])
def test_full_width_matches_diffusers_converter(
    case: str, multiplier: float, wide: SimpleNamespace, tmp_path: Path
) -> None:
    """diffusers' FLUX.1 converters (full width only) turn the file into PEFT modules; PEFT's
    merge is W + s * B @ A with diffusers' network alphas (none: the converters fold them in)."""
    g = _generator(f"wide-{case}")
    tensors = _wide_kohya(g) if case == "kohya" else _wide_xlabs(g)
    converted, alphas = FluxPipeline.lora_state_dict(
        {k: v.clone() for k, v in tensors.items()}, return_alphas=True
    )
    assert not alphas
    expected: Weights = {}
    for key in converted:
        if key.endswith(".lora_A.weight"):
            stem = key.removesuffix(".lora_A.weight")
            delta = converted[f"{stem}.lora_B.weight"] @ converted[key]
            expected[f"{stem.removeprefix('transformer.')}.weight"] = delta.mul_(multiplier)
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, path, metadata=KOHYA_META if case == "kohya" else None)
    transformer = wide.transformer
    weights = dict(transformer.named_parameters())
    with _applied(wide, path, multiplier):
        changed = {k for k, v in weights.items() if v.count_nonzero()}
        assert changed == set(expected)
        assert _close({k: weights[k].detach() for k in expected}, expected) == []
    assert not any(weights[k].count_nonzero() for k in expected)  # back to zero
