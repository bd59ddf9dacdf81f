"""Small shards for the store's tests: unit vectors of a few dimensions, and records that carry them."""

from __future__ import annotations

import numpy as np

from indexer.store.records import Item, Upsert
from indexer.store.shards import ShardSet

#: small enough that exact search, HNSW and IVF builds take milliseconds
DIM = 16


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def upsert(record_id: str, vectors, category="top", collection="products", attrs=None) -> Upsert:
    items = tuple(Item(category, v, (0, 0, 1, 1), None, 1.0) for v in vectors)
    return Upsert(collection, record_id, 0, attrs or {"n": record_id}, items)


def fill(shards: ShardSet, data: np.ndarray, start: int = 0, batch: int = 50, **kw) -> None:
    """Upsert one record ``p<i>`` per row, ``batch`` records per applied batch."""
    for i in range(start, start + len(data), batch):
        shards.apply([upsert(f"p{j}", [data[j - start]], **kw) for j in range(i, min(i + batch, start + len(data)))])
