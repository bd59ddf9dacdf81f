"""Live FAISS shards, one per (collection, category), searched while they grow.

Concurrency model: one writer (the consumer thread) and any number of readers
(query handlers). Readers never take a lock and never wait for the writer, and
each search sees one consistent moment of the whole shard set:

* Every applied batch gets a sequence number. A row remembers the batch that
  deleted it (``deleted_at``, "never" until then); a reader at sequence ``S``
  treats rows deleted after ``S`` as live.
* Vectors sit in preallocated arrays. The writer fills rows past the published
  count and marks deletions with the new sequence number, then publishes a new
  :class:`View` (sequence, and per shard an immutable :class:`_State` with its
  row count) by replacing one reference. A reader that took the old view never
  looks at the new rows and still sees the rows that batch deleted.
* Growing or compacting copies into new arrays, so a reader's arrays are never
  reallocated under it.

So an upsert that moves a record to another category, or rewrites it in place,
is never missing from, nor doubled in, any reader's results.

Search is exact (``faiss.knn``, inner product of L2-normalised vectors) over a
growing flat segment; sealed IVF/HNSW segments come later (docs/architecture.md).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from indexer.pipeline import Delete, Upsert

NEVER = np.iinfo(np.int64).max
_INITIAL_CAPACITY = 256
#: Compact once this many rows are dead (and a sixteenth of the shard).
_COMPACT_AFTER = 1024


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


@dataclass(frozen=True)
class _State:
    vectors: np.ndarray  # (capacity, dim) float32
    deleted_at: np.ndarray  # (capacity,) int64: sequence of the batch that deleted the row, or NEVER
    metas: list[ItemMeta]  # one per row, appended in place
    count: int  # rows published
    dead: int  # rows deleted at or before the view's sequence

    def search(self, queries: np.ndarray, k: int, seq: int) -> list[list[tuple[float, ItemMeta]]]:
        """Top-k live rows of each query as seen at sequence ``seq``."""
        if self.count == 0:
            return [[] for _ in queries]
        wanted = min(self.count, k + self.dead)
        scores, rows = faiss.knn(queries, self.vectors[: self.count], wanted, metric=faiss.METRIC_INNER_PRODUCT)
        results = []
        for q_scores, q_rows in zip(scores, rows):
            found = []
            for score, row in zip(q_scores.tolist(), q_rows.tolist()):
                if row >= 0 and self.deleted_at[row] > seq:
                    found.append((score, self.metas[row]))
                    if len(found) == k:
                        break
            results.append(found)
        return results


@dataclass(frozen=True)
class View:
    """What a reader sees: a sequence number and each shard's state at it."""

    seq: int
    shards: dict[tuple[str, str], _State]


