"""From a network file's keys to typed modules: suffix grammar, grouping and variant choice."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from torch import Tensor

from webui.networks.format.key_formats import canonical_prefix, embedding_name, is_embedding_key

from .base import InvalidModuleError, NetworkModule, Variant, WeightDecompose
from .full import FullModule, NormModule
from .glora import GloraModule
from .ia3 import Ia3Module
from .loha import LohaModule
from .lokr import LokrModule
from .lora import LoraModule
from .oft import BoftModule, OftConstraint, OftModule

logger = logging.getLogger(__name__)


class UnsupportedModuleError(ValueError):
    """No variant matches the set of tensors found under one module prefix."""

    def __init__(self, prefix: str, keys: list[str], reason: str = "") -> None:
        self.prefix = prefix
        self.keys = sorted(keys)
        detail = f" ({reason})" if reason else ""
        super().__init__(f"unsupported network module {prefix!r} with keys {self.keys}{detail}")


@dataclass(frozen=True)
class SuffixRule:
    """One spelling of a tensor suffix and the canonical name it stands for."""

    pattern: re.Pattern[str]
    canonical: str


def _literal(suffix: str, canonical: str | None = None) -> SuffixRule:
    return SuffixRule(re.compile(re.escape(suffix)), canonical or suffix)


# PEFT may keep the adapter name between the layer name and `weight`.
_ADAPTER = r"(?:\.[A-Za-z0-9_\-]+)?"

SUFFIX_RULES: tuple[SuffixRule, ...] = (
    _literal("lora_up.weight"),
    _literal("lora_down.weight"),
    _literal("lora_mid.weight"),
    SuffixRule(re.compile(rf"lora_B{_ADAPTER}\.weight"), "lora_up.weight"),
    SuffixRule(re.compile(rf"lora_A{_ADAPTER}\.weight"), "lora_down.weight"),
    _literal("lora_linear_layer.up.weight", "lora_up.weight"),
    _literal("lora_linear_layer.down.weight", "lora_down.weight"),
    _literal("lora.up.weight", "lora_up.weight"),
    _literal("lora.down.weight", "lora_down.weight"),
    _literal("up.weight", "lora_up.weight"),
    _literal("down.weight", "lora_down.weight"),
    _literal("alpha"),
    _literal("dora_scale"),
    SuffixRule(
        re.compile(rf"lora_magnitude_vector{_ADAPTER}(?:\.weight)?"), "lora_magnitude_vector"
    ),
    *(_literal(f"hada_{name}") for name in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *(_literal(f"lokr_{name}") for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
    _literal("weight"),
    _literal("on_input"),
    *(_literal(f"{name}.weight") for name in ("a1", "a2", "b1", "b2", "bm")),
    _literal("oft_blocks"),
    _literal("rescale"),
    _literal("diff"),
    _literal("diff_b"),
    _literal("w_norm"),
    _literal("b_norm"),
)


@cache  # every dot of every key in a file is tried against the rules
def canonical_suffix(suffix: str) -> str | None:
    """The canonical (kohya/LyCORIS) name of a known suffix spelling, or None."""
    for rule in SUFFIX_RULES:
        if rule.pattern.fullmatch(suffix):
            return rule.canonical
    return None


def split_module_key(key: str) -> tuple[str, str]:
    """Split a file key into (module prefix, tensor suffix), preferring the longest known suffix.

    The suffix starts after a '.', so `to_q_lora.down.weight` splits as
    (`…to_q_lora`, `down.weight`). A key with no known suffix splits at its last '.'.
    """
    start = 0
    while (dot := key.find(".", start)) != -1:
        if canonical_suffix(key[dot + 1 :]) is not None:
            return key[:dot], key[dot + 1 :]
        start = dot + 1
    prefix, _, suffix = key.rpartition(".")
    return (prefix, suffix) if prefix else (key, "")


def group_by_module(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Group a file's tensors by canonical module name (`formats.canonical_prefix`: one module
    spelled two ways, as diffusers' kohya converter does for DoRA, is one group); inner keys are
    the suffixes as spelled. Bundled embeddings (`bundle_emb.…`) are set aside, not grouped."""
    groups: dict[str, dict[str, Tensor]] = {}
    embeddings: set[str] = set()
    for key, tensor in state_dict.items():
        if is_embedding_key(key):
            embeddings.add(embedding_name(key))
            continue
        prefix, suffix = split_module_key(key)
        group = groups.setdefault(canonical_prefix(prefix), {})
        if suffix in group:
            logger.warning("%s: %s is spelled twice; using the first", prefix, suffix)
            continue
        group[suffix] = tensor
    if embeddings:
        logger.info("bundled embeddings set aside (not LoRA modules): %s", sorted(embeddings))
    return groups


