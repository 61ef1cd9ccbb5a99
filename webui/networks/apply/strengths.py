"""How strongly a network applies to each part of the model, optionally per block (UNet or
transformer) and per denoising step.

Rules (documented for users in README.md):
- text encoders: `te1` / `te2` (SDXL's two encoders, FLUX.1's CLIP-L and T5; each defaults to
  `te`), times the block vector's BASE entry (SD) or its CLIP / T5 entry (FLUX.1);
- UNet: `in` / `mid` / `out` for modules of the input, middle and output blocks (see
  `blocks.py` for where conv_in and the final conv belong), each defaulting to `unet`; modules
  outside the blocks (time and label embeddings) take `unet`; a block vector (`lbw`) multiplies
  by the entry of the module's block label (IN04, M00, OUT11); numbered blocks a vector does
  not list get 0, as in the LoRA Block Weight extension (a 17-value vector on a LoCon zeroes
  IN00, IN03, ...); modules with no label (final norm/conv, embeddings) keep factor 1;
- transformer (FLUX.1): `unet` times the vector's entry of the module's block (D05, S37, IN,
  OUT; see `blocks.py`); `in`/`mid`/`out` do not reach it;
- any value may be a schedule: anything with `value_at(step, total_steps) -> float`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

from webui.networks.apply.blocks import BlockKind, UnetBlock
from webui.networks.apply.keys import Component


@runtime_checkable
class StepSchedule(Protocol):
    """A strength that changes over the denoising steps (see `webui.prompt.Schedule`)."""

    def value_at(self, step: int, total_steps: int) -> float: ...


Strength = float | StepSchedule

_MIDDLE_LABELS = ("M00", "MID")
# a vector's entry for each text encoder: FLUX.1's own, else SD's BASE (a vector has one or other)
_TEXT_ENCODER_LABELS = {
    Component.TEXT_ENCODER: ("CLIP", "BASE"),
    Component.TEXT_ENCODER_2: ("T5", "BASE"),
}


def _value(strength: Strength | None, step: int, total_steps: int) -> float | None:
    if strength is None or isinstance(strength, int | float):
        return strength
    return strength.value_at(step, total_steps)


@dataclass(frozen=True)
class Strengths:
    """Multipliers per component, per UNet block and (through schedules) per step."""

    te: Strength = 1.0
    unet: Strength = 1.0
    te1: Strength | None = None
    te2: Strength | None = None
    in_blocks: Strength | None = None
    mid: Strength | None = None
    out: Strength | None = None
    blocks: Mapping[str, float] | None = None  # LoRA Block Weight label -> factor

    @classmethod
    def uniform(cls, weight: float) -> Strengths:
        """The same multiplier everywhere, as `<lora:name:W>` means."""
        return cls(te=weight, unet=weight)

    @classmethod
    def of(cls, strength: float | Strengths) -> Strengths:
        """A set entry's strength as Strengths: a plain number means `uniform`."""
        return strength if isinstance(strength, Strengths) else cls.uniform(float(strength))

    @property
    def is_scheduled(self) -> bool:
        """True when any value changes with the step."""
        return any(
            isinstance(getattr(self, f.name), StepSchedule)
            for f in fields(self)
            if f.name != "blocks"
        )

    def at_step(self, step: int, total_steps: int) -> Strengths:
        """The constant strengths of one step (1-based); unscheduled strengths come back as is."""
        if not self.is_scheduled:
            return self
        values = {
            f.name: _value(getattr(self, f.name), step, total_steps)
            for f in fields(self)
            if f.name != "blocks"
        }
        return replace(self, **values)

    @property
    def unet_block_keys(self) -> tuple[str, ...]:
        """The tag keys among in/mid/out set apart from `unet`: those that only a UNet's blocks
        feel (on a transformer they change nothing)."""
        given = {"in": self.in_blocks, "mid": self.mid, "out": self.out}
        return tuple(
            key for key, value in given.items() if value is not None and value != self.unet
        )

    @property
    def scales_blocks(self) -> bool:
        """Whether some blocks get another multiplier than `unet`: in/mid/out set apart from
        it, or a block vector with an entry other than 1."""
        return bool(self.unet_block_keys) or any(v != 1.0 for v in (self.blocks or {}).values())

    def _constant(self, strength: Strength | None) -> float | None:
        # numbers first: an isinstance check against a runtime Protocol is slow, and this runs
        # for every module of every network at every apply
        if strength is None or isinstance(strength, int | float):
            return strength
        if isinstance(strength, StepSchedule):
            raise ValueError("scheduled strengths need a step: call at_step() first")
        return strength

    def text_encoder(self, component: Component) -> float:
        """The multiplier for text encoder 1 or 2."""
        base = self._constant(self.te)
        own = self._constant(self.te2 if component is Component.TEXT_ENCODER_2 else self.te1)
        labels = _TEXT_ENCODER_LABELS.get(component, ("BASE",))
        blocks = self.blocks or {}
        factor = next((blocks[label] for label in labels if label in blocks), 1.0)
        return (base if own is None else own) * factor

    def unet_block(self, block: UnetBlock) -> float:
        """The multiplier for a denoiser (UNet or transformer) module in `block`."""
        unet = self._constant(self.unet)
        by_kind = {
            BlockKind.INPUT: self.in_blocks,
            BlockKind.MIDDLE: self.mid,
            BlockKind.OUTPUT: self.out,
        }
        own = self._constant(by_kind.get(block.kind))
        strength = unet if own is None else own
        if self.blocks and block.label is not None:
            labels = _MIDDLE_LABELS if block.kind is BlockKind.MIDDLE else (block.label,)
            strength *= next((self.blocks[label] for label in labels if label in self.blocks), 0.0)
        return strength

    def multiplier(self, component: Component, block: UnetBlock | None = None) -> float:
        """The multiplier for a module of `component` (`block` for denoiser modules)."""
        if component is Component.UNET:
            return self.unet_block(block) if block is not None else self._constant(self.unet)
        return self.text_encoder(component)
