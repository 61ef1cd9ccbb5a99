"""Krea 2: a 28-block DiT with text-fusion stages. Names: sd-scripts' Krea-2 LoRAs over the
native module names (`blocks.N.attn.wq`, `tmlp`), as InvokeAI's fixture of a real file shows."""

from webui.families.family import Family, patterns

FAMILY = Family(
    name="Krea 2",
    modelspec=("krea-2", "krea2"),
    base_versions=(r"krea_?2",),
    civitai=("Krea 2",),
    keys=patterns(r"(^|_)blocks_\d+_attn_(w[qkvo]|gate)_", r"(^|_)tmlp_\d+_"),
    arch=None,
)
