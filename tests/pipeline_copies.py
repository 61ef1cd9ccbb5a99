"""Copies of tiny test pipelines: every model and the scheduler deep-copied, the tokenizers shared.

Deep-copying a CLIP tokenizer rebuilds its Rust tokenizer from its vocabulary (about 2/3 of the
time of copying a whole tiny pipeline); nothing a LoRA test does changes a tokenizer, so the
copies share the original's. A test that adds tokens (textual inversion) must deep-copy itself.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

Pipeline = TypeVar("Pipeline")


def pipeline_copy(pipe: Pipeline) -> Pipeline:
    """`copy.deepcopy(pipe)` with the tokenizers shared between the copy and `pipe`."""
    shared = {
        id(value): value
        for value in vars(pipe).values()
        if isinstance(value, PreTrainedTokenizerBase)
    }
    return copy.deepcopy(pipe, memo=shared)