def _scalar(prefix: str, name: str, tensor: Tensor | None) -> float | None:
    if tensor is None:
        return None
    if tensor.numel() != 1 or tensor.is_complex():
        shape = tuple(tensor.shape)
        raise InvalidModuleError(prefix, f"{name} must be one number, it has shape {shape}")
    return float(tensor.float().item())


class _Tensors:
    """The tensors of one module by canonical suffix, remembering which ones were used."""

    def __init__(self, prefix: str, tensors: Mapping[str, Tensor]) -> None:
        self.prefix = prefix
        self.spelled = dict(tensors)
        self.by_name: dict[str, Tensor] = {}
        self.unknown: list[str] = []
        for suffix, tensor in tensors.items():
            name = canonical_suffix(suffix)
            if name is None:
                self.unknown.append(suffix)
            elif name in self.by_name:
                logger.warning(
                    "%s: %s duplicates another %s; using the first", prefix, suffix, name
                )
            else:
                self.by_name[name] = tensor
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def get(self, name: str) -> Tensor | None:
        self.used.add(name)
        return self.by_name.get(name)

    def require(self, name: str) -> Tensor:
        tensor = self.get(name)
        if tensor is None:
            raise UnsupportedModuleError(self.prefix, list(self.spelled), f"missing {name}")
        return tensor

    def warn_unused(self) -> None:
        unused = sorted(set(self.by_name) - self.used) + sorted(self.unknown)
        if unused:
            logger.warning("%s: ignoring unexpected keys %s", self.prefix, unused)


def _decompose(t: _Tensors) -> WeightDecompose | None:
    if (magnitude := t.get("lora_magnitude_vector")) is not None:
        # PEFT keeps one magnitude per output channel, whatever its stored shape.
        return WeightDecompose(magnitude=magnitude.flatten(), on_output=True)
    if (scale := t.get("dora_scale")) is None:
        return None
    # LyCORIS wd_on_out stores (out, 1, …); the input-column form (1, in, …).
    on_output = scale.dim() < 2 or scale.shape[0] != 1 or scale.shape[1] == 1
    return WeightDecompose(magnitude=scale.flatten(), on_output=on_output)


