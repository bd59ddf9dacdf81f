"""Segments: the immutable-once-published row stores a shard searches.

A shard has at most one *sealed* segment (a FAISS HNSW or IVF index built in
the background, or an exact flat one while the shard is small) and one
*growing* segment (a preallocated float32 array searched exactly with
``faiss.knn``). Rows are never removed in place: a delete writes the sequence
number of its batch into ``deleted_at``, and a reader at sequence ``S`` skips
rows deleted at or before ``S``. Readers therefore never lock (see shards.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np

from indexer.store import gpu

NEVER = np.iinfo(np.int64).max
BLOCK_ROWS = 65_536  # rows an index build reads at a time: 320 MB at 1280-d


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
class IndexPolicy:
    """When to seal a shard into an ANN index, and which one (see docs/architecture.md)."""

    seal_min_rows: int = 10_000  # below this, exact search is fast enough
    growing_max_rows: int = 20_000  # rebuild once the growing segment is this large
    rebuild_dead_fraction: float = 0.2  # ...or this share of the sealed rows are deleted
    rebuild_min_dead: int = 1024  # ...and at least this many
    hnsw_max_rows: int = 200_000  # HNSW up to here, IVF above
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 128
    ivf_nprobe_fraction: float = 1 / 16


@dataclass(frozen=True)
class Segment:
    kind: str  # "flat" (growing or small sealed), "hnsw", "ivf"
    keys: np.ndarray  # (capacity,) int64 item key of each row
    deleted_at: np.ndarray  # (capacity,) int64: sequence of the deleting batch, or NEVER
    metas: list[ItemMeta]  # one per row (appended in place for the growing segment)
    count: int  # rows published
    dead: int  # rows deleted among them, as of the view that holds this object
    vectors: np.ndarray | None = None  # flat rows (capacity, dim)
    index: Any = None  # FAISS index for hnsw / ivf
    search_params: Any = None
    gpu: Any = None  # CUDA tensor mirroring ``vectors`` (torch-cuda backend)

    @property
    def live(self) -> int:
        return self.count - self.dead

    def search(self, queries: np.ndarray, k: int, seq: int) -> list[list[tuple[float, ItemMeta]]]:
        """Top-k rows of each query that are live at sequence ``seq``."""
        if self.count == 0:
            return [[] for _ in queries]
        wanted = min(self.count, k + self.dead)
        if self.gpu is not None:
            scores, rows = gpu.knn(self.gpu, self.count, queries, wanted)
        elif self.index is None:
            scores, rows = faiss.knn(queries, self.vectors[: self.count], wanted, metric=faiss.METRIC_INNER_PRODUCT)
        else:
            scores, rows = self.index.search(queries, wanted, params=self.search_params)
        results = []
        for q_scores, q_rows in zip(scores.tolist(), rows.tolist()):
            found = []
            for score, row in zip(q_scores, q_rows):
                if 0 <= row < self.count and self.deleted_at[row] > seq:
                    found.append((score, self.metas[row]))
                    if len(found) == k:
                        break
            results.append(found)
        return results

    def live_rows(self, seq: int) -> np.ndarray:
        return np.flatnonzero(self.deleted_at[: self.count] > seq)

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


def empty_growing(dim: int, capacity: int = 256, backend: str = "cpu") -> Segment:
    return Segment(
        "flat",
        np.full(capacity, -1, np.int64),
        np.full(capacity, NEVER, np.int64),
        [],
        0,
        0,
        vectors=np.empty((capacity, dim), np.float32),
        gpu=gpu.allocate(capacity, dim) if backend == gpu.NAME else None,
    )


def growing_from(
    vectors: np.ndarray, keys: np.ndarray, metas: list[ItemMeta], capacity: int, backend: str = "cpu"
) -> Segment:
    n, dim = vectors.shape
    segment = empty_growing(dim, max(capacity, n, 256), backend)
    segment.vectors[:n] = vectors
    segment.keys[:n] = keys
    segment.metas.extend(metas)
    if segment.gpu is not None:
        gpu.write(segment.gpu, 0, vectors)
    return segment.with_counts(count=n)


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

    @classmethod
    def of_segments(cls, parts: list[tuple[Segment, np.ndarray]], dim: int) -> RowSource:
        return cls(tuple((segment.row_vectors, rows) for segment, rows in parts), dim)

    @classmethod
    def of_array(cls, vectors: np.ndarray) -> RowSource:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)

        def read(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
            return np.take(vectors, rows, axis=0, out=out)

        return cls(((read, np.arange(len(vectors))),), vectors.shape[1])

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.parts)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at these ascending positions of all rows, in one new array."""
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


