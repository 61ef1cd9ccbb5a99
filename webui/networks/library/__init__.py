"""The `loras/` and `embeddings/` folders: the index of LoRA files (headers, sidecars, previews,
cache, background hashes), tag-name lookup, the trigger words each file answers, user metadata,
and the textual-inversion embedding library. The only door of the package: other packages
import from `webui.networks.library`, never from its inner modules."""

from webui.networks.library.catalog import NetworkCatalog, UnknownNetworkError
from webui.networks.library.catalog_index import NETWORK_SUFFIXES, CatalogIndex, NetworkEntry
from webui.networks.library.embedding_library import Embedding, EmbeddingLibrary
from webui.networks.library.previews import preview_bytes, set_preview
from webui.networks.library.sidecars import (
    read_civitai_info,
    read_user_metadata,
    save_user_metadata,
    split_words,
)

__all__ = [
    "NETWORK_SUFFIXES",
    "CatalogIndex",
    "Embedding",
    "EmbeddingLibrary",
    "NetworkCatalog",
    "NetworkEntry",
    "UnknownNetworkError",
    "preview_bytes",
    "read_civitai_info",
    "read_user_metadata",
    "save_user_metadata",
    "set_preview",
    "split_words",
]