class Shard:
    """The writer's side of one shard: row bookkeeping and the current state."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.state = _State(
            np.empty((_INITIAL_CAPACITY, dim), dtype=np.float32),
            np.full(_INITIAL_CAPACITY, NEVER, dtype=np.int64),
            [],
            0,
            0,
        )
        self._rows: dict[int, int] = {}  # item key -> row

    def append(self, keys: list[int], vectors: np.ndarray, metas: list[ItemMeta]) -> None:
        state = self.state
        n = len(keys)
        if state.count + n > len(state.deleted_at):
            state = self._compacted(state, capacity=max(2 * len(state.deleted_at), state.count + n))
        state.vectors[state.count : state.count + n] = vectors
        state.metas.extend(metas)
        self._rows.update(zip(keys, range(state.count, state.count + n)))
        self.state = _State(state.vectors, state.deleted_at, state.metas, state.count + n, state.dead)

    def remove(self, keys: list[int], seq: int) -> None:
        state = self.state
        for key in keys:
            state.deleted_at[self._rows.pop(key)] = seq
        state = _State(state.vectors, state.deleted_at, state.metas, state.count, state.dead + len(keys))
        if state.dead >= max(_COMPACT_AFTER, state.count // 16):
            state = self._compacted(state, capacity=max(_INITIAL_CAPACITY, 2 * (state.count - state.dead)))
        self.state = state

    def _compacted(self, state: _State, capacity: int) -> _State:
        """New arrays holding the rows still live now; readers of the old arrays are unaffected."""
        live = np.flatnonzero(state.deleted_at[: state.count] == NEVER)
        vectors = np.empty((capacity, self.dim), dtype=np.float32)
        vectors[: len(live)] = state.vectors[live]
        metas = [state.metas[row] for row in live.tolist()]
        row_of_old = {old: new for new, old in enumerate(live.tolist())}
        self._rows = {key: row_of_old[row] for key, row in self._rows.items()}
        return _State(vectors, np.full(capacity, NEVER, dtype=np.int64), metas, len(live), 0)


class ShardSet:
    """All shards of a node: routes upserts and deletes, merges search results."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._shards: dict[tuple[str, str], Shard] = {}  # writer-only
        self._records: dict[tuple[str, str], list[tuple[tuple[str, str], int]]] = {}  # writer-only
        self._record_counts: dict[str, int] = {}
        self._keys = itertools.count()
        self._write_lock = threading.Lock()
        self.view = View(0, {})

    def apply(self, ops: list[Upsert | Delete]) -> None:
        """Apply a batch in order (later operations on a record win) and publish it at once."""
        with self._write_lock:
            seq = self.view.seq + 1
            appends: dict[tuple[str, str], tuple[list[int], list[np.ndarray], list[ItemMeta]]] = {}
            stale: dict[tuple[str, str], list[int]] = {}
            for op in ops:
                record = (op.collection, op.record_id)
                previous = self._records.pop(record, None)
                if previous is not None:
                    self._record_counts[op.collection] -= 1
                    for shard_key, key in previous:
                        stale.setdefault(shard_key, []).append(key)
                if isinstance(op, Delete):
                    continue
                placed = []
                for position, item in enumerate(op.items):
                    shard_key, key = (op.collection, item.category), next(self._keys)
                    keys, vectors, metas = appends.setdefault(shard_key, ([], [], []))
                    keys.append(key)
                    vectors.append(item.vector)
                    metas.append(
                        ItemMeta(
                            op.collection,
                            item.category,
                            op.record_id,
                            position,
                            item.box,
                            item.label,
                            item.score,
                            op.ts,
                            op.attrs,
                        )
                    )
                    placed.append((shard_key, key))
                self._records[record] = placed
                self._record_counts[op.collection] = self._record_counts.get(op.collection, 0) + 1
            for shard_key, (keys, vectors, metas) in appends.items():
                if shard_key not in self._shards:
                    self._shards[shard_key] = Shard(self.dim)
                self._shards[shard_key].append(keys, np.stack(vectors), metas)
            for shard_key, keys in stale.items():
                self._shards[shard_key].remove(keys, seq)
            self.view = View(seq, {key: shard.state for key, shard in self._shards.items()})

    def search(self, vector: np.ndarray, k: int, collection: str, category: str | None = None) -> list[Hit]:
        """Top-k records by their best-matching item across the selected shards."""
        view = self.view
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        candidates: list[tuple[float, ItemMeta]] = []
        for (coll, cat), state in view.shards.items():
            if coll == collection and (category is None or cat == category):
                # Ask for more than k: one record may hold several matching items.
                candidates.extend(state.search(query, 2 * k, view.seq)[0])
        candidates.sort(key=lambda c: -c[0])
        hits: dict[str, Hit] = {}
        for score, meta in candidates:
            if meta.record_id not in hits:
                hits[meta.record_id] = Hit(meta.record_id, score, meta.category, meta.item, meta.box, meta.attrs)
                if len(hits) == k:
                    break
        return list(hits.values())

    def records(self, collection: str) -> int:
        return self._record_counts.get(collection, 0)

    def sizes(self) -> list[dict[str, Any]]:
        return [
            {"collection": coll, "category": cat, "vectors": state.count - state.dead}
            for (coll, cat), state in sorted(self.view.shards.items())
        ]
