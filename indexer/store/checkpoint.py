"""Durable checkpoints: the shards and the Kafka offsets they include, written atomically.

A checkpoint is a directory ``checkpoints/ckpt-<seq>/`` holding, per shard, each
sealed segment's FAISS index (``faiss.write_index``) with its deleted-row mask, the
growing segment's live vectors (``.npy``), each segment's item keys and
metadata columns (columns.py) as one ``.npz`` of arrays, the vocabularies of
labels and keyword values (msgpack), and ``manifest.json`` (offsets, counters,
model generation, files). Nothing is pickled, and nothing is read or written
a row at a time: a restart of ten million rows reads arrays.
Everything is written into a temporary directory, fsynced, the manifest last,
and the directory renamed into place: a checkpoint is complete exactly when its
final name exists. Offsets are committed to Kafka only after that.

A checkpoint is taken from one :class:`~indexer.store.shards.View` and the offsets
applied at that moment; since published rows are only ever appended past the
view's count or marked deleted with a later sequence, the files can be written
in a background thread while the consumer goes on.

The files hold CPU arrays and FAISS indexes whatever the search backend (a
GPU backend keeps a CPU copy of every row), so a checkpoint written on one
backend loads on any other: it is read as FAISS reads it, and
``ShardSet.restore`` makes its segments live on the node's backend.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import mmap
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import faiss
import msgpack
import numpy as np

from indexer.config import ShardSettings
from indexer.store.backends import Backend, FaissBackend
from indexer.store.columns import Codes, Columns, FilterSpec
from indexer.store.records import Item
from indexer.store.segments import NEVER, Segment, growing_from
from indexer.store.shards import ShardSet, View

log = logging.getLogger(__name__)

#: 3: several sealed segments a shard; 2 (one sealed segment) is still read, and 1 (a msgpack list
#: per row) is read and converted to columns
FORMAT = 3
MANIFEST = "manifest.json"
CODES = "codes.msgpack"
KEEP = 2


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    seq: int
    offsets: dict[str, int]  # "topic/partition" -> next offset to read
    counters: dict[str, Any]
    generation: dict[str, Any]


class _Files:
    """Writes a checkpoint's files, fsynced, and remembers each one's size and CRC-32C for the manifest."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sums: dict[str, list[int]] = {}

    def write(self, name: str, data: bytes) -> None:
        _write(self.directory / name, data)
        self.sums[name] = [len(data), crc32c.crc32c(data)]

    def write_index(self, name: str, index: Any) -> None:
        """A FAISS index written by FAISS itself (serialising it in memory first would double its size)."""
        path = self.directory / name
        faiss.write_index(index, str(path))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                self.sums[name] = [len(data), crc32c.crc32c(data)]


def _read(directory: Path, name: str, sums: dict[str, list[int]] | None) -> bytes:
    """A checkpoint file's bytes, checked against the manifest (checkpoints before checksums are not)."""
    data = (directory / name).read_bytes()
    _check(name, data, sums)
    return data


def _check(name: str, data: Any, sums: dict[str, list[int]] | None) -> None:
    if sums is not None:
        expected = sums.get(name)
        if expected is None or expected != [len(data), crc32c.crc32c(data)]:
            raise CorruptCheckpoint(f"{name} does not match its size and checksum in the manifest")


def _read_index(directory: Path, name: str, sums: dict[str, list[int]] | None) -> Any:
    """A FAISS index file, checked through a memory map and read by FAISS itself: no copy of it in Python."""
    path = directory / name
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _check(name, data, sums)
    return faiss.read_index(str(path))


class CorruptCheckpoint(ValueError):
    """A checkpoint file is not what was written."""


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    root: Path,
    view: View,
    offsets: dict[str, int],
    counters: dict[str, Any],
    generation: dict[str, Any],
) -> Checkpoint:
    """Write the view's shards and these offsets; return the checkpoint once it is durable."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{view.seq:012d}-{time.time_ns()}"
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    files = _Files(tmp)
    shards = []
    for n, ((collection, category), state) in enumerate(sorted(view.shards.items())):
        entry: dict[str, Any] = {"collection": collection, "category": category, "id": n}
        entry["sealed"] = [sealed.kind for sealed in state.sealed]
        for j, sealed in enumerate(state.sealed):
            stem = f"{n}.sealed.{j}"
            dead = sealed.deleted_at[: sealed.count] <= view.seq
            if sealed.index is not None:
                files.write_index(f"{stem}.faiss", sealed.index)
            else:
                files.write(f"{stem}.npy", _npy(sealed.vectors[: sealed.count]))
            files.write(f"{stem}.dead.npy", _npy(dead))
            files.write(f"{stem}.npz", _npz(sealed.keys[: sealed.count], sealed.columns.to_arrays(None, sealed.count)))
        growing = state.growing
        live = growing.live_rows(view.seq)
        files.write(f"{n}.growing.npy", _npy(growing.vectors[live]))
        files.write(f"{n}.growing.npz", _npz(growing.keys[live], growing.columns.to_arrays(live, growing.count)))
        shards.append(entry)
    files.write(CODES, msgpack.packb(view.codes.to_dict()))
    manifest = {
        "format": FORMAT,
        "seq": view.seq,
        "offsets": offsets,
        "counters": counters,
        "generation": generation,
        "shards": shards,
        "files": files.sums,
        "written_at_ms": int(time.time() * 1000),
    }
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)  # the files' names are durable before the directory gets its final one
    final = root / name
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep=KEEP)
    return Checkpoint(final, view.seq, offsets, counters, generation)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _npz(keys: np.ndarray, columns: dict[str, np.ndarray]) -> bytes:
    """A segment's item keys and metadata columns, one uncompressed ``.npz``."""
    buffer = io.BytesIO()
    np.savez(buffer, keys=keys, **columns)
    return buffer.getvalue()


