"""Live shards, one per (collection, category), searched while they grow and while they are rebuilt.

Concurrency model: one writer (the consumer thread) and any number of readers
(query handlers). Readers never take a lock and never wait for the writer, and
each search sees one consistent moment of the whole shard set:

* Every applied batch gets a sequence number. A row remembers the batch that
  deleted it (``deleted_at``); a reader at sequence ``S`` treats rows deleted
  after ``S`` as live (segments.py).
* The writer fills rows past a growing segment's published count and marks
  deletions with the new sequence number, then publishes a new :class:`View`
  (sequence, and per shard its segments) by replacing one reference. A reader
  holding the old view never looks at the new rows and still sees the rows
  that batch deleted.
* When a shard grows past ``ShardSettings.growing_max_rows`` (or collects too
  many deleted rows), a background thread builds a sealed index over the rows
  live at some sequence ``S``. The writer swaps it in at a later batch: rows
  deleted since ``S`` are marked deleted in it, rows added since ``S`` stay in
  a fresh growing segment. Deleted rows are not copied, so a rebuild reclaims
  their memory.

Item keys come from one counter and only grow, so within a segment they are
ascending and every growing key is above every sealed one: the writer finds a
key's row with a binary search, and installs a rebuild with array operations,
never a Python loop over all rows (which would hold the GIL and stall queries).

So an upsert that moves a record to another category, rewrites it in place, or
lands while its shard is being rebuilt, is never missing from, nor doubled in,
any reader's results.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import operator
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from indexer.config import ShardSettings
from indexer.store.backends import Backend, FaissBackend
from indexer.store.records import Delete, Upsert
from indexer.store.segments import NEVER, ItemMeta, RowSource, Segment, empty_growing, growing_from

log = logging.getLogger(__name__)

ShardKey = tuple[str, str]  # (collection, category)
#: How many more candidates a filtered search fetches than it returns.
FILTER_FETCH = 8
RECENT = 200
#: Compact the growing segment once this many of its rows are deleted (and a sixteenth of it).
_COMPACT_AFTER = 1024


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    collection: str
    category: str
    item: int  # which item of the record matched (a garment of a post)
    box: tuple[int, int, int, int]  # that item's box in the record's image
    attrs: dict[str, Any]


@dataclass(frozen=True)
class ShardState:
    sealed: Segment | None
    growing: Segment

    @property
    def segments(self) -> tuple[Segment, ...]:
        return (self.growing,) if self.sealed is None else (self.sealed, self.growing)

    @property
    def live(self) -> int:
        return sum(s.live for s in self.segments)


@dataclass(frozen=True)
class View:
    """What a reader sees: a sequence number and each shard's segments at it."""

    seq: int
    shards: dict[ShardKey, ShardState]


