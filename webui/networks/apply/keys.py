"""LoRA file key names -> model modules.

A LoRA file names each module it changes with a prefix (`registry.split_module_key` cuts the
tensor suffix off). The naming schemes in the wild, all resolved here against a loaded diffusers
pipeline:

- kohya/LyCORIS, diffusers layout: `lora_unet_down_blocks_0_attentions_0_proj_in`
- kohya/LyCORIS, original LDM layout (the usual one for SDXL): `lora_unet_input_blocks_1_1_proj_in`
- kohya text encoders: `lora_te_` (SD1/SD2, and te1 on SDXL), `lora_te1_`, `lora_te2_`
- PEFT/diffusers: `unet.`, `text_encoder.`, `text_encoder_2.`, optional `base_model.model.`
- old diffusers attention processors: `...attn1.processor.to_q_lora`, `...processor.to_out_lora`
- LDM dotted paths: `model.diffusion_model.input_blocks.1.1.proj_in`

Kohya names replace dots with underscores, which cannot be undone by parsing (`proj_in`,
`to_out_0`), so the lookup is built the other way: every real module path is flattened.
CLIP's `text_model.` segment is dropped on both sides, because transformers 5 `CLIPTextModel`
lost it while `CLIPTextModelWithProjection` and most files keep it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from torch import nn
from transformers.models.t5.modeling_t5 import T5LayerNorm

from webui.layouts.flux import lora_targets
from webui.layouts.unet import unet_module_names

logger = logging.getLogger(__name__)

# Modules a network can change: weights of Linear/Conv (LoRA variants, full diffs), norms (norm
# diffs; T5's RMS norm is its own class, and ComfyUI's LoraSave writes its `.diff`) and embeddings
# (full diffs of token embeddings).
TARGET_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.LayerNorm,
    nn.GroupNorm,
    T5LayerNorm,
    nn.Embedding,
)


class Component(StrEnum):
    """A pipeline component a LoRA can change; the value is the pipeline attribute name."""

    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"
    UNET = "unet"  # the denoiser: a UNet, or FLUX.1's transformer


@dataclass(frozen=True)
class Piece:
    """Where one file module lands: a target module and, for a fused BFL weight, which of the
    file's delta rows make the target's rows (ranges concatenated in order); None: all of them."""

    ref: ModuleRef
    rows: tuple[tuple[int, int], ...] | None = None
    fused_rows: int = 0  # the fused weight's row count (0: not fused)


@dataclass(frozen=True)
class ModuleRef:
    """A model module a LoRA prefix names: its component and its path inside that component."""

    component: Component
    path: str
    module: nn.Module = field(compare=False, repr=False)


@dataclass(frozen=True)
class KeyMatch:
    """Prefixes of one file sorted into the ones that name a module and the ones that do not."""

    resolved: dict[str, ModuleRef]
    unmatched: tuple[str, ...]


_KOHYA_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("lora_unet_", Component.UNET),
    ("lora_te1_", Component.TEXT_ENCODER),
    ("lora_te2_", Component.TEXT_ENCODER_2),
    # Kohya writes lora_te_ for the single encoder of SD1/SD2; on SDXL it only means te1.
    ("lora_te_", Component.TEXT_ENCODER),
)
# FLUX.1 adds the transformer (OneTrainer) and T5 (sd-scripts te3, OneTrainer te2) prefixes.
_FLUX_KOHYA_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("lora_unet_", Component.UNET),
    ("lora_transformer_", Component.UNET),
    ("lora_te1_", Component.TEXT_ENCODER),
    ("lora_te2_", Component.TEXT_ENCODER_2),
    ("lora_te3_", Component.TEXT_ENCODER_2),
    ("lora_te_", Component.TEXT_ENCODER),
)
_DOTTED_PREFIXES: tuple[tuple[str, Component], ...] = (
    ("text_encoders.clip_l.transformer.", Component.TEXT_ENCODER),
    ("text_encoders.clip_l.", Component.TEXT_ENCODER),
    ("text_encoders.t5xxl.transformer.", Component.TEXT_ENCODER_2),
    ("text_encoders.t5xxl.", Component.TEXT_ENCODER_2),
    ("transformer.", Component.UNET),
    ("text_encoder_2.", Component.TEXT_ENCODER_2),
    ("text_encoder.", Component.TEXT_ENCODER),
    ("unet.", Component.UNET),
    ("model.diffusion_model.", Component.UNET),
    ("diffusion_model.", Component.UNET),
)
_PEFT_WRAPPER = "base_model.model."
_CLIP_WRAPPER = "text_model."
# Old diffusers LoRA attention processors named the projection inside the processor.
_PROCESSOR_NAME = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
# Old diffusers LoRACompatibleLinear/Conv and text-encoder monkey patches kept the LoRA in a child.
_LORA_CHILD = re.compile(r"\.(lora_linear_layer|lora_layer|lora)$")


def _strip(text: str, prefix: str) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text


def _text_path(path: str) -> str:
    """A text-encoder module path without CLIP's optional `text_model.` wrapper."""
    return _strip(path, _CLIP_WRAPPER)


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _is_flux(model: nn.Module) -> bool:
    # FluxTransformer2DModel's config is the only one with single-stream blocks
    return "num_single_layers" in dict(getattr(model, "config", None) or {})


