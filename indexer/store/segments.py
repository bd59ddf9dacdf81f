"""Segments: the immutable-once-published row stores a shard searches.

A shard has *sealed* segments (built in the background: a FAISS HNSW or IVF
index, or exact flat rows while they are small or on a GPU) and one *growing*
segment (a preallocated float32 array searched exactly).
Rows are never removed in place: a delete writes the sequence number of its
batch into ``deleted_at``, and a reader at sequence ``S`` skips rows deleted
at or before ``S``. Readers therefore never lock (see shards.py).

What a segment is lives here; how it is built and searched depends on the
search backend (backends.py), which every segment names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.store.columns import Columns, FilterSpec

if TYPE_CHECKING:
    from indexer.store.backends import Backend

NEVER = np.iinfo(np.int64).max
BLOCK_ROWS = 65_536  # rows an index build reads at a time: 320 MB at 1280-d


@dataclass(frozen=True)
class ItemMeta:
    """One row's metadata as the API shows it: made from the columns for hits and lookups only."""

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
class Segment:
    kind: str  # "flat" (growing, small sealed, or sealed on a GPU), "hnsw", "ivf"
    keys: np.ndarray  # (capacity,) int64 item key of each row
    deleted_at: np.ndarray  # (capacity,) int64: sequence of the deleting batch, or NEVER
    columns: Columns  # each row's metadata (filled in place past ``count`` for the growing segment)
    count: int  # rows published
    dead: int  # rows deleted among them, as of the view that holds this object
    vectors: np.ndarray | None = None  # flat rows (capacity, dim)
    index: Any = None  # FAISS index for hnsw / ivf
    search_params: Any = None
    mirror: Any = None  # the rows on the backend's device (torch-cuda: a tensor mirroring ``vectors``)
    #: rows ordered by ``columns`` record hash (sealed segments): a record's rows are found by binary search
    by_record: bool = False
    #: the backend that searches this segment (and made its ``index`` or ``mirror``)
    backend: Backend = field(kw_only=True)

    @property
    def live(self) -> int:
        return self.count - self.dead

    def search(self, queries: np.ndarray, k: int, seq: int) -> list[list[tuple[float, int]]]:
        """Top-k (score, row) of each query among the rows live at sequence ``seq``."""
        if self.count == 0:
            return [[] for _ in queries]
        scores, rows = self.backend.knn(self, queries, min(self.count, k + self.dead))
        results = []
        for q_scores, q_rows in zip(scores.tolist(), rows.tolist()):
            found = []
            for score, row in zip(q_scores, q_rows):
                if 0 <= row < self.count and self.deleted_at[row] > seq:
                    found.append((score, row))
                    if len(found) == k:
                        break
            results.append(found)
        return results

    def search_rows(self, query: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[float, int]]:
        """Exact top-k (score, row) among these rows: few rows, or a segment without an index to select with.

        The rows are read back into one buffer of ``EXACT_BLOCK_BYTES`` at a
        time: 500,000 matching rows of 128-d would otherwise take 256 MB a query.
        A flat segment scores every row instead when at least ``1 / DENSE_SHARE``
        of them are asked for: reading them all in order costs less than
        gathering that many.
        """
        if not len(rows):
            return []
        if self.index is None and len(rows) * DENSE_SHARE >= self.count:
            return _ranked((self.vectors[: self.count] @ query)[rows], rows, k)
        block = max(k, EXACT_BLOCK_BYTES // (4 * self.dim))
        buffer = np.empty((min(len(rows), block), self.dim), np.float32)
        kept_scores, kept_rows = [], []
        for start in range(0, len(rows), len(buffer)):
            part = rows[start : start + len(buffer)]
            scores = self.row_vectors(part, out=buffer[: len(part)]) @ query
            best = _top(scores, k)
            kept_scores.append(scores[best])
            kept_rows.append(part[best])
        return _ranked(np.concatenate(kept_scores), np.concatenate(kept_rows), k)

    def rows_of(self, hashes: np.ndarray) -> np.ndarray:
        """Rows (live or not) of the records with these hashes: a binary search where rows are ordered by record."""
        records = self.columns.arrays["record"][: self.count]
        hashes = np.asarray(hashes, np.uint64)
        if not self.by_record:
            return np.flatnonzero(np.isin(records, hashes))
        low = np.searchsorted(records, hashes, "left")
        high = np.searchsorted(records, hashes, "right")
        sizes = high - low
        if not sizes.any():
            return np.empty(0, np.int64)
        return np.repeat(low - np.cumsum(sizes) + sizes, sizes) + np.arange(int(sizes.sum()))

    def live_rows(self, seq: int) -> np.ndarray:
        return np.flatnonzero(self.live_mask(seq))

    def live_mask(self, seq: int) -> np.ndarray:
        return self.deleted_at[: self.count] > seq

    @property
    def dim(self) -> int:
        return self.index.d if self.index is not None else self.vectors.shape[1]

    def row_vectors(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The stored vectors of some rows (reconstructed from the index for sealed segments), into ``out`` if given."""
        if out is None:
            out = np.empty((len(rows), self.dim), np.float32)
        if self.index is None:
            np.take(self.vectors, rows, axis=0, out=out)
        elif len(rows):
            self.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64), out)
        return out

    def with_counts(self, count: int | None = None, dead: int | None = None) -> Segment:
        return replace(self, count=self.count if count is None else count, dead=self.dead if dead is None else dead)


#: what an exact search over chosen rows reads back at a time (65,536 rows of 128-d float32)
EXACT_BLOCK_BYTES = 32 << 20
#: a flat segment scores all its rows when a filter matches at least 1 / DENSE_SHARE of them: at 16,000 x 1280
#: gathering half the rows and scoring them took 34 ms, scoring all 6 ms; a fifth 11 against 4; a twentieth 2 against 5
DENSE_SHARE = 8


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, in no order."""
    return np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))


