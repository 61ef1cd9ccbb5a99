"""Every LoRA variant's weight delta against the trainer's own implementation (LyCORIS 4.1.3).

One table of formats, one parametrized test: build the LyCORIS module around a tiny layer,
randomise its trainable tensors, save its state dict as the "file", and check that our
`parse_module(...).weight_delta(...)` lands on the weight LyCORIS produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.full import FullModule as LycorisFull
from lycoris.modules.glora import GLoRAModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule as LycorisLoha
from lycoris.modules.lokr import LokrModule as LycorisLokr
from lycoris.modules.norms import NormModule as LycorisNorm
from torch import Tensor, nn

from webui.networks.format.modules import (
    LoraModule,
    ShapeMismatchError,
    UnsupportedModuleError,
    Variant,
    group_by_module,
    parse_module,
    split_module_key,
)

IN, OUT = 32, 64
PREFIX = "lora_unet_block"
LAYERS: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(IN, OUT),
    "conv3x3": lambda: nn.Conv2d(IN, OUT, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(IN, OUT, 1),
    "layernorm": lambda: nn.LayerNorm(OUT),
}
INPUTS: dict[str, Callable[[], Tensor]] = {
    "linear": lambda: torch.randn(2, IN),
    "conv3x3": lambda: torch.randn(1, IN, 5, 5),
    "conv1x1": lambda: torch.randn(1, IN, 5, 5),
}


@dataclass(frozen=True)
class Reference:
    """A network file's tensors for one module and the weight/bias its trainer merges to."""

    tensors: dict[str, Tensor]
    merged: Callable[[float], tuple[Tensor, Tensor | None]]
    prefix: str = PREFIX


@torch.no_grad()
def randomise(module: nn.Module) -> None:
    """LyCORIS initialises to a zero delta; make every trainable tensor matter."""
    for name, param in module.named_parameters():
        if ".base_layer." in name:
            continue  # PEFT wraps the original layer, which must stay as it was
        if name.endswith(("dora_scale", "lora_magnitude_vector.default.weight")):
            param.mul_(1 + 0.2 * torch.randn_like(param))
        elif name.endswith("rescale"):
            param.copy_(1 + 0.2 * torch.randn_like(param))
        else:
            param.normal_(0, 0.2)


def lycoris(cls: type, reference: str = "merge", **kwargs) -> Callable[[nn.Module, str], Reference]:
    """A LyCORIS module built around the layer; `reference` picks merge_to or the forward.

    LyCORIS 4.1.3's LoHa/LoKr merge_to applies alpha/rank twice (get_weight already scales,
    get_diff_weight scales again), while their training forward applies it once; the
    forward is the math the trainer optimised, so those rows compare against it.
    """

    def build(layer: nn.Module, kind: str) -> Reference:
        module = cls("x", layer, 1.0, **kwargs)
        randomise(module)
        tensors = {k: v.detach().clone() for k, v in module.state_dict().items()}

        def merged(multiplier: float) -> tuple[Tensor, Tensor | None]:
            if reference == "merge":
                module.merge_to(multiplier)
                bias = None if layer.bias is None else layer.bias.detach().clone()
                return layer.weight.detach().clone(), bias
            return forward_delta(module, layer, kind, multiplier), None

        return Reference(tensors, merged)

    return build


@torch.no_grad()
def forward_delta(module: nn.Module, layer: nn.Module, kind: str, multiplier: float) -> Tensor:
    """W + the delta weight LyCORIS' rebuild forward passes to its op."""
    captured: dict[str, Tensor] = {}
    op = module.op

    def recording_op(x: Tensor, weight: Tensor, bias: Tensor | None = None, **kw) -> Tensor:
        captured["delta"] = weight.detach().clone()
        return op(x, weight, bias, **kw)

    module.op = recording_op
    module.multiplier = multiplier
    module.bypass_mode = False
    module.eval()
    module(INPUTS[kind]())
    return layer.weight.detach() + captured["delta"]