def _is_tuner(module: nn.Module) -> bool:
    # A PEFT-wrapped layer: the LoRA names it by its own path, the weights live in base_layer.
    return callable(getattr(module, "get_base_layer", None)) and hasattr(module, "base_layer")


class _ComponentIndex:
    """Every target module of one component, by normalised dotted path and by flattened path."""

    def __init__(self, component: Component, model: nn.Module) -> None:
        self.component = component
        self.dotted: dict[str, ModuleRef] = {}
        self.flat: dict[str, ModuleRef] = {}
        self._ambiguous: set[str] = set()
        tuner_paths: list[str] = []
        for path, module in model.named_modules():
            if any(path.startswith(t + ".") for t in tuner_paths):
                continue
            if _is_tuner(module):
                tuner_paths.append(path)
                module = module.get_base_layer()
            if not isinstance(module, TARGET_MODULE_TYPES):
                continue
            ref = ModuleRef(component, path, module)
            key = _text_path(path) if component is not Component.UNET else path
            self.dotted[key] = ref
            self._add_flat(_flat(key), ref)

    def _add_flat(self, flat_name: str, ref: ModuleRef) -> None:
        if flat_name in self._ambiguous:
            return
        existing = self.flat.get(flat_name)
        if existing is not None and existing.module is not ref.module:
            # Two real paths flatten alike: refuse to guess rather than patch the wrong one.
            logger.warning(
                "%s: %r and %r both flatten to %r; not resolvable in kohya form",
                self.component.value,
                existing.path,
                ref.path,
                flat_name,
            )
            del self.flat[flat_name]
            self._ambiguous.add(flat_name)
            return
        self.flat[flat_name] = ref

    def add_alias(self, alias: str, path: str) -> None:
        """Also accept `alias` (dotted, e.g. an LDM path) for the module at `path`."""
        ref = self.dotted.get(path)
        if ref is None:
            return
        self.dotted.setdefault(alias, ref)
        self._add_flat(_flat(alias), ref)


