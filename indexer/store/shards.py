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
* Background threads build sealed segments over the rows of some segments
  live at some sequence ``S``: the growing rows once there are
  ``ShardSettings.growing_max_rows`` of them (a flush), or several sealed
  segments (a merge; :class:`Shard` says when). The writer swaps a build in
  at a later batch: rows deleted since ``S`` are marked deleted in it, rows
  added since ``S`` stay in the growing segment. Deleted rows are not copied,
  so a build reclaims their memory.

A row's metadata is in columns (columns.py), with no Python object per row. A
record's rows are found by the 64-bit hash of (collection, id) in its
collection's shards: a binary search in a sealed segment (its rows are ordered
by record hash), a vectorised scan of the small growing one. Item keys come
from one counter and only grow, so every growing key is above every sealed
one: a build is installed with array operations, never a Python loop over
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
from dataclasses import dataclass, field, replace
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
    sealed: tuple[Segment, ...]  # indexed segments, each built in the background
    growing: Segment

    @property
    def segments(self) -> tuple[Segment, ...]:
        return (*self.sealed, self.growing)

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


@dataclass
class _Build:
    """A segment being built in the background, and what it replaces once it is installed."""

    future: Future
    #: the sealed segments it merges (matched by their key arrays, which a segment keeps for life)
    merges: tuple[Segment, ...]
    #: the largest growing key it seals (keys only grow), or None: it seals no growing rows
    seals_through: int | None
    #: (record hash, id) of records whose rows were removed since it began
    deleted: list[tuple[np.ndarray, list[str]]] = field(default_factory=list)


def size_tier(rows: int, settings: ShardSettings) -> int:
    """A sealed segment's tier: 0 below ``merge_factor`` x ``growing_max_rows`` rows, one more per factor."""
    tier, bound = 0, settings.growing_max_rows * settings.merge_factor
    while rows >= bound:
        tier, bound = tier + 1, bound * settings.merge_factor
    return tier