def full(layer: nn.Module, kind: str) -> Reference:
    """LyCORIS full: its state_dict() is only right after apply_to, so build from a file."""
    diff = 0.2 * torch.randn_like(layer.weight)
    diff_b = 0.2 * torch.randn_like(layer.bias)
    with torch.no_grad():
        module = LycorisFull.make_module_from_state_dict("x", layer, diff, diff_b)

    @torch.no_grad()
    def merged(multiplier: float) -> tuple[Tensor, Tensor | None]:
        module.merge_to(multiplier)
        return layer.weight.detach().clone(), layer.bias.detach().clone()

    return Reference({"diff": diff, "diff_b": diff_b}, merged)


def peft_dora(layer: nn.Module, kind: str) -> Reference:
    """PEFT DoRA (lora_A/lora_B/lora_magnitude_vector); PEFT keeps alpha in its config."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(
        nn.Sequential(layer), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True)
    )
    randomise(model)
    tensors = {
        split_module_key(key)[1]: value.detach().clone()
        for key, value in get_peft_model_state_dict(model).items()
    }

    @torch.no_grad()
    def merged(multiplier: float) -> tuple[Tensor, Tensor | None]:
        unloaded = model.merge_and_unload()[0]
        return unloaded.weight.detach().clone(), None

    return Reference(tensors | {"alpha": torch.tensor(8.0)}, merged)


def kohya_oft(alpha: float) -> Callable[[nn.Module, str], Reference]:
    """kohya sd-scripts OFT, which is not installable here: its formula, written out."""

    def build(layer: nn.Module, kind: str) -> Reference:
        num_blocks = 8
        size = OUT // num_blocks
        blocks = 0.2 * torch.randn(num_blocks, size, size)
        original = layer.weight.detach().clone()

        def merged(multiplier: float) -> tuple[Tensor, Tensor | None]:
            # networks/oft.py OFTModule.get_weight: Q = B − Bᵀ, ‖Q‖ clamped to alpha·out_dim,
            # R = (I+Q)(I−Q)⁻¹, R_m = m(R − I) + I; OFTInfModule.merge_to: W'_k = R_kᵀ W_k.
            q = blocks - blocks.transpose(1, 2)
            norm_q = torch.norm(q.flatten())
            q = q * ((torch.clamp(norm_q, max=alpha * OUT) + 1e-8) / (norm_q + 1e-8))
            eye = torch.eye(size).unsqueeze(0).repeat(num_blocks, 1, 1)
            r = torch.matmul(eye + q, (eye - q).float().inverse())
            r = multiplier * (r - eye) + eye
            w = original.reshape(num_blocks, size, -1)
            w = torch.einsum("k n m, k n ... -> k m ...", r, w)
            return w.reshape(original.shape), None

        return Reference({"oft_blocks": blocks, "alpha": torch.tensor(alpha)}, merged, "oft_unet_x")

    return build


@dataclass(frozen=True)
class Format:
    """One row of the table: a variant and the layer kinds it is tested on."""

    name: str
    variant: Variant
    build: Callable[[nn.Module, str], Reference]
    layers: tuple[str, ...] = ("linear", "conv3x3")
    multipliers: tuple[float, ...] = (1.0, 0.7)


FORMATS: tuple[Format, ...] = (
    Format("lora", Variant.LORA, lycoris(LoConModule, lora_dim=4, alpha=2)),
    Format("locon 1x1", Variant.LORA, lycoris(LoConModule, lora_dim=4, alpha=8), ("conv1x1",)),
    Format(
        "lora tucker",
        Variant.LORA,
        lycoris(LoConModule, lora_dim=4, alpha=2, use_tucker=True),
        ("conv3x3",),
    ),
    Format(
        "dora out",
        Variant.LORA,
        lycoris(LoConModule, lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=True),
    ),
    Format(
        "dora in",
        Variant.LORA,
        lycoris(LoConModule, lora_dim=4, alpha=2, weight_decompose=True, wd_on_out=False),
    ),
    # PEFT folds its multiplier into ΔW before normalising; we follow LyCORIS, equal at 1.0.
    Format("peft dora", Variant.LORA, peft_dora, multipliers=(1.0,)),
    Format("loha", Variant.LOHA, lycoris(LycorisLoha, "forward", lora_dim=4, alpha=2)),
    Format(
        "loha tucker",
        Variant.LOHA,
        lycoris(LycorisLoha, "forward", lora_dim=4, alpha=2, use_tucker=True),
        ("conv3x3",),
    ),
    Format(
        "loha dora",
        Variant.LOHA,
        lycoris(LycorisLoha, "forward", lora_dim=4, alpha=2, weight_decompose=True),
    ),
    Format(
        "lokr full",
        Variant.LOKR,
        lycoris(LycorisLokr, "forward", lora_dim=4, alpha=2, full_matrix=True),
    ),
    Format(
        "lokr factored",
        Variant.LOKR,
        lycoris(LycorisLokr, "forward", lora_dim=2, alpha=1, decompose_both=True),
    ),
    Format(
        "lokr tucker",
        Variant.LOKR,
        lycoris(LycorisLokr, "forward", lora_dim=2, alpha=1, use_tucker=True),
        ("conv3x3",),
    ),
    Format(
        "lokr dora",
        Variant.LOKR,
        lycoris(LycorisLokr, "forward", lora_dim=2, alpha=1, weight_decompose=True),
    ),
    Format("ia3", Variant.IA3, lycoris(IA3Module)),
    Format("ia3 on_input", Variant.IA3, lycoris(IA3Module, train_on_input=True)),
    Format("glora", Variant.GLORA, lycoris(GLoRAModule, lora_dim=4, alpha=2)),
    Format("diag-oft", Variant.OFT, lycoris(DiagOFTModule, lora_dim=4)),
    Format(
        "diag-oft constraint rescale",
        Variant.OFT,
        lycoris(DiagOFTModule, lora_dim=4, constraint=1e-3, rescaled=True),
    ),
    Format("kohya oft", Variant.OFT, kohya_oft(alpha=1e-3)),
    Format("boft", Variant.BOFT, lycoris(ButterflyOFTModule, lora_dim=4)),
    Format(
        "boft constraint rescale",
        Variant.BOFT,
        lycoris(ButterflyOFTModule, lora_dim=4, constraint=1e-3, rescaled=True),
    ),
    Format("full", Variant.FULL, full),
    Format("norm", Variant.NORM, lycoris(LycorisNorm), ("layernorm",)),
)

CASES = [
    pytest.param(fmt, kind, multiplier, id=f"{fmt.name}-{kind}-{multiplier}")
    for fmt in FORMATS
    for kind in fmt.layers
    for multiplier in fmt.multipliers
]


@pytest.mark.parametrize(("fmt", "kind", "multiplier"), CASES)
def test_weight_delta_matches_trainer(fmt: Format, kind: str, multiplier: float) -> None:
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    original = layer.weight.detach().clone()
    original_bias = None if layer.bias is None else layer.bias.detach().clone()
    reference = fmt.build(layer, kind)
    file = {f"{reference.prefix}.{suffix}": t for suffix, t in reference.tensors.items()}

    (prefix, tensors), *others = group_by_module(file).items()
    assert prefix == reference.prefix and not others
    module = parse_module(prefix, tensors)
    assert module.variant is fmt.variant
    assert module.accepts(original.shape)
    delta = module.weight_delta(original, multiplier, original_bias)

    want_weight, want_bias = reference.merged(multiplier)
    assert (want_weight - original).abs().max() > 1e-3, "vacuous: the trainer's delta is zero"
    tolerance = 1e-5 * want_weight.abs().max().item()
    torch.testing.assert_close(original + delta.weight, want_weight, rtol=1e-5, atol=tolerance)
    if want_bias is not None and original_bias is not None and delta.bias is not None:
        torch.testing.assert_close(original_bias + delta.bias, want_bias, rtol=1e-5, atol=1e-6)
    else:
        assert want_bias is None or torch.equal(want_bias, original_bias)
        assert delta.bias is None


@pytest.mark.parametrize(
    ("key", "prefix", "suffix"),
    [
        ("lora_unet_a_b.lora_down.weight", "lora_unet_a_b", "lora_down.weight"),
        ("unet.a.to_q.lora_A.weight", "unet.a.to_q", "lora_A.weight"),
        ("unet.a.to_q.lora_B.default.weight", "unet.a.to_q", "lora_B.default.weight"),
        ("unet.a.processor.to_q_lora.down.weight", "unet.a.processor.to_q_lora", "down.weight"),
        ("unet.a.to_q.lora.up.weight", "unet.a.to_q", "lora.up.weight"),
        ("te.q_proj.lora_linear_layer.down.weight", "te.q_proj", "lora_linear_layer.down.weight"),
        ("unet.a.to_q.lora_magnitude_vector", "unet.a.to_q", "lora_magnitude_vector"),
        ("lora_unet_a.hada_w1_a", "lora_unet_a", "hada_w1_a"),
        ("lora_unet_a.a1.weight", "lora_unet_a", "a1.weight"),
        ("lora_unet_a.weight", "lora_unet_a", "weight"),
        ("lora_unet_a.something_new", "lora_unet_a", "something_new"),
    ],
)
def test_split_module_key(key: str, prefix: str, suffix: str) -> None:
    assert split_module_key(key) == (prefix, suffix)


@pytest.mark.parametrize(
    ("down", "up"),
    [
        ("lora_A.weight", "lora_B.weight"),
        ("lora_A.default.weight", "lora_B.default.weight"),
        ("down.weight", "up.weight"),
        ("lora.down.weight", "lora.up.weight"),
        ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight"),
    ],
)
def test_lora_spellings_mean_lora(down: str, up: str) -> None:
    torch.manual_seed(0)
    a, b, w = torch.randn(4, IN), torch.randn(OUT, 4), torch.randn(OUT, IN)
    module = parse_module("m", {down: a, up: b, "alpha": torch.tensor(2.0)})
    torch.testing.assert_close(module.weight_delta(w, 0.7).weight, 0.7 * 0.5 * (b @ a))


def test_unsupported_module_names_prefix_and_keys() -> None:
    with pytest.raises(UnsupportedModuleError, match="lora_unet_mystery") as raised:
        parse_module("lora_unet_mystery", {"foo": torch.zeros(1), "bar.weight": torch.zeros(1)})
    assert raised.value.keys == ["bar.weight", "foo"]
    assert "foo" in str(raised.value)


def test_dyn_truncation_is_the_truncated_lora() -> None:
    torch.manual_seed(0)
    down, up, alpha = torch.randn(8, IN, 3, 3), torch.randn(OUT, 8, 1, 1), torch.tensor(4.0)
    weight = torch.randn(OUT, IN, 3, 3)
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": alpha}
    dynamic = parse_module("m", tensors, dyn=3)
    truncated = parse_module(
        "m", {"lora_down.weight": down[:3], "lora_up.weight": up[:, :3], "alpha": alpha}
    )
    assert isinstance(dynamic, LoraModule) and dynamic.rank == 3
    got = dynamic.weight_delta(weight, 0.7).weight
    torch.testing.assert_close(got, truncated.weight_delta(weight, 0.7).weight)
    assert not torch.allclose(got, parse_module("m", tensors).weight_delta(weight, 0.7).weight)


def test_shape_mismatch_is_reported_not_crashed() -> None:
    module = parse_module(
        "m", {"lora_down.weight": torch.ones(4, IN), "lora_up.weight": torch.ones(OUT, 4)}
    )
    assert module.accepts(torch.Size([OUT, IN, 1, 1]))
    assert not module.accepts(torch.Size([OUT, IN + 1]))
    with pytest.raises(ShapeMismatchError, match="m: lora"):
        module.weight_delta(torch.zeros(OUT, IN + 1), 1.0)
