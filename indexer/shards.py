"""Live FAISS shards, one per (collection, category), searched while they grow.

Concurrency model: one writer (the consumer thread) and any number of readers
(query handlers). Readers never take a lock and never wait for the writer:

* A :class:`Shard` keeps its vectors in a preallocated array and publishes an
  immutable ``_State`` (arrays, row count). The writer fills rows past the
  published count, then publishes a new state; a reader that took the old state
  never looks at those rows. Growing or compacting copies into new arrays, so a
  reader's arrays are never reallocated under it.
* A delete writes -1 into the row's key (a tombstone). Readers ask FAISS for a
  few more neighbours than ``k`` and drop tombstoned rows.
* An upsert appends the new vectors *before* tombstoning the old ones, so a
  reader sees the record at every moment (twice, briefly, which the merge
  de-duplicates) and never not at all.
* :class:`ShardSet` swaps its dict of shards copy-on-write when a shard is added.

Exact search with ``faiss.knn`` on the published rows: correct at any size and
fast for the flat segments of this stage; sealed IVF/HNSW segments come later
(see docs/architecture.md).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from indexer.pipeline import Delete, Upsert

TOMBSTONE = -1
_INITIAL_CAPACITY = 256
#: Compact once this many rows are tombstoned (and a sixteenth of the shard).
_COMPACT_AFTER = 1024


@dataclass(frozen=True)
class _State:
    vectors: np.ndarray  # (capacity, dim) float32
    keys: np.ndarray  # (capacity,) int64: item key, or TOMBSTONE
    count: int  # rows published
    deleted: int  # tombstoned rows among them


class Shard:
    """Exact inner-product search over L2-normalised vectors; one writer, lock-free readers."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._state = _State(
            np.empty((_INITIAL_CAPACITY, dim), dtype=np.float32),
            np.full(_INITIAL_CAPACITY, TOMBSTONE, dtype=np.int64),
            0,
            0,
        )
        self._rows: dict[int, int] = {}  # item key -> row; writer-only

    def __len__(self) -> int:
        state = self._state
        return state.count - state.deleted

    def append(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        state = self._state
        n = len(keys)
        if state.count + n > len(state.keys):
            state = self._copy(state, capacity=max(2 * len(state.keys), state.count + n))
        state.vectors[state.count : state.count + n] = vectors
        state.keys[state.count : state.count + n] = keys
        self._rows.update(zip(keys.tolist(), range(state.count, state.count + n)))
        self._state = _State(state.vectors, state.keys, state.count + n, state.deleted)

    def remove(self, keys: list[int]) -> None:
        state = self._state
        removed = 0
        for key in keys:
            row = self._rows.pop(key, None)
            if row is not None:
                state.keys[row] = TOMBSTONE
                removed += 1
        state = _State(state.vectors, state.keys, state.count, state.deleted + removed)
        if state.deleted >= max(_COMPACT_AFTER, state.count // 16):
            state = self._copy(state, capacity=max(_INITIAL_CAPACITY, 2 * (state.count - state.deleted)))
        self._state = state

    def _copy(self, state: _State, capacity: int) -> _State:
        """New arrays holding the live rows only; readers of the old arrays are unaffected."""
        live = np.flatnonzero(state.keys[: state.count] != TOMBSTONE)
        vectors = np.empty((capacity, self.dim), dtype=np.float32)
        keys = np.full(capacity, TOMBSTONE, dtype=np.int64)
        vectors[: len(live)] = state.vectors[live]
        keys[: len(live)] = state.keys[live]
        self._rows = dict(zip(keys[: len(live)].tolist(), range(len(live))))
        return _State(vectors, keys, len(live), 0)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, item keys) of shape (len(queries), k); missing slots have key -1."""
        state = self._state
        nq = len(queries)
        if state.count == 0:
            return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), TOMBSTONE, dtype=np.int64)
        wanted = min(state.count, k + state.deleted)
        scores, rows = faiss.knn(queries, state.vectors[: state.count], wanted, metric=faiss.METRIC_INNER_PRODUCT)
        keys = np.where(rows >= 0, state.keys[np.maximum(rows, 0)], TOMBSTONE)
        out_scores = np.full((nq, k), -np.inf, dtype=np.float32)
        out_keys = np.full((nq, k), TOMBSTONE, dtype=np.int64)
        for q in range(nq):
            live = keys[q] != TOMBSTONE
            found = int(min(k, live.sum()))
            out_scores[q, :found] = scores[q][live][:found]
            out_keys[q, :found] = keys[q][live][:found]
        return out_scores, out_keys


@dataclass(frozen=True)
class ItemMeta:
    collection: str
    category: str
    record_id: str
    item: int  # position of the item within its record (0 for a thumbnail)
    box: tuple[int, int, int, int]
    label: str | None
    score: float
    ts: int
    attrs: dict[str, Any]


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    category: str
    item: int
    box: tuple[int, int, int, int]
    attrs: dict[str, Any]


@dataclass
class ShardSet:
    """All shards of a node: routes upserts and deletes, merges search results."""

    dim: int
    _shards: dict[tuple[str, str], Shard] = field(default_factory=dict)
    _meta: dict[int, ItemMeta] = field(default_factory=dict)
    _records: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # writer-only
    _record_counts: dict[str, int] = field(default_factory=dict)
    _next_key: itertools.count = field(default_factory=itertools.count)
    _write_lock: threading.Lock = field(default_factory=threading.Lock)

    def apply(self, ops: list[Upsert | Delete]) -> None:
        """Apply a batch in order; later operations on a record win."""
        with self._write_lock:
            appends: dict[tuple[str, str], tuple[list[int], list[np.ndarray]]] = {}
            stale: list[int] = []
            for op in ops:
                record = (op.collection, op.record_id)
                previous = self._records.pop(record, None)
                if previous is not None:
                    stale.extend(previous)
                    self._record_counts[op.collection] -= 1
                if isinstance(op, Delete):
                    continue
                keys = []
                for position, item in enumerate(op.items):
                    key = next(self._next_key)
                    keys.append(key)
                    shard_keys, vectors = appends.setdefault((op.collection, item.category), ([], []))
                    shard_keys.append(key)
                    vectors.append(item.vector)
                    self._meta[key] = ItemMeta(
                        op.collection, item.category, op.record_id, position,
                        item.box, item.label, item.score, op.ts, op.attrs,
                    )
                self._records[record] = keys
                self._record_counts[op.collection] = self._record_counts.get(op.collection, 0) + 1
            # Append first, tombstone after: a record is never invisible to a reader.
            for shard_key, (keys, vectors) in appends.items():
                self._shard(shard_key).append(np.asarray(keys, dtype=np.int64), np.stack(vectors))
            self._remove(stale)

    def _remove(self, keys: list[int]) -> None:
        by_shard: dict[tuple[str, str], list[int]] = {}
        for key in keys:
            meta = self._meta.pop(key)
            by_shard.setdefault((meta.collection, meta.category), []).append(key)
        for shard_key, shard_keys in by_shard.items():
            self._shards[shard_key].remove(shard_keys)

    def _shard(self, key: tuple[str, str]) -> Shard:
        shard = self._shards.get(key)
        if shard is None:
            shard = Shard(self.dim)
            self._shards = {**self._shards, key: shard}
        return shard

    def search(
        self, vector: np.ndarray, k: int, collection: str, category: str | None = None
    ) -> list[Hit]:
        """Top-k records by their best-matching item across the selected shards."""
        shards = self._shards
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        candidates: list[tuple[float, int]] = []
        for (coll, cat), shard in shards.items():
            if coll != collection or (category is not None and cat != category):
                continue
            # Ask for a few more than k: one record may hold several matching items.
            scores, keys = shard.search(query, 2 * k)
            candidates.extend((float(s), int(key)) for s, key in zip(scores[0], keys[0]) if key != TOMBSTONE)
        candidates.sort(reverse=True)
        hits: dict[str, Hit] = {}
        for score, key in candidates:
            meta = self._meta.get(key)
            if meta is None or meta.record_id in hits:
                continue  # deleted after the search, or a lower-scoring item of a record already in
            hits[meta.record_id] = Hit(meta.record_id, score, meta.category, meta.item, meta.box, meta.attrs)
            if len(hits) == k:
                break
        return list(hits.values())

    def records(self, collection: str) -> int:
        return self._record_counts.get(collection, 0)

    def sizes(self) -> list[dict[str, Any]]:
        return [
            {"collection": coll, "category": cat, "vectors": len(shard)}
            for (coll, cat), shard in sorted(self._shards.items())
        ]