class Shard:
    """The writer's side of one shard: its segments, and the builds that will replace some of them.

    Two kinds of build run in the background, at most one of each at a time:

    * a *flush* seals the growing segment's rows into a new sealed segment of
      their own, so its cost is bounded by ``growing_max_rows`` however big the
      shard is;
    * a *merge* builds one segment from several sealed ones: those of one size
      tier once ``merge_factor`` of them exist (as Lucene's tiered merge policy
      and Milvus's compaction do), a segment with too many deleted rows on its
      own, or every sealed segment once the shard has been idle for
      ``merge_when_idle_s``.

    Flushes and tier merges build *interim* segments (IVF, quick to build),
    except where the result is the shard's only segment; that one, and the
    other merges, are the index a shard of that size is meant to have (HNSW up
    to ``hnsw_max_rows``). So a shard left alone is one such index.

    Each row is rebuilt about log(rows / growing_max_rows) times over its
    life, not once per ``growing_max_rows`` new rows, and a bulk load never
    waits on a rebuild of everything indexed before it.
    """

    def __init__(
        self,
        dim: int,
        sealed: tuple[Segment, ...] = (),
        growing: Segment | None = None,
        backend: Backend | None = None,
        spec: FilterSpec | None = None,
        codec: str = "float32",
    ) -> None:
        self.dim = dim
        self.backend = backend or FaissBackend()
        self.spec = spec or FilterSpec()
        self.codec = codec  # how a sealed index stores vectors (``shards.vectors``)
        self.sealed = tuple(sealed)
        self.growing = growing or empty_growing(dim, self.backend, self.spec)
        self.flush: _Build | None = None
        self.merge: _Build | None = None

    @property
    def state(self) -> ShardState:
        return ShardState(self.sealed, self.growing)

    @property
    def builds(self) -> list[_Build]:
        return [b for b in (self.flush, self.merge) if b is not None]

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
        for build in self.builds:
            build.deleted.append((hashes, ids))
        found: set[int] = set()
        sealed = list(self.sealed)
        for j, segment in enumerate(sealed):
            dead = _mark_deleted(segment, hashes, ids, seq, found) if segment.count else 0
            if dead:
                sealed[j] = segment.with_counts(dead=segment.dead + dead)
        self.sealed = tuple(sealed)
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

    def flush_due(self, settings: ShardSettings) -> bool:
        """Seal the growing rows once the shard is big enough for an index, then whenever they reach the bound."""
        if self.flush is not None or not self.growing.live:
            return False
        if self.sealed:
            return self.growing.count >= settings.growing_max_rows
        return self.growing.live >= settings.seal_min_rows

    def merge_due(self, settings: ShardSettings, idle: bool) -> tuple[tuple[Segment, ...], bool]:
        """The sealed segments to merge now (none: nothing due), and whether the result is interim.

        A merge of one size tier is interim (it will be merged again) unless
        it merges every sealed segment; the merge of an idle shard and the
        rebuild of a segment with many deleted rows make the index the shard
        is meant to have (see the class docstring).
        """
        if self.merge is not None or not self.sealed or self.state.live < settings.seal_min_rows:
            return (), False
        for segment in self.sealed:
            if segment.dead >= max(settings.rebuild_min_dead, settings.rebuild_dead_fraction * segment.count):
                return (segment,), False
        tiers: dict[int, list[Segment]] = {}
        for segment in self.sealed:
            tiers.setdefault(size_tier(segment.live, settings), []).append(segment)
        for tier in sorted(tiers):
            if len(tiers[tier]) >= settings.merge_factor:  # interim unless it leaves one segment
                return tuple(tiers[tier]), len(tiers[tier]) < len(self.sealed)
        return (self.sealed if idle and len(self.sealed) > 1 else ()), False

    def start_flush(self, builder: ThreadPoolExecutor, seq: int, settings: ShardSettings) -> None:
        """Seal the growing rows: the shard's first segment as its size calls for, later ones as interim IVF
        segments with the centroids of the shard's largest IVF segment where it has one (then no k-means)."""
        g = self.growing
        ivf = [s for s in self.sealed if s.kind == "ivf"]
        previous = max(ivf, key=lambda s: s.count) if ivf else None
        interim = bool(self.sealed)
        future = builder.submit(
            build_from_segments, (g,), seq, settings, self.backend, self.codec, previous, interim=interim
        )
        self.flush = _Build(future, (), seals_through=int(g.keys[g.count - 1]))

    def start_merge(
        self,
        builder: ThreadPoolExecutor,
        seq: int,
        settings: ShardSettings,
        segments: tuple[Segment, ...],
        interim: bool = False,
    ) -> None:
        # An IVF merge keeps the centroids of its largest input while they still fit (backends.py).
        previous = max(segments, key=lambda s: s.count)
        future = builder.submit(
            build_from_segments, segments, seq, settings, self.backend, self.codec, previous, interim=interim
        )
        self.merge = _Build(future, segments, seals_through=None)

    def install(self, build: _Build, built: Segment, seq: int) -> None:
        """Swap in a segment built from the rows live at some earlier sequence.

        Runs on the writer thread, so it uses array operations only: a Python
        loop over every row would hold the GIL long enough to stall queries.
        Item keys only ever grow, so the growing rows a flush did not see are
        those with keys above the largest it sealed.
        """
        for hashes, ids in build.deleted:  # ...are deleted in the built segment too
            _mark_deleted(built, hashes, ids, seq, set())
        built = built.with_counts(dead=int((built.deleted_at[: built.count] != NEVER).sum()))
        kept = tuple(s for s in self.sealed if not any(s.keys is m.keys for m in build.merges))
        self.sealed = (*kept, built) if built.live else kept
        if build is self.merge:
            self.merge = None
            return
        g = self.growing
        rest = g.live_rows(NEVER - 1)
        rest = rest[g.keys[rest] > build.seals_through]  # appended after the flush started
        capacity = max(256, len(rest))
        growing = growing_from(g.vectors[rest], g.keys[rest], g.columns.take(rest, capacity), capacity, self.backend)
        self.growing, self.flush = growing, None


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
    it starts), so the scheduler prefers queries to a build. Every core for
    the build is slower for both: a 1M x 128 bulk load with queries running
    took 183 s instead of 126 and settled at 378 s instead of 232, p99 during
    it 2.7x settled instead of 2.0x (the build's OpenMP barriers wait on a
    thread the queries preempted).
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


