"""The diffusers fallback: LoRAs applied through diffusers/PEFT adapters, with the same interface
as `NetworkPatcher` (apply a set, set_step, restore, a `PatchReport`).

How it works, and the diffusers 0.42.1 / PEFT 0.21.2 traps it designs around (see the tests):
- each file is loaded with `load_lora_weights(path)` under its own adapter name
  (`webui_lora_<12 hex>`): never one letter, no dots, never inside a module path, because
  diffusers matches adapter names as substrings (`adapter_name in active_adapter` when a load
  fails, `adapter_name in key` for missing keys);
- files are passed as paths, so every load reads fresh tensors: with `low_cpu_mem_usage=True`
  the adapter parameters are the very tensors of a state dict passed in (`assign=True`);
- strengths go in through `set_adapters` per adapter and per component (text_encoder,
  text_encoder_2, unet), never through a global `cross_attention_kwargs["scale"]`: a global
  scale of 0 makes `unscale_lora_layers` reset every active adapter to weight 1.0;
- `in`/`mid`/`out` and LoRA Block Weight vectors become diffusers' `{"down": {"block_i": [..]},
  "mid": m, "up": {...}}` when all of a file's UNet layers sit in attention blocks (the only
  layers diffusers' expansion covers); otherwise every UNet layer gets its block's multiplier
  through PEFT's `set_scale` (diffusers would give resnets, samplers and embeddings 1.0, or fail);
- fusing (optional) always uses `fuse_lora(lora_scale=1.0)`: a scale there multiplies the
  adapter scales in place and compounds on every later fuse; unfusing copies the saved base
  weights back, because PEFT's unmerge subtracts (not bit-exact);
- hotswap is never used: diffusers refuses it for files with text-encoder keys;
- removal really removes: `delete_adapters` for a file that leaves the set, and
  `unload_lora_weights` once none is left (or when a wrapper would be left serving no adapter;
  the remaining files are then loaded again), so no PEFT wrapper slows later steps.

FLUX.1 goes through FluxPipeline's own loader (its kohya, XLabs, OneTrainer and PEFT converters):
the transformer stands for `Component.UNET`, CLIP-L takes `te1`; T5 is no LoRA component there.
diffusers scales a FLUX transformer only as a whole, so per-block weights are ignored with a
warning (native, which auto picks for every file it maps, honours them).

Files diffusers cannot load (LoHa, LoKr, IA3, GLoRA, OFT/BOFT, full and norm diffs, Tucker
`lora_mid`, DoRA, original-layout names on SD1/SD2, FLUX.1 files its converters cannot take: see
`diffusers_flux`) are refused before diffusers sees them, with a message naming the file and the
reason; a load that fails, or places fewer layers than the file has (a fused BFL module counts
one per piece), is undone and refused the same way."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from webui.arch import Arch
from webui.networks.apply.blocks import OUTSIDE, UnetBlock, unet_blocks
from webui.networks.apply.diffusers_adapters import (
    ADAPTER_PREFIX,
    ATTENTION_BLOCKS,
    DiffusersLoadError,
    FallbackReport,
    adapter_name,
    component_model,
    diffusers_name,
    has_empty_wrappers,
    has_peft_layers,
    lora_components,
    refusal_reason,
    tuner_layers,
)
from webui.networks.apply.keys import Component, KeyMap
from webui.networks.apply.patcher import PatchReport
from webui.networks.apply.strengths import Strengths
from webui.networks.apply.writing import UpcastOnForward
from webui.networks.format.base_detection import fits
from webui.networks.format.network import Network

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    """One file loaded as a diffusers adapter."""

    network: Network
    adapter: str
    layers: dict[Component, tuple[str, ...]]  # component -> paths of the layers it wraps

    @property
    def attention_only(self) -> bool:
        """Whether all its UNet layers lie inside attention blocks (diffusers' block scales)."""
        return all(
            path.startswith(ATTENTION_BLOCKS) and ".attentions." in path
            for path in self.layers.get(Component.UNET, ())
        )


@dataclass
class _FusedState:
    """Base weights saved before a fuse, so unfusing gives them back bit for bit."""

    weights: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # id -> (live, copy)


class DiffusersBackend:
    """Applies sets of (Network, strengths) to one pipeline through diffusers/PEFT adapters.
    Not thread-safe: the engine serializes calls."""

    def __init__(self, pipe: Any, arch: Arch | None = None, *, fuse: bool = False) -> None:
        self.pipe = pipe
        self.arch = arch
        self.fuse = fuse
        self._loaded: dict[int, _Loaded] = {}  # id(network) -> adapter
        self._set: list[tuple[Network, Strengths]] = []
        self._scales: dict[tuple[str, Component], object] = {}
        self._fused: _FusedState | None = None
        self._keymap = KeyMap.from_pipeline(pipe)  # where each file prefix should land
        denoiser = getattr(pipe, "transformer", None)
        self._fp8_stored = denoiser is not None and any(
            isinstance(m, UpcastOnForward) for m in denoiser.modules()
        )
        unet = getattr(pipe, "unet", None)
        self._blocks: dict[str, UnetBlock] = unet_blocks(unet.config) if unet is not None else {}

    @property
    def components(self) -> tuple[Component, ...]:
        """The components diffusers' loader of this pipeline puts LoRA layers in."""
        return lora_components(self.pipe)

    def _model(self, component: Component) -> Any:
        return component_model(self.pipe, component)

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded adapter name -> network name."""
        return {loaded.adapter: loaded.network.name for loaded in self._loaded.values()}

    @property
    def is_fused(self) -> bool:
        return self._fused is not None

    @property
    def is_scheduled(self) -> bool:
        """True when the current set has strengths that change between steps."""
        return any(strengths.is_scheduled for _, strengths in self._set)

    # -- the NetworkPatcher interface -----------------------------------------------------------

    def apply(
        self,
        networks: Sequence[tuple[Network, float | Strengths]],
        *,
        step: int = 1,
        total_steps: int = 1,
    ) -> PatchReport:
        """Make the pipeline apply exactly the given set (replacing any previous one), scheduled
        strengths taken at `step` of `total_steps`. Files diffusers cannot load are reported
        and left out; the others still apply."""
        started = time.perf_counter()
        self.unfuse()
        wanted = [(network, Strengths.of(strength)) for network, strength in networks]
        self._remove(set(self._loaded) - {id(network) for network, _ in wanted})
        reports: list[FallbackReport] = []
        kept: list[tuple[Network, Strengths]] = []
        for network, strengths in wanted:
            report = self._prepare(network, strengths)
            reports.append(report)
            if report.applied:
                kept.append((network, strengths))
        self._remove(set(self._loaded) - {id(network) for network, _ in kept})
        self._set = kept
        changed = self._set_scales(step, total_steps)
        if self.fuse and kept and not self.is_scheduled:
            self._fuse()
        return PatchReport(tuple(reports), len(changed), time.perf_counter() - started, changed)

    def set_step(self, step: int, total_steps: int) -> PatchReport | None:
        """Move scheduled strengths to `step`; None when nothing in the set is scheduled."""
        if not self.is_scheduled:
            return None
        started = time.perf_counter()
        changed = self._set_scales(step, total_steps)
        return PatchReport((), len(changed), time.perf_counter() - started, changed)

    def restore(self) -> None:
        """Unload every adapter: no PEFT layer is left and the weights are the originals."""
        self.unfuse()
        self._remove(set(self._loaded))
        self._set = []
        self._scales = {}

    # -- loading --------------------------------------------------------------------------------

    def _prepare(self, network: Network, strengths: Strengths) -> FallbackReport:
        """Load `network` unless it already is; the report says whether it applies."""
        compatible = fits(network.base, self.arch)  # never a family this app does not run
        refusal = None
        if not compatible:
            loaded = None
        elif id(network) in self._loaded:
            loaded = self._loaded[id(network)]
        else:
            try:
                loaded = self._load(network)
            except DiffusersLoadError as exc:
                loaded, refusal = None, str(exc)
        layers = () if loaded is None else tuple(p for ps in loaded.layers.values() for p in ps)
        notes = ()
        if layers and not self._blocks and strengths.scales_blocks:
            notes = (
                "diffusers scales this model's transformer only as a whole, "
                "so the diffusers backend ignored its per-block weights and applied the plain "
                "strengths",
            )
        return FallbackReport(
            name=network.name,
            variants=tuple(v.value for v in network.variants),
            matched=tuple(network.modules) if loaded is not None else (),
            unmatched=(),
            unsupported=() if loaded is not None else tuple(network.unsupported),
            shape_mismatch=(),
            base=network.base.arch,
            base_source=network.base.source,
            compatible=compatible,
            applied=loaded is not None and bool(layers),
            refusal=refusal,
            notes=notes,
        )

    def _load(self, network: Network) -> _Loaded:
        reason = refusal_reason(network, self.arch)
        if self._fp8_stored:  # PEFT would cast its layers to the base weight's fp8
            reason = (
                "the model keeps its weights in fp8 (--fp8-storage); use the native backend "
                "or load the model with --fp8-storage off"
            )
        if reason is not None:
            raise DiffusersLoadError(f"{network.path.name}: diffusers cannot load it: {reason}")
        name = adapter_name(network)
        self._check_name(name)
        try:
            # a path, never a shared state dict: diffusers reads fresh tensors (low_cpu_mem_usage)
            self.pipe.load_lora_weights(
                str(network.path), adapter_name=name, low_cpu_mem_usage=True, hotswap=False
            )
        # diffusers' converters also fail by assert and by indexing (full-size FLUX.1 splits)
        except (ValueError, KeyError, RuntimeError, AssertionError, IndexError) as exc:
            self._delete([name])  # a load that failed half-way may have wrapped the UNet
            raise DiffusersLoadError(
                f"{network.path.name}: diffusers could not load it ({_first_line(exc)})"
            ) from exc
        layers = self._layers_of(name)
        wrapped = {(component, path) for component, paths in layers.items() for path in paths}
        # a fused BFL module (FLUX.1 qkv, linear1) is several layers: one per piece
        pieces = {prefix: self._keymap.pieces(prefix) for prefix in network.modules}
        missed = [
            prefix
            for prefix, targets in pieces.items()
            # names native cannot resolve are checked by the count alone
            if any((p.ref.component, p.ref.path) not in wrapped for p in targets)
        ]
        # modules native does not understand are layers too: diffusers may know them
        expected = sum(len(t) or 1 for t in pieces.values()) + len(network.unsupported)
        if missed or len(wrapped) != expected:
            self._delete([name])
            example = f", e.g. {missed[0]}" if missed else ""
            raise DiffusersLoadError(
                f"{network.path.name}: diffusers placed {len(wrapped)} of its "
                f"{expected} layers{example}; not applied"
            )
        loaded = _Loaded(network, name, layers)
        self._loaded[id(network)] = loaded
        log.info("%s: loaded through diffusers as adapter %s", network.name, name)
        return loaded

    def _check_name(self, name: str) -> None:
        for component in self.components:
            for path, _ in self._model(component).named_modules():
                if name in path:
                    raise DiffusersLoadError(f"adapter name {name} occurs inside module {path}")

    def _layers_of(self, adapter: str) -> dict[Component, tuple[str, ...]]:
        layers: dict[Component, tuple[str, ...]] = {}
        for component in self.components:
            paths = tuple(
                path
                for path, layer in tuner_layers(self._model(component))
                if adapter in getattr(layer, "lora_A", {})
            )
            if paths:
                layers[component] = paths
        return layers

    def _remove(self, keys: set[int]) -> None:
        """Delete the adapters of `keys`. PEFT keeps a wrapper on every layer an adapter touched
        even after `delete_adapters`; when a wrapper is left empty (or no adapter is left), all
        are unloaded and the remaining files loaded again, so no idle wrapper slows a step."""
        if not keys:
            return
        self._delete([self._loaded.pop(key).adapter for key in keys])
        if self._loaded and has_empty_wrappers(self.pipe):
            kept = list(self._loaded.values())
            self._loaded.clear()
            self.pipe.unload_lora_weights()
            for loaded in kept:
                self._load(loaded.network)
        self._scales = {}

    def _delete(self, names: list[str]) -> None:
        """Delete adapters; with none left, unload so that no PEFT wrapper stays in the model."""
        present = {n for ns in self.pipe.get_list_adapters().values() for n in ns}
        doomed = [n for n in names if n in present]
        if doomed:
            self.pipe.delete_adapters(doomed)
        if not self._loaded and has_peft_layers(self.pipe):
            self.pipe.unload_lora_weights()

    # -- strengths ------------------------------------------------------------------------------

    def _set_scales(self, step: int, total_steps: int) -> frozenset[Component]:
        """Set every adapter's scales for `step`; returns the components whose scales changed.
        A file listed twice (two scheduled tags of one name) gets the sum of its multipliers,
        layer by layer, as the native patcher sums the deltas."""
        grouped: dict[int, list[Strengths]] = {}
        for network, strengths in self._set:
            grouped.setdefault(id(network), []).append(strengths.at_step(step, total_steps))
        plan: dict[tuple[str, Component], object] = {}
        names: list[str] = []
        weights: list[dict[str, Any]] = []
        per_layer: list[tuple[_Loaded, list[Strengths], tuple[Component, ...]]] = []
        for key, at_step in grouped.items():
            loaded = self._loaded[key]
            weight = self._component_weights(loaded, at_step[0]) if len(at_step) == 1 else {}
            by_layer = tuple(c for c in loaded.layers if weight.get(c.value) is None)
            for component in loaded.layers:
                plan[loaded.adapter, component] = weight.get(component.value) or tuple(
                    _step_key(s) for s in at_step
                )
            for component in by_layer:
                weight.pop(component.value, None)  # diffusers sets 1.0; each layer gets its own
            if by_layer:
                per_layer.append((loaded, at_step, by_layer))
            names.append(loaded.adapter)
            weights.append(weight)
        changed = frozenset(
            key[1]
            for key in plan.keys() | self._scales.keys()
            if plan.get(key) != self._scales.get(key)
        )
        if names and plan != self._scales:
            self.pipe.set_adapters(names, [self._diffusers_keys(w) for w in weights])
            for loaded, at_step, components in per_layer:
                self._set_scales_per_layer(loaded, at_step, components)
        self._scales = plan
        return changed

    def _diffusers_keys(self, weight: dict[str, Any]) -> dict[str, Any]:
        """Our component names as this pipeline's (FLUX.1: `unet` is `transformer`)."""
        return {diffusers_name(self.pipe, Component(k)): v for k, v in weight.items()}

    def _component_weights(self, loaded: _Loaded, strengths: Strengths) -> dict[str, Any]:
        """diffusers' `set_adapters` weights for one adapter; "unet" is left out (None) when
        the per-block multipliers need PEFT's per-layer `set_scale`."""
        weights: dict[str, Any] = {}
        for component in loaded.layers:
            if component is Component.UNET:
                weights["unet"] = self._unet_weight(loaded, strengths)
            else:
                weights[component.value] = strengths.multiplier(component)
        return weights

    def _unet_weight(self, loaded: _Loaded, strengths: Strengths) -> float | dict | None:
        multipliers = {
            self._blocks.get(path, OUTSIDE): None for path in loaded.layers[Component.UNET]
        }
        values = {block: strengths.multiplier(Component.UNET, block) for block in multipliers}
        if len(set(values.values())) == 1:
            return float(next(iter(values.values())))
        if loaded.attention_only:
            return self._diffusers_block_scales(strengths)
        return None

    def _diffusers_block_scales(self, strengths: Strengths) -> dict[str, Any]:
        """Our block multipliers in diffusers' form: per transformer of each down/up block."""
        scales: dict[str, Any] = {"down": {}, "up": {}}
        mid = None
        for path, block in self._blocks.items():
            parts = path.split(".")
            if parts[:2] == ["mid_block", "attentions"]:
                mid = strengths.multiplier(Component.UNET, block)
                continue
            if len(parts) < 4 or parts[2] != "attentions" or not parts[3].isdigit():
                continue
            value = strengths.multiplier(Component.UNET, block)
            side = "down" if parts[0] == "down_blocks" else "up"
            row = scales[side].setdefault(f"block_{parts[1]}", {})
            row[int(parts[3])] = value
        out: dict[str, Any] = {
            side: {name: [row[i] for i in sorted(row)] for name, row in blocks.items()}
            for side, blocks in scales.items()
        }
        if mid is not None:
            out["mid"] = mid
        return out

    def _set_scales_per_layer(
        self, loaded: _Loaded, strengths: list[Strengths], components: tuple[Component, ...]
    ) -> None:
        """PEFT's `set_scale` on every layer: the summed multiplier of its component and block."""
        for component in components:
            model = self._model(component)
            for path in loaded.layers[component]:
                block = self._blocks.get(path, OUTSIDE) if component is Component.UNET else None
                multiplier = sum(s.multiplier(component, block) for s in strengths)
                model.get_submodule(path).set_scale(loaded.adapter, multiplier)

    # -- fusing ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _fuse(self) -> None:
        state = _FusedState()
        components = [diffusers_name(self.pipe, c) for c in self.components]
        for component in self.components:
            for _, layer in tuner_layers(self._model(component)):
                weight = layer.get_base_layer().weight
                state.weights[id(weight)] = (weight, weight.detach().clone())
        self.pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=self._active())
        self._fused = state

    @torch.no_grad()
    def unfuse(self) -> None:
        """Take fused deltas out of the base weights, exactly (the saved copies go back)."""
        if self._fused is None:
            return
        self.pipe.unfuse_lora(components=[diffusers_name(self.pipe, c) for c in self.components])
        for live, saved in self._fused.weights.values():
            live.copy_(saved)
        self._fused = None

    def _active(self) -> list[str]:
        return [self._loaded[id(network)].adapter for network, _ in self._set]


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when empty), at most 160 characters;
    a KeyError says which key diffusers' converter looked for."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else f"{type(exc).__name__} in its converter"
    if isinstance(exc, KeyError):
        line = f"its converter expects the key {line}, which the file lacks"
    return line[:160]


def _step_key(strengths: Strengths) -> tuple[object, ...]:
    """A comparable snapshot of the strengths of one step."""
    return (
        strengths.te,
        strengths.te1,
        strengths.te2,
        strengths.unet,
        strengths.in_blocks,
        strengths.mid,
        strengths.out,
        tuple(sorted((strengths.blocks or {}).items())),
    )


__all__ = [
    "ADAPTER_PREFIX",
    "DiffusersBackend",
    "DiffusersLoadError",
    "FallbackReport",
    "adapter_name",
    "has_peft_layers",
    "refusal_reason",
    "tuner_layers",
]
