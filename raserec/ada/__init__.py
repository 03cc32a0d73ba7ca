"""Ada-Retrieval (Li et al., AAAI 2024): multi-round adaptive retrieval around any encoder."""

from raserec.ada.adapters import FilterLayer, ItemRepresentationAdapter, UserRepresentationAdapter
from raserec.ada.model import AdaOutput, AdaRetrieval, items_mask, list_ranks

__all__ = [
    "AdaOutput",
    "AdaRetrieval",
    "FilterLayer",
    "ItemRepresentationAdapter",
    "UserRepresentationAdapter",
    "items_mask",
    "list_ranks",
]