class KeyMap:
    """Resolves LoRA module prefixes of every known naming scheme to modules of one pipeline.

    Build it once per loaded model; `resolve` is cached.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
    ) -> None:
        self._indexes: dict[Component, _ComponentIndex] = {}
        for component, model in (
            (Component.UNET, unet),
            (Component.TEXT_ENCODER, text_encoder),
            (Component.TEXT_ENCODER_2, text_encoder_2),
        ):
            if model is not None:
                self._indexes[component] = _ComponentIndex(component, model)
        self._flux = _is_flux(unet)
        # BFL names of fused or half-swapped FLUX.1 weights: dotted and flattened -> pieces
        self._fused: dict[str, tuple[Piece, ...]] = {}
        if self._flux:
            self._add_bfl_names(unet)
        else:
            self._add_ldm_names(unet)
        self._cache: dict[str, ModuleRef | None] = {}
        self._piece_cache: dict[str, tuple[Piece, ...]] = {}

    @classmethod
    def from_pipeline(cls, pipeline: Any) -> KeyMap:
        """A key map for a diffusers pipeline (`unet` or FLUX.1's `transformer`, `text_encoder`,
        optional `text_encoder_2`)."""
        unet = getattr(pipeline, "unet", None)
        return cls(
            unet=unet if unet is not None else getattr(pipeline, "transformer", None),
            text_encoder=getattr(pipeline, "text_encoder", None),
            text_encoder_2=getattr(pipeline, "text_encoder_2", None),
        )

    def _add_ldm_names(self, unet: nn.Module) -> None:
        config = getattr(unet, "config", None)
        if config is None:
            return
        try:
            ldm_names = unet_module_names(config)
        except (KeyError, ValueError, TypeError) as error:
            logger.warning("no LDM names for this UNet (%s); only diffusers names resolve", error)
            return
        index = self._indexes[Component.UNET]
        for diffusers_path, ldm_path in ldm_names.items():
            index.add_alias(ldm_path, diffusers_path)

    def _add_bfl_names(self, transformer: nn.Module) -> None:
        """BFL names (kohya, ai-toolkit, XLabs, ComfyUI files) of the FLUX.1 transformer's modules,
        from the one table in `webui.layouts.flux`; fused ones map to row pieces."""
        index = self._indexes[Component.UNET]
        for target in lora_targets(transformer):
            refs = [index.dotted.get(path) for path, _ in target.parts]
            if any(ref is None for ref in refs):
                continue
            if len(target.parts) == 1 and target.parts[0][1] is None:
                index.add_alias(target.bfl, target.parts[0][0])
                continue
            pieces = tuple(
                Piece(ref, rows, target.rows)
                for ref, (_, rows) in zip(refs, target.parts, strict=True)
                if ref is not None
            )
            self._fused[target.bfl] = pieces
            self._fused[_flat(target.bfl)] = pieces

    def pieces(self, prefix: str) -> tuple[Piece, ...]:
        """Every target a LoRA key prefix lands on: one module, or the row pieces of a fused
        BFL weight (FLUX.1 `qkv`, `linear1`, the final modulation); () when none."""
        if prefix not in self._piece_cache:
            ref = self.resolve(prefix)
            self._piece_cache[prefix] = (
                (Piece(ref),) if ref is not None else self._fused_pieces(prefix)
            )
        return self._piece_cache[prefix]

    def _fused_pieces(self, prefix: str) -> tuple[Piece, ...]:
        if not self._fused:
            return ()
        name = _strip(prefix, _PEFT_WRAPPER)
        for kohya_prefix in ("lora_unet_", "lora_transformer_"):
            if name.startswith(kohya_prefix):
                return self._fused.get(_flat(name[len(kohya_prefix) :]), ())
        for dotted_prefix in ("model.diffusion_model.", "diffusion_model.", "transformer."):
            name = _strip(name, dotted_prefix)
        return self._fused.get(name, ())

    @property
    def components(self) -> tuple[Component, ...]:
        """The components this map covers."""
        return tuple(self._indexes)

    def modules(self, component: Component) -> dict[str, ModuleRef]:
        """Every target module of a component, by its real path."""
        index = self._indexes.get(component)
        if index is None:
            return {}
        return {ref.path: ref for ref in index.dotted.values()}

    def resolve(self, prefix: str) -> ModuleRef | None:
        """The module a LoRA key prefix names, or None when it names none in this model."""
        if prefix not in self._cache:
            self._cache[prefix] = self._resolve(prefix)
        return self._cache[prefix]

    def match(self, prefixes: Iterable[str]) -> KeyMatch:
        """Resolve many prefixes at once; the unmatched ones are returned (sorted) and logged."""
        resolved: dict[str, ModuleRef] = {}
        unmatched: list[str] = []
        for prefix in dict.fromkeys(prefixes):
            pieces = self.pieces(prefix)
            if not pieces:
                unmatched.append(prefix)
            else:
                resolved[prefix] = pieces[0].ref
        if unmatched:
            logger.debug("%d LoRA prefixes match no module: %s", len(unmatched), unmatched[:10])
        return KeyMatch(resolved=resolved, unmatched=tuple(sorted(unmatched)))

    def _lookup(self, component: Component, name: str, flat: bool) -> ModuleRef | None:
        index = self._indexes.get(component)
        if index is None:
            return None
        if component is not Component.UNET:
            name = _strip(name, _flat(_CLIP_WRAPPER) if flat else _CLIP_WRAPPER)
        return (index.flat if flat else index.dotted).get(name)

    def _resolve(self, prefix: str) -> ModuleRef | None:
        for kohya_prefix, component in _FLUX_KOHYA_PREFIXES if self._flux else _KOHYA_PREFIXES:
            if prefix.startswith(kohya_prefix):
                # Some converters leave dots in kohya names; flattening makes them equal.
                return self._lookup(component, _flat(prefix[len(kohya_prefix) :]), flat=True)
        return self._resolve_dotted(prefix)

    def _resolve_dotted(self, prefix: str) -> ModuleRef | None:
        name = _strip(prefix, _PEFT_WRAPPER)
        name = _PROCESSOR_NAME.sub(
            lambda m: ".to_out.0" if m.group(1) == "to_out" else f".{m.group(1)}", name
        )
        name = _LORA_CHILD.sub("", name)
        for dotted_prefix, component in _DOTTED_PREFIXES:
            if name.startswith(dotted_prefix):
                return self._lookup(
                    component, _strip(name[len(dotted_prefix) :], _PEFT_WRAPPER), False
                )
        # No component named (a bare PEFT state dict): UNet paths and CLIP paths never overlap.
        return self._lookup(Component.UNET, name, flat=False) or self._lookup(
            Component.TEXT_ENCODER, name, flat=False
        )
