"""Ada-Retrieval (Li et al., AAAI 2024): multi-round adaptive retrieval around any encoder."""

from raserec.models.ada import AdaOutput, AdaRetrieval, items_mask, list_ranks
from raserec.models.ada_adapters import FilterLayer, ItemRepresentationAdapter, UserRepresentationAdapter

__all__ = [
    "AdaOutput",
    "AdaRetrieval",
    "FilterLayer",
    "ItemRepresentationAdapter",
    "UserRepresentationAdapter",
    "items_mask",
    "list_ranks",
]
