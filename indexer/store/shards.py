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

A row's metadata is in columns (columns.py), with no Python object per row. A
record's rows are found by the 64-bit hash of (collection, id) in its
collection's shards: a binary search in a sealed segment (its rows are ordered
by record hash), a vectorised scan of the small growing one. Item keys come
from one counter and only grow, so every growing key is above every sealed
one: a rebuild is installed with array operations, never a Python loop over
all rows (which would hold the GIL and stall queries).

So an upsert that moves a record to another category, rewrites it in place, or
lands while its shard is being rebuilt, is never missing from, nor doubled in,
any reader's results.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import faiss
import numpy as np

from indexer.config import ShardSettings
from indexer.store.backends import Backend, FaissBackend
from indexer.store.columns import Codes, Columns, Filter, FilterSpec, record_hash
from indexer.store.records import Delete, Upsert
from indexer.store.segments import NEVER, ItemMeta, RowSource, Segment, empty_growing, growing_from

log = logging.getLogger(__name__)

ShardKey = tuple[str, str]  # (collection, category)
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
    #: labels and keyword values by code (append-only: they decode every code of any earlier view)
    codes: Codes


class Shard:
    """The writer's side of one shard: its current segments, and the build that will replace them."""

    def __init__(
        self,
        dim: int,
        sealed: Segment | None = None,
        growing: Segment | None = None,
        backend: Backend | None = None,
        spec: FilterSpec | None = None,
        codec: str = "float32",
    ) -> None:
        self.dim = dim
        self.backend = backend or FaissBackend()
        self.spec = spec or FilterSpec()
        self.codec = codec  # how a sealed index stores vectors (``shards.vectors``)
        self.sealed = sealed
        self.growing = growing or empty_growing(dim, self.backend, self.spec)
        self.building: Future | None = None
        #: (record hash, id) of records whose rows were removed since the running build began
        self._deleted_while_building: list[tuple[np.ndarray, list[str]]] = []

    @property
    def state(self) -> ShardState:
        return ShardState(self.sealed, self.growing)

    def append(self, keys: list[int], vectors: np.ndarray, columns: Columns) -> None:
        """Add rows (``columns`` holds exactly them) past the growing segment's count, then publish the count."""
        g = self.growing
        n = len(keys)
        if g.count + n > len(g.keys):
            g = self._compacted_growing(capacity=max(2 * len(g.keys), g.count + n))
        g.vectors[g.count : g.count + n] = vectors
        self.backend.write(g.mirror, g.count, vectors)
        g.keys[g.count : g.count + n] = keys
        g.columns.write(g.count, columns, n)
        self.growing = g.with_counts(count=g.count + n)

    def remove(self, hashes: np.ndarray, ids: list[str], seq: int) -> set[int]:
        """Mark the live rows of these records (hash and id) deleted at ``seq``; return the hashes found."""
        if self.building is not None:
            self._deleted_while_building.append((hashes, ids))
        found: set[int] = set()
        sealed = self.sealed
        if sealed is not None and sealed.count:
            dead = _mark_deleted(sealed, hashes, ids, seq, found)
            if dead:
                self.sealed = sealed.with_counts(dead=sealed.dead + dead)
        dead = _mark_deleted(self.growing, hashes, ids, seq, found)
        if dead:
            self.growing = self.growing.with_counts(dead=self.growing.dead + dead)
            if self.growing.dead >= max(_COMPACT_AFTER, self.growing.count // 16):
                self.growing = self._compacted_growing(capacity=max(256, 2 * self.growing.live))
        return found

    def _compacted_growing(self, capacity: int) -> Segment:
        """The live rows of the growing segment in new arrays; readers of the old ones are unaffected."""
        g = self.growing
        live = g.live_rows(NEVER - 1)
        capacity = max(capacity, len(live), 256)
        return growing_from(g.vectors[live], g.keys[live], g.columns.take(live, capacity), capacity, self.backend)

    def needs_rebuild(self, settings: ShardSettings) -> bool:
        """Seal once the shard is big enough for an index; rebuild when the growing part or the dead rows pile up."""
        if self.building is not None or self.state.live < settings.seal_min_rows:
            return False
        sealed = self.sealed
        if sealed is None or self.growing.count >= settings.growing_max_rows:
            return True
        return sealed.dead >= max(settings.rebuild_min_dead, settings.rebuild_dead_fraction * sealed.count)

    def start_build(self, builder: ThreadPoolExecutor, seq: int, settings: ShardSettings) -> None:
        self.building = builder.submit(build_from_state, self.state, seq, settings, self.backend, self.codec)
        self._deleted_while_building = []

    def install(self, built: Segment, seq: int) -> None:
        """Swap in a segment built from the rows live at some earlier sequence.

        Runs on the writer thread, so it uses array operations only: a Python
        loop over every row would hold the GIL long enough to stall queries.
        Item keys only ever grow, so the rows appended since the build began
        are the growing rows with keys above the built segment's largest.
        """
        for hashes, ids in self._deleted_while_building:  # ...are deleted in the built segment too
            _mark_deleted(built, hashes, ids, seq, set())
        self._deleted_while_building = []
        built = built.with_counts(dead=int((built.deleted_at[: built.count] != NEVER).sum()))
        g = self.growing
        rest = g.live_rows(NEVER - 1)
        if built.count:
            rest = rest[g.keys[rest] > built.keys[: built.count].max()]  # appended after the build started
        capacity = max(256, len(rest))
        growing = growing_from(g.vectors[rest], g.keys[rest], g.columns.take(rest, capacity), capacity, self.backend)
        self.sealed, self.growing, self.building = built, growing, None


def _mark_deleted(segment: Segment, hashes: np.ndarray, ids: list[str], seq: int, found: set[int]) -> int:
    """Mark the not yet deleted rows of these records deleted at ``seq``; add the hashes found to ``found``.

    A row counts only if its record id is the one asked for: two ids whose
    64-bit hashes collide stay apart (each blob checked is one removed row).
    """
    rows = segment.rows_of(hashes)
    rows = rows[segment.deleted_at[rows] == NEVER]
    if not len(rows):
        return 0
    wanted = dict(zip(hashes.tolist(), ids))
    records = segment.columns.arrays["record"]
    mine = [r for r in rows.tolist() if segment.columns.blob(r)[0] == wanted[int(records[r])]]
    segment.deleted_at[mine] = seq
    found.update(int(records[r]) for r in mine)
    return len(mine)


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


#: a candidate: score, the shard it came from, its segment, and its row there
Candidate = tuple[float, ShardKey, Segment, int]


def build_from_state(
    state: ShardState, seq: int, settings: ShardSettings, backend: Backend, codec: str = "float32"
) -> Segment:
    """Background job: a sealed segment over every row of ``state`` live at ``seq``, its rows ordered by record."""
    live = [(segment, segment.live_rows(seq)) for segment in state.segments]
    keys = np.concatenate([segment.keys[rows] for segment, rows in live])
    columns = Columns.concat([segment.columns.take(rows) for segment, rows in live], [len(r) for _, r in live])
    order = np.argsort(columns.arrays["record"], kind="stable")
    rows = RowSource.of_segments(live, state.segments[0].dim).ordered(order)
    built = backend.build_sealed(rows, keys[order], columns.take(order), settings, previous=state.sealed, codec=codec)
    return replace(built, by_record=True)


class ShardSet:
    """All shards of a node: routes upserts and deletes, merges search results, schedules rebuilds."""

    def __init__(
        self,
        dim: int,
        settings: ShardSettings | None = None,
        backend: Backend | None = None,
        codes: Codes | None = None,
    ) -> None:
        """``backend``: the node's is ``backends.choose(settings.backend)``; without one, FAISS on the CPU."""
        self.dim = dim
        self.settings = settings or ShardSettings()
        #: builds, holds and searches every segment of every shard (indexer/store/backends.py)
        self.backend = backend or FaissBackend()
        #: labels and keyword values by code, and which attributes are indexed for filters
        self.codes = codes or Codes(FilterSpec(self.settings.keyword_attributes, self.settings.numeric_attributes))
        self._shards: dict[ShardKey, Shard] = {}  # writer-only
        self._record_counts: dict[str, int] = {}
        #: the most recently upserted records, newest last (the web page's "recently indexed")
        self._recent: deque[tuple[str, str]] = deque(maxlen=RECENT)
        self._keys = itertools.count()
        self._write_lock = threading.Lock()
        self._builder = ThreadPoolExecutor(1, "lookstream-shard-build", initializer=_leave_a_core_for_queries)
        self.rebuilds = 0
        fix_malloc_thresholds()
        self.view = View(0, {}, self.codes)

    @classmethod
    def restore(
        cls,
        dim: int,
        settings: ShardSettings,
        states: dict[ShardKey, tuple[Segment | None, Segment]],
        seq: int,
        codes: Codes,
        backend: Backend | None = None,
    ) -> ShardSet:
        """The shard set of segments loaded from a checkpoint, live on ``backend``: array operations only.

        Item keys are kept as written; new ones continue above the largest.
        Record counts are the distinct record hashes of live rows (the rows of
        one record are in one collection's shards).
        """
        shards = cls(dim, settings, backend, codes)
        backend = shards.backend
        top = -1
        live_hashes: dict[str, list[np.ndarray]] = {}
        for shard_key, (sealed, growing) in states.items():
            for segment in (sealed, growing):
                if segment is None or segment.count == 0:
                    continue
                top = max(top, int(segment.keys[: segment.count].max()))
                live = segment.live_rows(NEVER - 1)
                live_hashes.setdefault(shard_key[0], []).append(segment.columns.arrays["record"][live])
            sealed = None if sealed is None else backend.make_live(sealed, settings)
            shards._shards[shard_key] = Shard(
                dim, sealed, backend.make_live(growing, settings), backend, codes.spec, settings.codec(shard_key[0])
            )
        shards._keys = itertools.count(top + 1)
        for collection, parts in live_hashes.items():
            shards._record_counts[collection] = len(np.unique(np.concatenate(parts)))
        shards._publish(seq)
        return shards

    def apply(self, ops: list[Upsert | Delete]) -> None:
        """Apply a batch in order (the last operation on a record wins) and publish it at once.

        First every touched record's current rows are marked deleted, found by
        record hash in each shard of its collection; then the upserted items are
        appended. An upsert in which no garment was found has nothing to search
        and leaves no record behind, as a delete does.
        """
        with self._write_lock:
            seq = self.view.seq + 1
            self._install_finished(seq)
            last: dict[tuple[str, str], Upsert | Delete] = {}
            for op in ops:
                last.pop((op.collection, op.record_id), None)
                last[(op.collection, op.record_id)] = op
            hashed = {record: record_hash(*record) for record in last}
            touched: dict[str, tuple[list[int], list[str]]] = {}
            for (collection, record_id), h in hashed.items():
                hashes, ids = touched.setdefault(collection, ([], []))
                hashes.append(h)
                ids.append(record_id)
            existed: dict[str, set[int]] = {}
            for (collection, _), shard in self._shards.items():
                if collection in touched:
                    hashes, ids = touched[collection]
                    found = shard.remove(np.array(hashes, np.uint64), ids, seq)
                    existed.setdefault(collection, set()).update(found)
            rows: dict[ShardKey, list[tuple]] = {}
            vectors: dict[ShardKey, list[np.ndarray]] = {}
            for (collection, record_id), op in last.items():
                was = hashed[(collection, record_id)] in existed.get(collection, ())
                now = isinstance(op, Upsert) and bool(op.items)
                self._record_counts[collection] = self._record_counts.get(collection, 0) + now - was
                if not now:
                    continue
                self._recent.append((collection, record_id))
                for position, item in enumerate(op.items):
                    shard_key = (collection, item.category)
                    rows.setdefault(shard_key, []).append((collection, record_id, op.ts, item, position, op.attrs))
                    vectors.setdefault(shard_key, []).append(item.vector)
            for shard_key, new in rows.items():
                if shard_key not in self._shards:
                    self._shards[shard_key] = Shard(
                        self.dim, backend=self.backend, spec=self.codes.spec, codec=self.settings.codec(shard_key[0])
                    )
                keys = [next(self._keys) for _ in new]
                self._shards[shard_key].append(keys, np.stack(vectors[shard_key]), Columns.of_items(self.codes, new))
            self._publish(seq)
            self._schedule_rebuilds(seq)

    def backlogged(self) -> bool:
        """True while a shard being rebuilt holds ``growing_hold_factor`` times ``growing_max_rows`` unsealed rows.

        The writer cannot seal rows faster than the builder indexes them; the
        consumer holds back while this is true (consumers/indexing.py), so the
        rows searched exactly stay bounded however fast events arrive.
        """
        factor = self.settings.growing_hold_factor
        if not factor:
            return False
        bound = factor * self.settings.growing_max_rows
        return any(s.building is not None and s.growing.count >= bound for s in list(self._shards.values()))

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
        self.view = View(seq, {key: shard.state for key, shard in self._shards.items()}, self.codes)

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
        where: Filter | None = None,
    ) -> list[Hit]:
        """Top-k records by their best-matching item across the selected shards.

        ``where`` keeps only the rows whose indexed attributes match (brand,
        price, ...), inside the search: each segment's matching live rows are
        found from its filter columns, then searched exactly when they are few
        (``shards.filter_exact_max_rows``, as Qdrant plans a filtered query) and
        through the index with a selector of them otherwise. So k hits come
        back whenever k matching records exist, however selective the filter.
        """
        view = self.view
        if where is not None:
            where = where.current(view.codes)  # compiled before the view was taken: its new codes too
        collections = (collection,) if isinstance(collection, str) else collection
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        fetch = 2 * k  # more than k: one record may hold several matching items
        candidates: list[Candidate] = []
        with one_openmp_thread():
            for shard_key, state in view.shards.items():
                if shard_key[0] not in collections or (category is not None and shard_key[1] != category):
                    continue
                for segment in state.segments:
                    if where is None:
                        found = segment.search(query, fetch, view.seq)[0]
                    else:
                        found = self._search_filtered(segment, query, fetch, view.seq, where)
                    candidates.extend((score, shard_key, segment, row) for score, row in found)
        return self._best_per_record(candidates, k)

    def _search_filtered(
        self, segment: Segment, query: np.ndarray, k: int, seq: int, where: Filter
    ) -> list[tuple[float, int]]:
        mask = segment.live_mask(seq) & segment.columns.match(where, segment.count)
        matching = int(mask.sum())
        if matching == 0:
            return []
        wanted = min(k, matching)
        if segment.index is None or matching > self.settings.filter_exact_max_rows:
            got = self.backend.knn_selected(segment, query, wanted, mask, self.settings)
            if got is not None:
                found = [(s, r) for s, r in zip(got[0][0].tolist(), got[1][0].tolist()) if r >= 0]
                if len(found) >= wanted:
                    return found
                # the graph ran out of matching neighbours: fall through to the exact pass
        return segment.search_rows(query[0], np.flatnonzero(mask), wanted)

    def _best_per_record(self, candidates: list[Candidate], k: int) -> list[Hit]:
        """The k best records, each with its best-scoring item: a record is one hit."""
        candidates.sort(key=lambda c: -c[0])
        hits: dict[tuple[str, int], Hit] = {}
        for score, (collection, category), segment, row in candidates:
            record = (collection, int(segment.columns.arrays["record"][row]))
            if record not in hits:
                meta = self._meta(collection, category, segment, row)
                hits[record] = Hit(meta.record_id, score, collection, category, meta.item, meta.box, meta.attrs)
                if len(hits) == k:
                    break
        return list(hits.values())

    def _meta(self, collection: str, category: str, segment: Segment, row: int) -> ItemMeta:
        """One row's metadata as an object: for the hits and records a reader returns, never per candidate."""
        a = segment.columns.arrays
        record_id, attrs = segment.columns.blob(row)
        label = int(a["label"][row])
        return ItemMeta(
            collection, category, record_id, int(a["item"][row]), tuple(a["box"][row].tolist()),
            None if label < 0 else self.codes.labels.words[label], float(a["score"][row]), int(a["ts"][row]), attrs,
        )  # fmt: skip

    def _record_rows(self, collection: str, record_id: str, view: View) -> list[tuple[ItemMeta, Segment, int]]:
        """The live rows of one record in ``view``, by item position."""
        h = np.array([record_hash(collection, record_id)], np.uint64)
        found = []
        for (coll, category), state in view.shards.items():
            if coll != collection:
                continue
            for segment in state.segments:
                for row in segment.rows_of(h).tolist():
                    if segment.deleted_at[row] > view.seq and segment.columns.blob(row)[0] == record_id:
                        found.append((self._meta(coll, category, segment, row), segment, row))
        return sorted(found, key=lambda f: f[0].item)

    def recent(self, limit: int) -> list[tuple[ItemMeta, ...]]:
        """Up to ``limit`` recently upserted records that are still indexed, newest first."""
        out, seen = [], set()
        for record in reversed(list(self._recent)):
            if record in seen:
                continue
            seen.add(record)
            items = self.record(*record)
            if items:
                out.append(items)
                if len(out) == limit:
                    break
        return out

    def record(self, collection: str, record_id: str) -> tuple[ItemMeta, ...] | None:
        """The items of one record as last applied, or None if it is not indexed."""
        rows = self._record_rows(collection, record_id, self.view)
        return tuple(meta for meta, _, _ in rows) or None

    def record_vectors(self, collection: str, record_id: str) -> list[tuple[ItemMeta, np.ndarray]] | None:
        """The stored vector of each item of a record in the current view, or None if it is not indexed."""
        rows = self._record_rows(collection, record_id, self.view)
        return [(meta, segment.row_vectors(np.array([row]))[0]) for meta, segment, row in rows] or None

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
                "metadata_bytes": sum(s.columns.nbytes(s.count) + 16 * s.count for s in state.segments),
            }
            for (coll, cat), state in sorted(self.view.shards.items())
        ]
