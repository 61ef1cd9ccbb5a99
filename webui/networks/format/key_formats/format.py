"""One LoRA key format: "is this module name mine?" and its canonical module name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KeyFormat:
    """A naming scheme of LoRA module prefixes (the key without its tensor suffix).

    `canonical` turns a prefix this format owns into the name every other part of the app
    reads: kohya names flattened (`lora_unet_…`, `lora_te1_…`), PEFT/diffusers names dotted
    with their component (`unet.…`, `text_encoder.…`, `text_encoder_2.…`)."""

    name: str  # as users know it, used in messages: "kohya"
    owns: Callable[[str], bool]
    canonical: Callable[[str], str]
