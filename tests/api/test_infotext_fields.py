"""Parameters text is read into the fields A1111's infotext parser gives, checked against
infotexts written by hand in A1111's format and the dicts A1111 returns for them."""

from __future__ import annotations

import pytest

from webui.api.infotext_fields import a1111_fields

EXAMPLES = [
    pytest.param(
        "masterpiece, 1girl, <lora:ink:0.8>\n"
        "Negative prompt: lowres, bad hands\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "ink: 1a2b3c4d5e6f", '
        "Version: v1.6.0",
        {
            "Prompt": "masterpiece, 1girl, <lora:ink:0.8>",
            "Negative prompt": "lowres, bad hands",
            "Steps": "20",
            "Sampler": "Euler a",
            "CFG scale": "7",
            "Seed": "1234567890",
            "Size-1": "512",
            "Size-2": "768",
            "Model hash": "6ce0161689",
            "Model": "v1-5-pruned-emaonly",
            "Lora hashes": "ink: 1a2b3c4d5e6f",
            "Version": "v1.6.0",
        },
        id="a1111-1.6",
    ),
    pytest.param(
        "a fox\nin the snow, <lora:styles/ink:0.5> <lora:soft:1>\n"
        "Negative prompt: blurry,\nugly\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 7, "
        "Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Clip skip: 2, "
        'Lora hashes: "styles/ink: 0123456789ab, soft: ba9876543210", Version: v1.10.1',
        {
            "Prompt": "a fox\nin the snow, <lora:styles/ink:0.5> <lora:soft:1>",
            "Negative prompt": "blurry,\nugly",
            "Steps": "30",
            "Sampler": "DPM++ 2M",
            "Schedule type": "Karras",
            "CFG scale": "5.5",
            "Seed": "7",
            "Size-1": "1024",
            "Size-2": "1024",
            "Model hash": "31e35c80fc",
            "Model": "sd_xl_base_1.0",
            "Clip skip": "2",
            "Lora hashes": "styles/ink: 0123456789ab, soft: ba9876543210",
            "Version": "v1.10.1",
        },
        id="multiline-two-loras-schedule-type",
    ),
    pytest.param(
        "just a prompt, Steps: 20",
        {"Prompt": "just a prompt, Steps: 20", "Negative prompt": ""},
        id="fewer-than-three-pairs-is-prompt",
    ),
]


@pytest.mark.parametrize(("text", "expected"), EXAMPLES)
def test_reads_fields_as_a1111_does(text: str, expected: dict[str, str]) -> None:
    assert a1111_fields(text) == expected