def build_sealed(
    vectors: np.ndarray | RowSource,
    keys: np.ndarray,
    metas: list[ItemMeta],
    policy: IndexPolicy,
    backend: str = "cpu",
    previous: Segment | None = None,
) -> Segment:
    """An index over these rows: exact flat when small, HNSW when medium, IVF when large.

    On the torch-cuda backend every sealed segment is an exact flat one on the
    GPU: a matrix product there is faster than an ANN index on the CPU.
    Runs in the background builder thread; FAISS releases the GIL while it works.
    An ANN index reads its rows a block at a time (see ``RowSource``).
    An IVF rebuild keeps the ``previous`` segment's centroids while the shard
    has at most twice the rows they were trained for: training (k-means) is
    most of an IVF build, 15 of 18 minutes at 1M x 1280 on one core.
    """
    rows = vectors if isinstance(vectors, RowSource) else RowSource.of_array(vectors)
    n, dim = len(rows), rows.dim
    deleted = np.full(n, NEVER, np.int64)
    if backend == gpu.NAME:
        flat = rows.all()
        return Segment("flat", keys.copy(), deleted, list(metas), n, 0, vectors=flat, gpu=gpu.mirror(flat, max(n, 1)))
    if n < policy.seal_min_rows:
        return Segment("flat", keys.copy(), deleted, list(metas), n, 0, vectors=rows.all())
    if n <= policy.hnsw_max_rows:
        index = faiss.IndexHNSWFlat(dim, policy.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = policy.hnsw_ef_construction
        for block in rows.blocks():
            index.add(block)
        params = faiss.SearchParametersHNSW(efSearch=policy.hnsw_ef_search)
        return Segment("hnsw", keys.copy(), deleted, list(metas), n, 0, index=index, search_params=params)
    nlist = int(4 * math.sqrt(n))
    quantizer = faiss.IndexFlatIP(dim)
    if previous is not None and previous.kind == "ivf" and previous.index.nlist >= nlist / math.sqrt(2):
        nlist = previous.index.nlist  # trained for at least half as many rows: keep its centroids
        quantizer.add(previous.index.quantizer.reconstruct_n(0, nlist))
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
        index.train(rows.take(np.sort(sample)))
    for block in rows.blocks():
        index.add(block)
    index.make_direct_map()  # for reconstruct() when the segment is rebuilt
    params = faiss.SearchParametersIVF(nprobe=max(8, int(nlist * policy.ivf_nprobe_fraction)))
    return Segment("ivf", keys.copy(), deleted, list(metas), n, 0, index=index, search_params=params)


def restore_search_params(segment: Segment, policy: IndexPolicy) -> Segment:
    """Search parameters are not serialised with an index; set them again after loading."""
    if segment.kind == "hnsw":
        return replace(segment, search_params=faiss.SearchParametersHNSW(efSearch=policy.hnsw_ef_search))
    if segment.kind == "ivf":
        nlist = segment.index.nlist
        return replace(
            segment, search_params=faiss.SearchParametersIVF(nprobe=max(8, int(nlist * policy.ivf_nprobe_fraction)))
        )
    return segment


def on_backend(segment: Segment, backend: str) -> Segment:
    """The segment as the backend searches it: on torch-cuda, flat rows mirrored on the GPU."""
    if backend != gpu.NAME or segment.gpu is not None:
        return segment
    rows = np.arange(segment.count)
    vectors = segment.row_vectors(rows) if segment.vectors is None else segment.vectors
    return replace(
        segment,
        kind="flat",
        vectors=vectors,
        index=None,
        search_params=None,
        gpu=gpu.mirror(vectors[: segment.count], max(len(vectors), 1)),
    )