def _lora(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    module = LoraModule(
        key=prefix,
        alpha=_scalar(prefix, "alpha", t.get("alpha")),
        dora=_decompose(t),
        bias_diff=t.get("diff_b"),
        up=t.require("lora_up.weight"),
        down=t.require("lora_down.weight"),
        mid=t.get("lora_mid.weight"),
    )
    return module if dyn is None else module.truncated(dyn)


def _loha(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    return LohaModule(
        key=prefix,
        alpha=_scalar(prefix, "alpha", t.get("alpha")),
        dora=_decompose(t),
        bias_diff=t.get("diff_b"),
        w1_a=t.require("hada_w1_a"),
        w1_b=t.require("hada_w1_b"),
        w2_a=t.require("hada_w2_a"),
        w2_b=t.require("hada_w2_b"),
        t1=t.get("hada_t1"),
        t2=t.get("hada_t2"),
    )


def _lokr(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    try:
        return LokrModule(
            key=prefix,
            alpha=_scalar(prefix, "alpha", t.get("alpha")),
            dora=_decompose(t),
            bias_diff=t.get("diff_b"),
            w1=t.get("lokr_w1"),
            w1_a=t.get("lokr_w1_a"),
            w1_b=t.get("lokr_w1_b"),
            w2=t.get("lokr_w2"),
            w2_a=t.get("lokr_w2_a"),
            w2_b=t.get("lokr_w2_b"),
            t2=t.get("lokr_t2"),
        )
    except InvalidModuleError:
        raise
    except ValueError as error:  # a missing half: not a LoKr we know
        raise UnsupportedModuleError(prefix, list(t.spelled), str(error)) from error


def _ia3(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    return Ia3Module(
        key=prefix,
        weight=t.require("weight"),
        on_input=bool(_scalar(prefix, "on_input", t.require("on_input"))),
    )


def _glora(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    return GloraModule(
        key=prefix,
        alpha=_scalar(prefix, "alpha", t.get("alpha")),
        a1=t.require("a1.weight"),
        a2=t.require("a2.weight"),
        b1=t.require("b1.weight"),
        b2=t.require("b2.weight"),
        bm=t.get("bm.weight"),
    )


def _oft(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    blocks = t.require("oft_blocks")
    alpha = _scalar(prefix, "alpha", t.get("alpha"))
    rescale = t.get("rescale")
    if blocks.dim() == 4:
        return BoftModule(key=prefix, blocks=blocks, alpha=alpha, rescale=rescale)
    if blocks.dim() != 3:
        raise UnsupportedModuleError(prefix, list(t.spelled), "oft_blocks must be 3-D or 4-D")
    # kohya's networks/oft.py names its modules oft_unet_*; LyCORIS uses lora_*.
    style = OftConstraint.KOHYA if prefix.startswith("oft_") else OftConstraint.LYCORIS
    return OftModule(
        key=prefix, blocks=blocks, alpha=alpha, rescale=rescale, constraint_style=style
    )


def _full(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    return FullModule(key=prefix, diff=t.require("diff"), diff_b=t.get("diff_b"))


def _norm(prefix: str, t: _Tensors, dyn: int | None) -> NetworkModule:
    return NormModule(key=prefix, w_norm=t.require("w_norm"), b_norm=t.get("b_norm"))


ModuleParser = Callable[[str, _Tensors, int | None], NetworkModule]

# The one variant table: the tensor that identifies each variant, checked in order, first
# present wins. The loader builds modules from it and the catalog's badges are read from it.
VARIANT_MARKERS: tuple[tuple[str, Variant, ModuleParser], ...] = (
    ("lora_down.weight", Variant.LORA, _lora),
    ("lora_up.weight", Variant.LORA, _lora),
    ("hada_w1_a", Variant.LOHA, _loha),
    ("lokr_w1", Variant.LOKR, _lokr),
    ("lokr_w1_a", Variant.LOKR, _lokr),
    ("on_input", Variant.IA3, _ia3),
    ("a1.weight", Variant.GLORA, _glora),
    ("oft_blocks", Variant.OFT, _oft),  # BOFT when its blocks are 4-D (see `_oft`)
    ("diff", Variant.FULL, _full),
    ("w_norm", Variant.NORM, _norm),
)
# Suffixes of a weight decompose (DoRA), reported beside the variant they decompose.
DECOMPOSE_SUFFIXES = frozenset({"dora_scale", "lora_magnitude_vector"})
DORA = "dora"
# The order badges are listed in.
VARIANT_ORDER: tuple[str, ...] = (*(v.value for v in Variant), DORA)


def module_variant(shapes: Mapping[str, tuple[int, ...]]) -> Variant | None:
    """The variant `parse_module` builds from one module's tensors (canonical suffix -> shape),
    told from names and shapes alone; None where it builds none."""
    for marker, variant, _ in VARIANT_MARKERS:
        if marker in shapes:
            if variant is Variant.OFT:
                dims = len(shapes[marker])
                return {3: Variant.OFT, 4: Variant.BOFT}.get(dims)
            return variant
    return None


def file_variants(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The variants of a whole file (key -> shape, e.g. from its header), grouped into modules as
    `group_by_module` groups them, plus `dora` when a module carries a weight decompose."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if is_embedding_key(key):
            continue
        prefix, suffix = split_module_key(key)
        name = canonical_suffix(suffix)
        if name is not None:
            modules.setdefault(canonical_prefix(prefix), {}).setdefault(name, shape)
    found: set[str] = set()
    for module in modules.values():
        variant = module_variant(module)
        if variant is not None:
            found.add(variant.value)
        if DECOMPOSE_SUFFIXES & module.keys():
            found.add(DORA)
    return tuple(v for v in VARIANT_ORDER if v in found)


def parse_module(
    prefix: str, tensors: Mapping[str, Tensor], *, dyn: int | None = None
) -> NetworkModule:
    """Build the typed module for one prefix from its suffix → tensor map.

    Suffixes may be spelled any way `split_module_key` knows. `dyn` keeps the first `dyn`
    ranks of a (DyLoRA) LoRA with its alpha unchanged; other variants ignore it. Raises
    UnsupportedModuleError, naming the prefix and keys, when no variant matches;
    InvalidModuleError, naming the prefix and the tensor, when the matched variant's tensors
    are malformed (ranks that disagree, a 0-d factor, a non-scalar alpha); warns
    about keys a matched variant does not use.
    """
    t = _Tensors(prefix, tensors)
    for marker, _, parser in VARIANT_MARKERS:
        if marker in t:
            module = parser(prefix, t, dyn)
            t.warn_unused()
            if dyn is not None and not isinstance(module, LoraModule):
                logger.debug("%s: dyn=%d only truncates LoRA; %s ignores it", prefix, dyn, marker)
            return module
    raise UnsupportedModuleError(prefix, list(tensors))
