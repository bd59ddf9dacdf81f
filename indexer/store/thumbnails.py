"""Small JPEGs of indexed records on disk, served by ``GET /items/{id}/thumbnail``.

Kept outside the checkpoints: they do not depend on the models, and replaying
events rewrites them. File names are hashes of the id, so any id is safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from indexer.store.records import Delete, Upsert


class ThumbnailStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, collection: str, record_id: str) -> Path:
        digest = hashlib.sha256(record_id.encode()).hexdigest()
        return self.root / collection / digest[:2] / f"{digest}.jpg"

    def put(self, collection: str, record_id: str, jpeg: bytes) -> None:
        path = self._path(collection, record_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(jpeg)
        os.replace(tmp, path)

    def get(self, collection: str, record_id: str) -> bytes | None:
        try:
            return self._path(collection, record_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, collection: str, record_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(collection, record_id).unlink()


def store_thumbnails(store: ThumbnailStore, ops: Iterable[Upsert | Delete]) -> None:
    """Keep the thumbnails of applied upserts, drop those of deletes."""
    for op in ops:
        if isinstance(op, Delete):
            store.delete(op.collection, op.record_id)
        elif op.thumbnail is not None:
            store.put(op.collection, op.record_id, op.thumbnail)
