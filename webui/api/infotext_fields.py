"""Parameters text -> the flat dict A1111's own infotext parser returns (what its
`/sdapi/v1/png-info` answers as `parameters`): `Prompt`, `Negative prompt`, every `Key: value`
pair unquoted, and `WxH` values split into `Key-1` and `Key-2`."""

from __future__ import annotations

import re

from webui.engine.infotext import parse_infotext

_SIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_fields(text: str) -> dict[str, str]:
    """The fields A1111 reads from parameters `text` (values stay strings, as in A1111)."""
    infotext = parse_infotext(text)
    fields = {"Prompt": infotext.prompt, "Negative prompt": infotext.negative_prompt}
    for key, value in infotext.params.items():
        size = _SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value
    return fields
