"""Textual-inversion embeddings bundled in a LoRA file: OneTrainer's `bundle_emb.NAME.clip_l`
([n, 768]) / `.clip_g` ([n, 1280]) and A1111's `bundle_emb.NAME.string_to_param.*`. They are
set aside as embeddings, never counted as LoRA modules."""

_PREFIX = "bundle_emb."


def is_embedding_key(key: str) -> bool:
    """Whether a file key belongs to a bundled embedding."""
    return key.startswith(_PREFIX)


def embedding_name(key: str) -> str:
    """The embedding's name (`bundle_emb.NAME.clip_l` -> NAME)."""
    return key[len(_PREFIX) :].split(".", 1)[0]