def _npz_load(data: bytes) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        columns = {name: arrays[name] for name in arrays.files}
    return columns.pop("keys"), columns


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("ckpt-") and (p / MANIFEST).exists())


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        if tmp.stat().st_mtime < time.time() - 3600:  # left by a crash mid-write
            shutil.rmtree(tmp, ignore_errors=True)


def load_latest(
    root: Path,
    generation: dict[str, Any],
    settings: ShardSettings,
    backend: Backend | None = None,
    skipped: list[str] | None = None,
) -> tuple[Checkpoint, ShardSet] | None:
    """The newest readable checkpoint of this model generation, with its shards restored onto ``backend``.

    A checkpoint that cannot be read (a damaged file, a disk error) is logged,
    appended to ``skipped`` as "name: why", and the previous one is tried: the
    events after it are replayed from Kafka, so falling back loses nothing.
    """
    for path in reversed(_complete(root)):
        try:
            return _load(path, generation, settings, backend)
        except _NotThisGeneration as e:
            log.warning("skipping checkpoint %s: %s", path.name, e)
        except Exception as e:
            log.error("checkpoint %s cannot be read (%s); falling back to the one before", path.name, e)
            if skipped is not None:
                skipped.append(f"{path.name}: {type(e).__name__}: {e}")
    return None


class _NotThisGeneration(Exception):
    """A complete checkpoint, of another format or model generation: not an error."""


def _load(
    path: Path, generation: dict[str, Any], settings: ShardSettings, backend: Backend | None
) -> tuple[Checkpoint, ShardSet]:
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") not in (1, 2, FORMAT):
        raise _NotThisGeneration(f"format {manifest.get('format')}")
    if manifest["generation"] != generation:
        raise _NotThisGeneration(f"another model generation {manifest['generation']}")
    sums = manifest.get("files")

    def read(name: str) -> bytes:
        return _read(path, name, sums)

    spec = FilterSpec(settings.keyword_attributes, settings.numeric_attributes)
    if manifest["format"] == 1:
        codes = Codes(spec)
        states = _states_of_format_1(manifest, read, path, sums, codes)
    else:
        saved = msgpack.unpackb(read(CODES))
        codes = Codes(spec, saved["labels"], saved["keywords"])
        lists_coded = manifest["format"] >= 3  # format 2 coded a list-valued keyword attribute as MISSING
        if not lists_coded and spec.keyword:
            log.warning("checkpoint %s is from before list values were coded: re-coding such rows (once)", path.name)
        states = _states(manifest, read, path, sums, codes, lists_coded)
    dim = generation["dim"]
    shards = ShardSet.restore(dim, settings, states, manifest["seq"], codes, backend)
    checkpoint = Checkpoint(path, manifest["seq"], manifest["offsets"], manifest["counters"], generation)
    log.info("restored checkpoint %s: %d records", path.name, sum(shards.records(c) for c in ("products", "posts")))
    return checkpoint, shards


def _states(
    manifest: dict[str, Any],
    read: Callable[[str], bytes],
    path: Path,
    sums: Any,
    codes: Codes,
    lists_coded: bool = True,
) -> dict[tuple[str, str], tuple[tuple[Segment, ...], Segment]]:
    stored = FaissBackend()  # reads the segments as written; ShardSet.restore makes them live on ``backend``
    states = {}
    for entry in manifest["shards"]:
        n = entry["id"]
        sealed = []
        for kind, name in _sealed_parts(manifest["format"], entry):
            dead = _npy_load(read(f"{name}.dead.npy"))
            keys, arrays = _npz_load(read(f"{name}.npz"))
            rows = _sealed_rows(kind, name, read, path, sums)
            columns = Columns.from_arrays(arrays, codes, lists_coded)
            columns.index_ranges(len(keys))
            segment = Segment(
                kind, keys, np.where(dead, 0, NEVER).astype(np.int64), columns,
                len(keys), int(dead.sum()), backend=stored, by_record=True, **rows,
            )  # fmt: skip
            sealed.append(segment)
        vectors = _npy_load(read(f"{n}.growing.npy"))
        keys, arrays = _npz_load(read(f"{n}.growing.npz"))
        growing = growing_from(vectors, keys, Columns.from_arrays(arrays, codes, lists_coded), 256, stored)
        states[(entry["collection"], entry["category"])] = (tuple(sealed), growing)
    return states


