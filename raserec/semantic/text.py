"""Item text from side information, without an LLM: the ``template`` generator.

``render_items`` turns each item's fields (``ItemFeatures``) into one line of text, e.g.
``"title: red shatter crackle nail polish e55; categories: Makeup > Nails > Nail Polish; brand:
OPI"``. Items without any of the fields get the empty string and are counted, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from raserec.data.features import ItemFeatures
from raserec.errors import DataError

log = logging.getLogger(__name__)

#: Fields rendered by default, in order, with the label they get in the text.
DEFAULT_FIELDS: tuple[tuple[str, str], ...] = (("title_keywords", "title"), ("categories", "categories"),
                                                ("brand", "brand"))


def _value_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " > ".join(str(v) for v in value if v is not None)
    return str(value).strip()


def render_items(features: ItemFeatures, fields: Sequence[tuple[str, str]] = DEFAULT_FIELDS) -> list[str]:
    """One text per dense item id ``0..num_items`` (``[0]``, padding, is ``""``), from the
    ``fields`` (feature name, label) that the features have; at least one must exist."""
    present = [(name, label) for name, label in fields if name in features.fields]
    if not present:
        raise DataError(f"{features.source or 'item features'}: none of the text fields "
                        f"{[name for name, _ in fields]} exists (fields: {features.fields})")
    columns = [(label, features.column(name)) for name, label in present]
    texts = []
    for i in range(features.num_items + 1):
        parts = [f"{label}: {text}" for label, col in columns if (text := _value_text(col[i]))]
        texts.append("; ".join(parts) if i else "")
    empty = sum(1 for t in texts[1:] if not t)
    if empty:
        log.warning("%s: %d of %d items have no text in %s; they get an empty text", features.source, empty,
                    features.num_items, [name for name, _ in present])
    return texts