class Shard:
    """The writer's side of one shard: where each item's row is, and the current segments."""

    def __init__(
        self, dim: int, sealed: Segment | None = None, growing: Segment | None = None, backend: Backend | None = None
    ) -> None:
        self.dim = dim
        self.backend = backend or FaissBackend()
        self.sealed = sealed
        self.growing = growing or empty_growing(dim, self.backend)
        self.building: Future | None = None
        self._deleted_while_building: list[np.ndarray] = []  # item keys removed since the running build began

    @property
    def state(self) -> ShardState:
        return ShardState(self.sealed, self.growing)

    def append(self, keys: list[int], vectors: np.ndarray, metas: list[ItemMeta]) -> None:
        g = self.growing
        n = len(keys)
        if g.count + n > len(g.keys):
            g = self._compacted_growing(capacity=max(2 * len(g.keys), g.count + n))
        g.vectors[g.count : g.count + n] = vectors
        self.backend.write(g.mirror, g.count, vectors)
        g.keys[g.count : g.count + n] = keys
        g.metas.extend(metas)
        self.growing = g.with_counts(count=g.count + n)

    def remove(self, keys: list[int], seq: int) -> None:
        keys = np.asarray(keys, np.int64)
        if self.building is not None:
            self._deleted_while_building.append(keys)
        sealed = self.sealed
        if sealed is None or sealed.count == 0:
            in_sealed = np.zeros(len(keys), bool)
        else:  # every growing key is above every sealed one
            in_sealed = keys <= sealed.keys[sealed.count - 1]
        dead_sealed = self._mark_deleted(sealed, keys[in_sealed], seq) if in_sealed.any() else 0
        dead_growing = self._mark_deleted(self.growing, keys[~in_sealed], seq) if not in_sealed.all() else 0
        if dead_sealed:
            self.sealed = self.sealed.with_counts(dead=self.sealed.dead + dead_sealed)
        if dead_growing:
            self.growing = self.growing.with_counts(dead=self.growing.dead + dead_growing)
            if self.growing.dead >= max(_COMPACT_AFTER, self.growing.count // 16):
                self.growing = self._compacted_growing(capacity=max(256, 2 * self.growing.live))

    @staticmethod
    def _mark_deleted(segment: Segment, keys: np.ndarray, seq: int) -> int:
        """Mark the rows of these live keys deleted at ``seq`` (keys are ascending within a segment)."""
        rows = np.searchsorted(segment.keys[: segment.count], keys)
        if segment.count == 0 or not np.array_equal(segment.keys[np.minimum(rows, segment.count - 1)], keys):
            raise KeyError(f"keys not in this segment: {sorted(set(keys.tolist()) - set(segment.keys.tolist()))}")
        segment.deleted_at[rows] = seq
        return len(rows)

    def _compacted_growing(self, capacity: int) -> Segment:
        """The live rows of the growing segment in new arrays; readers of the old ones are unaffected."""
        g = self.growing
        live = g.live_rows(NEVER - 1)
        return growing_from(g.vectors[live], g.keys[live], _take(g.metas, live), capacity, self.backend)

    def needs_rebuild(self, settings: ShardSettings) -> bool:
        """Seal once the shard is big enough for an index; rebuild when the growing part or the dead rows pile up."""
        if self.building is not None or self.state.live < settings.seal_min_rows:
            return False
        sealed = self.sealed
        if sealed is None or self.growing.count >= settings.growing_max_rows:
            return True
        return sealed.dead >= max(settings.rebuild_min_dead, settings.rebuild_dead_fraction * sealed.count)

    def start_build(self, builder: ThreadPoolExecutor, seq: int, settings: ShardSettings) -> None:
        self.building = builder.submit(build_from_state, self.state, seq, settings, self.backend)
        self._deleted_while_building = []

    def install(self, built: Segment, seq: int) -> None:
        """Swap in a segment built from the rows live at some earlier sequence.

        Runs on the writer thread, so it uses array operations only: a Python
        loop over every row would hold the GIL long enough to stall queries.
        Item keys only ever grow, so the built segment holds exactly the keys up
        to its last one that were live when the build started.
        """
        keys = built.keys[: built.count]
        if self._deleted_while_building:  # ...are deleted in the built segment too
            gone = np.concatenate(self._deleted_while_building)
            rows = np.searchsorted(keys, gone)
            held = rows < len(keys)
            held[held] = keys[rows[held]] == gone[held]
            built.deleted_at[rows[held]] = seq
            self._deleted_while_building = []
        built = built.with_counts(dead=int((built.deleted_at[: built.count] != NEVER).sum()))
        g = self.growing
        rest = g.live_rows(NEVER - 1)
        if built.count:
            rest = rest[g.keys[rest] > keys[-1]]  # appended after the build started
        growing = growing_from(g.vectors[rest], g.keys[rest], _take(g.metas, rest), 256, self.backend)
        self.sealed, self.growing, self.building = built, growing, None


def _leave_a_core_for_queries() -> None:
    """The builder thread yields to queries: one OpenMP thread fewer than cores, and a lower priority.

    OpenMP's thread count is per calling thread, so searches keep every core;
    a build that took them all would stall the event loop for its duration.
    On Linux a thread has its own nice value (inherited by the OpenMP threads
    it starts), so the scheduler prefers queries to a build.
    """
    faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    if sys.platform == "linux":  # elsewhere PRIO_PROCESS takes a process id, not a thread's
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


@contextlib.contextmanager
def one_openmp_thread():
    """FAISS calls of this thread use one OpenMP thread meanwhile (the setting is per thread).

    A single query gains nothing from more: FAISS splits work by query, so the
    other threads only wake, spin and take a core from the rest of the request
    (exact search of 20,000 x 1280 growing rows: 6.6 ms with 2 threads, 3.6 ms with one).
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _take(items: list, rows: np.ndarray) -> list:
    """``[items[r] for r in rows]`` without a Python-level loop."""
    if len(rows) == 0:
        return []
    if len(rows) == 1:
        return [items[int(rows[0])]]
    return list(operator.itemgetter(*rows.tolist())(items))


#: glibc's mallopt(3) parameter: the size from which malloc maps a block of its own
M_MMAP_THRESHOLD = -3
#: 32 MiB: the ceiling glibc's moving threshold reaches anyway (on 64-bit)
MMAP_THRESHOLD_BYTES = 32 << 20


def fix_malloc_thresholds() -> None:
    """Turn off glibc's moving malloc thresholds, so memory a rebuild frees goes back to the OS.

    After a large free glibc raises its mmap threshold, and its trim threshold
    to twice that (64 MiB), so the builder thread's arena keeps what a build
    freed; malloc_trim left it resident. At 50,000 x 128 resident memory after
    50% churn was 1.58x live data with the moving thresholds and 1.14x with
    this. Setting one threshold fixes both; 32 MiB keeps mid-size blocks on the
    heap (1 MiB cost index builds about 15% more CPU). Process-wide, idempotent.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed_memory() -> None:
    """Hand memory freed by a swap back to the OS (glibc keeps freed heap pages otherwise).

    A rebuild frees a whole segment plus the build's temporaries; without this,
    resident memory after churn stays at its peak even though nothing uses it.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _best_per_record(candidates: list[tuple[float, ItemMeta]], k: int) -> list[Hit]:
    """The k best records, each with its best-scoring item: a record is one hit."""
    candidates.sort(key=lambda c: -c[0])
    hits: dict[tuple[str, str], Hit] = {}
    for score, meta in candidates:
        record = (meta.collection, meta.record_id)
        if record not in hits:
            hits[record] = Hit(meta.record_id, score, meta.collection, meta.category, meta.item, meta.box, meta.attrs)
            if len(hits) == k:
                break
    return list(hits.values())


def _exact_filtered(
    states: list[ShardState], query: np.ndarray, seq: int, accept: Callable[[ItemMeta], bool], k: int
) -> list[tuple[float, ItemMeta]]:
    """Exact scores of the live rows that pass ``accept``: the best ``FILTER_FETCH * k`` of each segment."""
    candidates: list[tuple[float, ItemMeta]] = []
    for state in states:
        for segment in state.segments:
            rows = np.array([r for r in segment.live_rows(seq).tolist() if accept(segment.metas[r])], np.int64)
            if not len(rows):
                continue
            scores = segment.row_vectors(rows) @ query
            best = np.argsort(-scores)[: FILTER_FETCH * k]
            candidates.extend((float(scores[j]), segment.metas[rows[j]]) for j in best.tolist())
    return candidates


def _row_of(state: ShardState, key: int, seq: int) -> tuple[Segment, int] | None:
    """The segment and row of a live item key at ``seq`` (keys ascend within a segment)."""
    for segment in (state.sealed, state.growing):
        if segment is None or segment.count == 0:
            continue
        row = int(np.searchsorted(segment.keys[: segment.count], key))
        if row < segment.count and segment.keys[row] == key and segment.deleted_at[row] > seq:
            return segment, row
    return None


def build_from_state(state: ShardState, seq: int, settings: ShardSettings, backend: Backend) -> Segment:
    """Background job: a sealed segment over every row of ``state`` live at ``seq``."""
    live = [(segment, segment.live_rows(seq)) for segment in state.segments]
    keys = np.concatenate([segment.keys[rows] for segment, rows in live])
    metas = list(itertools.chain.from_iterable(_take(segment.metas, rows) for segment, rows in live))
    rows = RowSource.of_segments(live, state.segments[0].dim)
    return backend.build_sealed(rows, keys, metas, settings, previous=state.sealed)


class ShardSet:
    """All shards of a node: routes upserts and deletes, merges search results, schedules rebuilds."""

    def __init__(self, dim: int, settings: ShardSettings | None = None, backend: Backend | None = None) -> None:
        """``backend``: the node's is ``backends.choose(settings.backend)``; without one, FAISS on the CPU."""
        self.dim = dim
        self.settings = settings or ShardSettings()
        #: builds, holds and searches every segment of every shard (indexer/store/backends.py)
        self.backend = backend or FaissBackend()
        self._shards: dict[ShardKey, Shard] = {}  # writer-only
        #: record -> where its items are; only the writer changes it (readers only get(): record_vectors)
        self._records: dict[tuple[str, str], list[tuple[ShardKey, int]]] = {}
        self._record_counts: dict[str, int] = {}
        #: (collection, id) -> the record's items; replaced whole, so readers may look up without a lock
        self._record_items: dict[tuple[str, str], tuple[ItemMeta, ...]] = {}
        #: the most recently upserted records, newest last (the web page's "recently indexed")
        self._recent: deque[tuple[str, str]] = deque(maxlen=RECENT)
        self._keys = itertools.count()
        self._write_lock = threading.Lock()
        self._builder = ThreadPoolExecutor(1, "lookstream-shard-build", initializer=_leave_a_core_for_queries)
        self.rebuilds = 0
        fix_malloc_thresholds()
        self.view = View(0, {})

    @classmethod
    def restore(
        cls,
        dim: int,
        settings: ShardSettings,
        states: dict[ShardKey, tuple[Segment | None, Segment]],
        seq: int,
        backend: Backend | None = None,
    ) -> ShardSet:
        """Rebuild the writer's bookkeeping around segments loaded from a checkpoint, live on ``backend``.

        The loaded segments' ``keys`` are placeholders; fresh item keys are given here.
        """
        shards = cls(dim, settings, backend)
        backend = shards.backend
        for shard_key, (sealed, growing) in states.items():
            for segment in (sealed, growing):
                if segment is None:
                    continue
                for row in range(segment.count):
                    key = next(shards._keys)
                    segment.keys[row] = key
                    if segment.deleted_at[row] == NEVER:
                        meta = segment.metas[row]
                        record = (meta.collection, meta.record_id)
                        if record not in shards._records:
                            shards._records[record] = []
                            shards._record_counts[meta.collection] = shards._record_counts.get(meta.collection, 0) + 1
                        shards._records[record].append((shard_key, key))
                        shards._record_items[record] = (*shards._record_items.get(record, ()), meta)
            sealed = None if sealed is None else backend.make_live(sealed, settings)
            shards._shards[shard_key] = Shard(dim, sealed, backend.make_live(growing, settings), backend)
        shards._publish(seq)
        return shards

    def apply(self, ops: list[Upsert | Delete]) -> None:
        """Apply a batch in order (later operations on a record win) and publish it at once."""
        with self._write_lock:
            seq = self.view.seq + 1
            self._install_finished(seq)
            appends: dict[ShardKey, tuple[list[int], list[np.ndarray], list[ItemMeta]]] = {}
            stale: dict[ShardKey, list[int]] = {}
            for op in ops:
                record = (op.collection, op.record_id)
                previous = self._records.pop(record, None)
                if previous is not None:
                    self._record_counts[op.collection] -= 1
                    for shard_key, key in previous:
                        stale.setdefault(shard_key, []).append(key)
                if isinstance(op, Delete):
                    self._record_items.pop(record, None)
                    continue
                placed, record_metas = [], []
                for position, item in enumerate(op.items):
                    shard_key, key = (op.collection, item.category), next(self._keys)
                    keys, vectors, metas = appends.setdefault(shard_key, ([], [], []))
                    keys.append(key)
                    vectors.append(item.vector)
                    meta = ItemMeta(
                        op.collection, item.category, op.record_id, position,
                        item.box, item.label, item.score, op.ts, op.attrs,
                    )  # fmt: skip
                    metas.append(meta)
                    record_metas.append(meta)
                    placed.append((shard_key, key))
                self._records[record] = placed
                self._record_items[record] = tuple(record_metas)
                self._recent.append(record)
                self._record_counts[op.collection] = self._record_counts.get(op.collection, 0) + 1
            for shard_key, (keys, vectors, metas) in appends.items():
                if shard_key not in self._shards:
                    self._shards[shard_key] = Shard(self.dim, backend=self.backend)
                self._shards[shard_key].append(keys, np.stack(vectors), metas)
            for shard_key, keys in stale.items():
                self._shards[shard_key].remove(keys, seq)
            self._publish(seq)
            self._schedule_rebuilds(seq)

    def rebuild_all(self) -> int:
        """Schedule a rebuild of every shard that is not being rebuilt (admin); return how many."""
        with self._write_lock:
            scheduled = 0
            for key, shard in self._shards.items():
                if shard.building is None and shard.state.live:
                    log.info("rebuilding shard %s/%s on request", *key)
                    shard.start_build(self._builder, self.view.seq, self.settings)
                    scheduled += 1
            return scheduled

    def maintain(self) -> None:
        """Swap in finished rebuilds and start those now due, even when no events arrive (the consumer calls this).

        Scheduling here too matters after a bulk load: rows that arrived while a
        build ran stay in the growing segment, searched exactly, until another
        build seals them; without events, only this call starts that build.
        """
        with self._write_lock:
            seq = self.view.seq
            if any(s.building is not None and s.building.done() for s in self._shards.values()):
                seq += 1
                self._install_finished(seq)
                self._publish(seq)
            self._schedule_rebuilds(seq)

    def _publish(self, seq: int) -> None:
        self.view = View(seq, {key: shard.state for key, shard in self._shards.items()})

    def _schedule_rebuilds(self, seq: int) -> None:
        for key, shard in self._shards.items():
            if shard.needs_rebuild(self.settings):
                log.info("rebuilding shard %s/%s (%d live rows)", *key, shard.state.live)
                shard.start_build(self._builder, seq, self.settings)

    def _install_finished(self, seq: int) -> None:
        for key, shard in self._shards.items():
            if shard.building is not None and shard.building.done():
                try:
                    built = shard.building.result()
                except Exception:  # a failed build leaves the shard as it was; the next batch retries
                    log.exception("rebuilding shard %s/%s failed", *key)
                    shard.building = None
                    continue
                shard.install(built, seq)
                self.rebuilds += 1
                release_freed_memory()
                log.info("shard %s/%s now %s over %d rows", *key, built.kind, built.count)

    def wait_for_rebuilds(self, timeout: float | None = None) -> None:
        """Block until no rebuild runs: each finished one swapped in, and those it made due (tests, benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            running = [shard.building for shard in list(self._shards.values()) if shard.building is not None]
            if not running:
                return
            for building in running:
                building.exception(None if deadline is None else max(0.0, deadline - time.monotonic()))
            self.maintain()

    def close(self) -> None:
        self._builder.shutdown(wait=True, cancel_futures=True)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        collection: str | tuple[str, ...],
        category: str | None = None,
        accept: Callable[[ItemMeta], bool] | None = None,
    ) -> list[Hit]:
        """Top-k records by their best-matching item across the selected shards.

        ``accept`` filters items by their metadata (brand, price, ...). The
        nearest-neighbour search first fetches ``FILTER_FETCH`` times more
        candidates and filters them; when that leaves fewer than k records (a
        selective filter), the selected shards' live rows that pass the filter
        are searched exactly instead, so that k hits come back whenever k
        matching records exist (the exact pass reads every row's metadata:
        its cost grows with the shard, not with k).
        """
        view = self.view
        collections = (collection,) if isinstance(collection, str) else collection
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        # More than k: one record may hold several matching items, and a filter drops some.
        fetch = k * (FILTER_FETCH if accept is not None else 2)
        selected = [
            state
            for (coll, cat), state in view.shards.items()
            if coll in collections and (category is None or cat == category)
        ]
        candidates: list[tuple[float, ItemMeta]] = []
        with one_openmp_thread():
            for state in selected:
                for segment in state.segments:
                    found = segment.search(query, fetch, view.seq)[0]
                    candidates.extend(found if accept is None else (c for c in found if accept(c[1])))
        hits = _best_per_record(candidates, k)
        if accept is not None and len(hits) < k and any(s.count > fetch for st in selected for s in st.segments):
            # Some rows were never candidates: score every row that passes the filter.
            hits = _best_per_record(_exact_filtered(selected, query[0], view.seq, accept, k), k)
        return hits

    def recent(self, limit: int) -> list[tuple[ItemMeta, ...]]:
        """Up to ``limit`` recently upserted records that are still indexed, newest first."""
        out, seen = [], set()
        for record in reversed(list(self._recent)):
            items = self._record_items.get(record)
            if items and record not in seen:
                seen.add(record)
                out.append(items)
                if len(out) == limit:
                    break
        return out

    def record(self, collection: str, record_id: str) -> tuple[ItemMeta, ...] | None:
        """The items of one record as last applied, or None if it is not indexed."""
        return self._record_items.get((collection, record_id))

    def record_vectors(self, collection: str, record_id: str) -> list[tuple[ItemMeta, np.ndarray]] | None:
        """The stored vector of each item of a record in the current view, or None if it is not indexed.

        Readers may call it: the record's keys are looked up in one published
        view (a record rewritten meanwhile is answered as that view holds it,
        or as not indexed).
        """
        placed = self._records.get((collection, record_id))
        if placed is None:
            return None
        view = self.view
        found = []
        for shard_key, key in placed:
            state = view.shards.get(shard_key)
            hit = None if state is None else _row_of(state, key, view.seq)
            if hit is None:
                return None
            segment, row = hit
            found.append((segment.metas[row], segment.row_vectors(np.array([row]))[0]))
        return found

    def records(self, collection: str) -> int:
        return self._record_counts.get(collection, 0)

    def sizes(self) -> list[dict[str, Any]]:
        return [
            {
                "collection": coll,
                "category": cat,
                "vectors": state.live,
                "sealed": None if state.sealed is None else state.sealed.kind,
                "sealed_rows": 0 if state.sealed is None else state.sealed.live,
                "growing_rows": state.growing.live,
            }
            for (coll, cat), state in sorted(self.view.shards.items())
        ]