def _sealed_parts(format: int, entry: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, file name stem) of each sealed segment of a shard's manifest entry."""
    n = entry["id"]
    if format >= 3:
        return [(kind, f"{n}.sealed.{j}") for j, kind in enumerate(entry["sealed"])]
    return [(entry["sealed"], f"{n}.sealed")] if "sealed" in entry else []  # format 2: one at most


def _sealed_rows(kind: str, name: str, read: Callable[[str], bytes], path: Path, sums: Any) -> dict[str, Any]:
    if kind == "flat":
        return {"vectors": _npy_load(read(f"{name}.npy"))}
    return {"index": _read_index(path, f"{name}.faiss", sums)}


def _states_of_format_1(
    manifest: dict[str, Any], read: Callable[[str], bytes], path: Path, sums: Any, codes: Codes
) -> dict[tuple[str, str], tuple[tuple[Segment, ...], Segment]]:
    """Segments of a format-1 checkpoint (a msgpack list per row), converted to columns once, row by row.

    Reading it beats replaying from Kafka, whose retention may no longer hold
    the oldest events. Its sealed rows are in key order, not record order, so
    their records are found by a scan until the shard is next rebuilt.
    """
    log.warning("converting checkpoint %s from format 1 (row lists) to columns", path.name)
    stored = FaissBackend()
    keys = itertools.count()

    def columns_of(name: str) -> tuple[np.ndarray, Columns]:
        rows = []
        for collection, category, record_id, item, box, label, score, ts, attrs in msgpack.unpackb(read(name)):
            rows.append((collection, record_id, ts, Item(category, np.empty(0), tuple(box), label, score), item, attrs))
        return np.array([next(keys) for _ in rows], np.int64), Columns.of_items(codes, rows)

    states = {}
    for entry in manifest["shards"]:
        n = entry["id"]
        sealed: tuple[Segment, ...] = ()
        if "sealed" in entry:
            dead = _npy_load(read(f"{n}.sealed.dead.npy"))
            sealed_keys, columns = columns_of(f"{n}.sealed.meta")
            columns.index_ranges(len(sealed_keys))
            rows = _sealed_rows(entry["sealed"], f"{n}.sealed", read, path, sums)
            segment = Segment(
                entry["sealed"], sealed_keys, np.where(dead, 0, NEVER).astype(np.int64), columns,
                len(sealed_keys), int(dead.sum()), backend=stored, **rows,
            )  # fmt: skip
            sealed = (segment,)
        growing_keys, columns = columns_of(f"{n}.growing.meta")
        growing = growing_from(_npy_load(read(f"{n}.growing.npy")), growing_keys, columns, 256, stored)
        states[(entry["collection"], entry["category"])] = (sealed, growing)
    return states


class Checkpointer:
    """Takes checkpoints on a schedule in a background thread; the consumer commits what they include.

    Only the consumer thread calls it, between batches, so the view, the
    offsets and the counters it is given describe one moment.
    """

    def __init__(self, root: Path, generation: dict[str, Any], interval_s: float) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.root = root
        self.generation = generation
        self.interval_s = interval_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lookstream-checkpoint")
        self._in_flight = None
        self._last_started = time.monotonic()
        self._last_seq: int | None = None
        self.last: Checkpoint | None = None

    def due(self, view: View) -> bool:
        return (
            self._in_flight is None
            and view.seq != self._last_seq
            and time.monotonic() - self._last_started >= self.interval_s
        )

    def start(self, view: View, offsets: dict[str, int], counters: dict[str, Any]) -> None:
        self._last_started, self._last_seq = time.monotonic(), view.seq
        self._in_flight = self._executor.submit(
            write_checkpoint, self.root, view, dict(offsets), dict(counters), self.generation
        )

    def finished(self) -> Checkpoint | None:
        """The checkpoint that just became durable, once; raises if writing it failed."""
        if self._in_flight is None or not self._in_flight.done():
            return None
        future, self._in_flight = self._in_flight, None
        self.last = future.result()
        return self.last

    def write_now(self, view: View, offsets: dict[str, int], counters: dict[str, Any]) -> Checkpoint:
        """Wait for any checkpoint in flight, then write one of this moment (revocation, shutdown)."""
        if self._in_flight is not None:
            self._in_flight.exception()
            self._in_flight = None
        self._last_started, self._last_seq = time.monotonic(), view.seq
        self.last = write_checkpoint(self.root, view, dict(offsets), dict(counters), self.generation)
        return self.last

    def close(self) -> None:
        self._executor.shutdown(wait=True)