def build_from_segments(
    segments: tuple[Segment, ...],
    seq: int,
    settings: ShardSettings,
    backend: Backend,
    codec: str = "float32",
    previous: Segment | None = None,
    interim: bool = False,
) -> Segment:
    """Background job: a sealed segment over every row of ``segments`` live at ``seq``, its rows ordered by record."""
    live = [(segment, segment.live_rows(seq)) for segment in segments]
    keys = np.concatenate([segment.keys[rows] for segment, rows in live])
    columns = Columns.concat([segment.columns.take(rows) for segment, rows in live], [len(r) for _, r in live])
    order = np.argsort(columns.arrays["record"], kind="stable")
    rows = RowSource.of_segments(live, segments[0].dim).ordered(order)
    built = backend.build_sealed(
        rows, keys[order], columns.take(order), settings, previous=previous, codec=codec, interim=interim
    )
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
        # Flushes have their own thread, so a long merge never holds up the sealing of new rows.
        self._flusher = ThreadPoolExecutor(1, "lookstream-shard-flush", initializer=_leave_a_core_for_queries)
        self._merger = ThreadPoolExecutor(1, "lookstream-shard-merge", initializer=_leave_a_core_for_queries)
        self._last_write = time.monotonic()
        self.rebuilds = 0
        fix_malloc_thresholds()
        self.view = View(0, {}, self.codes)

    @classmethod
    def restore(
        cls,
        dim: int,
        settings: ShardSettings,
        states: dict[ShardKey, tuple[tuple[Segment, ...], Segment]],
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
            for segment in (*sealed, growing):
                if segment.count == 0:
                    continue
                top = max(top, int(segment.keys[: segment.count].max()))
                live = segment.live_rows(NEVER - 1)
                live_hashes.setdefault(shard_key[0], []).append(segment.columns.arrays["record"][live])
            shards._shards[shard_key] = Shard(
                dim,
                tuple(backend.make_live(segment, settings) for segment in sealed),
                backend.make_live(growing, settings),
                backend,
                codes.spec,
                settings.codec(shard_key[0]),
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
            if ops:
                self._last_write = time.monotonic()
            self._publish(seq)
            self._schedule_rebuilds(seq)

    def backlogged(self) -> bool:
        """True while a shard's builds lag behind its writes: the consumer holds back (consumers/indexing.py).

        Either a shard being flushed holds ``growing_hold_factor`` times
        ``growing_max_rows`` unsealed rows (the writer cannot seal rows faster
        than the flusher indexes them), or a shard being merged holds
        ``max_sealed_segments`` sealed segments (nor add segments faster than
        the merger combines them). So the rows searched exactly and the
        segments a query visits stay bounded however fast events arrive.
        """
        s = self.settings
        bound = s.growing_hold_factor * s.growing_max_rows
        for shard in list(self._shards.values()):
            if s.growing_hold_factor and shard.flush is not None and shard.growing.count >= bound:
                return True
            if s.max_sealed_segments and shard.merge is not None and len(shard.sealed) >= s.max_sealed_segments:
                return True
        return False

    def rebuild_all(self) -> int:
        """Rebuild every shard that is not being rebuilt (admin); return how many were scheduled.

        A shard's sealed segments are merged into one; a shard with none yet
        has its growing rows sealed.
        """
        with self._write_lock:
            scheduled = 0
            for key, shard in self._shards.items():
                if shard.builds or not shard.state.live:
                    continue
                log.info("rebuilding shard %s/%s on request", *key)
                if shard.sealed:
                    shard.start_merge(self._merger, self.view.seq, self.settings, shard.sealed)
                else:
                    shard.start_flush(self._flusher, self.view.seq, self.settings)
                scheduled += 1
            return scheduled

    def maintain(self) -> None:
        """Swap in finished builds and start those now due, even when no events arrive (the consumer calls this).

        Scheduling here too matters after a bulk load: rows that arrived while a
        flush ran stay in the growing segment, searched exactly, until another
        flush seals them, and an idle shard's segments are merged into one;
        without events, only this call starts those builds.
        """
        with self._write_lock:
            seq = self.view.seq
            if any(b.future.done() for s in self._shards.values() for b in s.builds):
                seq += 1
                self._install_finished(seq)
                self._publish(seq)
            self._schedule_rebuilds(seq)

    def _publish(self, seq: int) -> None:
        self.view = View(seq, {key: shard.state for key, shard in self._shards.items()}, self.codes)

    def _schedule_rebuilds(self, seq: int) -> None:
        idle_after = self.settings.merge_when_idle_s
        idle = bool(idle_after) and time.monotonic() - self._last_write >= idle_after
        for key, shard in self._shards.items():
            if shard.flush_due(self.settings):
                log.info("sealing %d rows of shard %s/%s", shard.growing.live, *key)
                shard.start_flush(self._flusher, seq, self.settings)
            merging, interim = shard.merge_due(self.settings, idle)
            if merging:
                log.info("merging %d segments of shard %s/%s", len(merging), *key)
                shard.start_merge(self._merger, seq, self.settings, merging, interim)

    def _install_finished(self, seq: int) -> None:
        for key, shard in self._shards.items():
            for build in shard.builds:
                if not build.future.done():
                    continue
                try:
                    built = build.future.result()
                except Exception:  # a failed build leaves the shard as it was; the next batch retries
                    log.exception("building a segment of shard %s/%s failed", *key)
                    shard.flush = None if build is shard.flush else shard.flush
                    shard.merge = None if build is shard.merge else shard.merge
                    continue
                shard.install(build, built, seq)
                self.rebuilds += 1
                release_freed_memory()
                log.info("shard %s/%s: %s over %d rows installed", *key, built.kind, built.count)

    def wait_for_rebuilds(self, timeout: float | None = None) -> None:
        """Block until no rebuild runs: each finished one swapped in, and those it made due (tests, benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            running = [b.future for shard in list(self._shards.values()) for b in shard.builds]
            if not running:
                return
            for future in running:
                future.exception(None if deadline is None else max(0.0, deadline - time.monotonic()))
            self.maintain()

    def close(self) -> None:
        self._flusher.shutdown(wait=True, cancel_futures=True)
        self._merger.shutdown(wait=True, cancel_futures=True)

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
        mask = segment.columns.match(where, segment.count)
        if segment.dead:  # no row deleted: every row is live (10-20 ms less at 10M rows)
            mask &= segment.live_mask(seq)
        matching = int(np.count_nonzero(mask))
        if matching == 0:
            return []
        wanted = min(k, matching)
        if segment.index is None or matching > self.settings.filter_exact_max_rows:
            got = self.backend.knn_selected(segment, query, wanted, mask, matching, self.settings)
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
                # the kind of the largest sealed segment, and how many there are
                "sealed": max(state.sealed, key=lambda s: s.count).kind if state.sealed else None,
                "sealed_segments": len(state.sealed),
                "sealed_rows": sum(s.live for s in state.sealed),
                "growing_rows": state.growing.live,
                "metadata_bytes": sum(s.columns.nbytes(s.count) + 16 * s.count for s in state.segments),
            }
            for (coll, cat), state in sorted(self.view.shards.items())
        ]
