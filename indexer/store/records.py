"""What the store holds and takes: a record's items, and the operations that change records.

The pipeline produces these (one :class:`Upsert` or :class:`Delete` per event),
the shards apply them, checkpoints and thumbnails keep what they carry. They
live with the store because the store defines what a record is; producers of
operations (the pipeline today, a records topic tomorrow) depend on them, not
the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Item:
    """One garment of one record, ready for a shard."""

    category: str
    vector: np.ndarray
    box: tuple[int, int, int, int]  # in the original image's pixels
    label: str | None
    score: float


@dataclass(frozen=True)
class Upsert:
    collection: str
    record_id: str
    ts: int
    attrs: dict[str, Any]
    items: tuple[Item, ...]
    thumbnail: bytes | None = None  # a small JPEG of the image, for result pages


@dataclass(frozen=True)
class Delete:
    collection: str
    record_id: str
    ts: int
