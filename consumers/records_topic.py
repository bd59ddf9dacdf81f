"""The records topic: what an encoder publishes and a serve replica applies, one message per operation.

An encoder turns each event into the store's operation (an ``Upsert`` with its
items' vectors, or a ``Delete``) and publishes it here instead of applying it;
replicas decode and apply it. Other systems may consume the topic too, so the
format is fixed and versioned (docs/deploy.md, "Records topic format"):

* one topic per model generation, ``<cluster.records_topic_prefix>.<generation id>``;
* key ``<collection>/<id>`` (UTF-8), so every change of a record lands in one
  partition, in order;
* value: a msgpack map, ``v`` = 1, ``op`` ("upsert" or "delete"),
  ``collection``, ``id``, ``ts`` (the event's, ms since epoch), ``generation``,
  ``source`` (``[topic, partition, offset]`` of the event), and for upserts
  ``attrs``, ``thumbnail`` (JPEG bytes or nil), ``dim``, ``dtype``
  ("float32" or "float16", little-endian) and ``items``: maps of
  ``category``, ``label``, ``score``, ``box`` ([x0, y0, x1, y1]) and
  ``vector`` (``dim`` numbers of ``dtype`` as bytes, L2-normalised).

Unknown fields are ignored (forward compatibility); an unknown ``v`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from indexer.store.records import Delete, Item, Upsert

RECORD_VERSION = 1
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class InvalidRecord(ValueError):
    """A message on a records topic that this version cannot apply; the message says why."""


@dataclass(frozen=True)
class Source:
    """Where the event a record was made from sits in the event topics."""

    topic: str
    partition: int
    offset: int

    @property
    def name(self) -> str:
        return f"{self.topic}/{self.partition}"


def topic_name(prefix: str, generation: str) -> str:
    return f"{prefix}.{generation}"


def record_key(collection: str, record_id: str) -> bytes:
    return f"{collection}/{record_id}".encode()


def encode_record(op: Upsert | Delete, source: Source, generation: str, dtype: str = "float32") -> bytes:
    """The message value for one operation (the key is :func:`record_key`)."""
    body: dict[str, Any] = {
        "v": RECORD_VERSION,
        "op": "delete" if isinstance(op, Delete) else "upsert",
        "collection": op.collection,
        "id": op.record_id,
        "ts": op.ts,
        "generation": generation,
        "source": [source.topic, source.partition, source.offset],
    }
    if isinstance(op, Upsert):
        wanted = DTYPES[dtype]
        body["attrs"] = op.attrs
        body["thumbnail"] = op.thumbnail
        body["dim"] = int(op.items[0].vector.shape[0]) if op.items else 0
        body["dtype"] = dtype
        body["items"] = [
            {
                "category": item.category,
                "label": item.label,
                "score": float(item.score),
                "box": [int(v) for v in item.box],
                "vector": np.ascontiguousarray(item.vector, dtype=wanted).tobytes(),
            }
            for item in op.items
        ]
    return msgpack.packb(body, use_bin_type=True)


def decode_record(payload: bytes | None) -> tuple[Upsert | Delete, Source]:
    """The operation a records-topic message carries, and its source; raises InvalidRecord."""
    if not payload:
        raise InvalidRecord("empty message")
    try:
        body = msgpack.unpackb(payload, raw=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise InvalidRecord(f"not msgpack: {e or type(e).__name__}") from e
    if not isinstance(body, dict):
        raise InvalidRecord(f"a record must be a msgpack map, got {type(body).__name__}")
    if body.get("v") != RECORD_VERSION:
        raise InvalidRecord(f"unknown record version v={body.get('v')!r}; this node reads v={RECORD_VERSION}")
    try:
        topic, partition, offset = body["source"]
        source = Source(str(topic), int(partition), int(offset))
        collection, record_id, ts = str(body["collection"]), str(body["id"]), int(body["ts"])
        if body["op"] == "delete":
            return Delete(collection, record_id, ts), source
        if body["op"] != "upsert":
            raise InvalidRecord(f"unknown op {body['op']!r}")
        dtype = DTYPES.get(body["dtype"])
        if dtype is None:
            raise InvalidRecord(f"unknown vector dtype {body['dtype']!r}")
        dim = int(body["dim"])
        items = []
        for item in body["items"]:
            vector = np.frombuffer(item["vector"], dtype=dtype).astype(np.float32)
            if vector.shape != (dim,):
                raise InvalidRecord(f"a vector of {vector.size} numbers in a record of dim {dim}")
            x0, y0, x1, y1 = (int(v) for v in item["box"])
            items.append(Item(str(item["category"]), vector, (x0, y0, x1, y1), item["label"], float(item["score"])))
        attrs = body.get("attrs") or {}
        if not isinstance(attrs, dict):
            raise InvalidRecord("attrs must be a map")
        return Upsert(collection, record_id, ts, attrs, tuple(items), body.get("thumbnail")), source
    except InvalidRecord:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidRecord(f"malformed record: {type(e).__name__}: {e}") from e
