"""Krea 2: named by metadata only (no public key layout was found to check against)."""

from webui.families.family import Family

FAMILY = Family(
    name="Krea 2",
    modelspec=("krea-2", "krea2"),
    base_versions=(r"krea_?2",),
    civitai=("Krea 2",),
    arch=None,
)