def _ranked(scores: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[float, int]]:
    """The k best (score, row) of these, best first."""
    best = _top(scores, k)
    best = best[np.argsort(-scores[best], kind="stable")]
    return list(zip(scores[best].tolist(), rows[best].tolist()))


def empty_growing(dim: int, backend: Backend, spec: FilterSpec, capacity: int = 256) -> Segment:
    return Segment(
        "flat",
        np.full(capacity, -1, np.int64),
        np.full(capacity, NEVER, np.int64),
        Columns.empty(spec, capacity),
        0,
        0,
        vectors=np.empty((capacity, dim), np.float32),
        mirror=backend.allocate(capacity, dim),
        backend=backend,
    )


def growing_from(vectors: np.ndarray, keys: np.ndarray, columns: Columns, capacity: int, backend: Backend) -> Segment:
    """A growing segment of room for ``capacity`` rows holding these (``columns`` has exactly their rows)."""
    n, dim = vectors.shape
    capacity = max(capacity, n, 256)
    grown = columns.take(np.arange(n), capacity) if columns.capacity < capacity else columns
    segment = Segment(
        "flat",
        np.full(capacity, -1, np.int64),
        np.full(capacity, NEVER, np.int64),
        grown,
        n,
        0,
        vectors=np.empty((capacity, dim), np.float32),
        mirror=backend.allocate(capacity, dim),
        backend=backend,
    )
    segment.vectors[:n] = vectors
    segment.keys[:n] = keys
    backend.write(segment.mirror, 0, vectors)
    return segment


def built_segment(keys: np.ndarray, columns: Columns, kind: str, backend: Backend, **rows: Any) -> Segment:
    """A newly built (sealed) segment: every row live, holding copies of the keys and metadata it was built from."""
    n = len(keys)
    columns.index_ranges(n)
    return Segment(kind, keys.copy(), np.full(n, NEVER, np.int64), columns, n, 0, backend=backend, **rows)


@dataclass(frozen=True)
class RowSource:
    """Rows to build an index over, read a block at a time.

    A rebuild holds the old index and the new one; gathering every live row
    into one array first would add a third copy (5 GB at 1M x 1280), so an
    ANN index takes its rows block by block from the segments instead.
    """

    #: (reader, rows): ``reader(rows, out)`` fills ``out`` with the vectors of those rows
    parts: tuple[tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], np.ndarray], ...]
    dim: int
    #: position ``i`` of this source is position ``order[i]`` of the parts (a sealed segment's record order)
    order: np.ndarray | None = None

    def ordered(self, order: np.ndarray) -> RowSource:
        return replace(self, order=order)

    @classmethod
    def of_segments(cls, parts: list[tuple[Segment, np.ndarray]], dim: int) -> RowSource:
        return cls(tuple((segment.row_vectors, rows) for segment, rows in parts), dim)

    @classmethod
    def of(cls, vectors: np.ndarray | RowSource) -> RowSource:
        return vectors if isinstance(vectors, RowSource) else cls.of_array(vectors)

    @classmethod
    def of_array(cls, vectors: np.ndarray) -> RowSource:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)

        def read(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
            return np.take(vectors, rows, axis=0, out=out)

        return cls(((read, np.arange(len(vectors))),), vectors.shape[1])

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.parts)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at these ascending positions, in one new array."""
        if self.order is None:
            return self._take_sorted(positions)
        wanted = self.order[positions]
        by_part = np.argsort(wanted, kind="stable")
        out = np.empty((len(positions), self.dim), np.float32)
        out[by_part] = self._take_sorted(wanted[by_part])
        return out

    def _take_sorted(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((len(positions), self.dim), np.float32)
        start = done = 0
        for read, rows in self.parts:
            end = start + len(rows)
            here = positions[np.searchsorted(positions, start) : np.searchsorted(positions, end)]
            if len(here):
                read(rows[here - start], out[done : done + len(here)])
                done += len(here)
            start = end
        return out

    def all(self) -> np.ndarray:
        return self.take(np.arange(len(self)))

    def blocks(self, size: int = BLOCK_ROWS) -> Iterator[np.ndarray]:
        n = len(self)
        for start in range(0, n, size):
            yield self.take(np.arange(start, min(start + size, n)))
