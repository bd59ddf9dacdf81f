"""The v1 event envelope: a msgpack map, validated into a frozen dataclass.

Producers set ``v``, ``type``, ``id``, ``ts`` and either ``image`` (bytes) or
``image_uri``; ``attrs`` carries catalog fields (category, title, brand, ...).
Unknown top-level fields are kept in ``extra`` rather than refused, so newer
producers can talk to older indexers (forward compatibility). Anything else
wrong raises :class:`InvalidEvent`, whose message becomes the dead-letter reason.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

ENVELOPE_VERSION = 1
MAX_ID_LENGTH = 256
MAX_ATTRS = 64
MAX_ATTRS_DEPTH = 6
MAX_ATTRS_BYTES = 16 * 1024

#: event type -> (collection, is_delete)
EVENT_TYPES: dict[str, tuple[str, bool]] = {
    "product.upsert": ("products", False),
    "product.delete": ("products", True),
    "post.upsert": ("posts", False),
    "post.delete": ("posts", True),
}
COLLECTIONS = ("products", "posts")
_KNOWN_FIELDS = {"v", "type", "id", "ts", "image", "image_uri", "attrs"}


class InvalidEvent(ValueError):
    """The event cannot be indexed; the message says why, for the dead-letter header."""


@dataclass(frozen=True)
class Event:
    type: str
    id: str
    ts: int
    image: bytes | None = None
    image_uri: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def collection(self) -> str:
        return EVENT_TYPES[self.type][0]

    @property
    def is_delete(self) -> bool:
        return EVENT_TYPES[self.type][1]


def now_ms() -> int:
    return int(time.time() * 1000)


def encode_event(event: Event) -> bytes:
    """Serialise an event as the v1 msgpack envelope (the producers' side)."""
    body: dict[str, Any] = {"v": ENVELOPE_VERSION, "type": event.type, "id": event.id, "ts": event.ts}
    if event.image is not None:
        body["image"] = event.image
    if event.image_uri is not None:
        body["image_uri"] = event.image_uri
    body["attrs"] = event.attrs
    body.update(event.extra)
    return msgpack.packb(body, use_bin_type=True)


def decode_event(payload: bytes | None) -> Event:
    """Parse and validate one Kafka message value; raise InvalidEvent with the reason."""
    if not payload:
        raise InvalidEvent("empty message")
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as e:
        raise InvalidEvent(f"not msgpack: {e or type(e).__name__}") from e
    if not isinstance(body, dict):
        raise InvalidEvent(f"envelope must be a msgpack map, got {type(body).__name__}")

    version = body.get("v")
    if version != ENVELOPE_VERSION:
        raise InvalidEvent(f"unknown envelope version v={version!r}; this indexer reads v={ENVELOPE_VERSION}")
    event_type = _required(body, "type", str)
    if event_type not in EVENT_TYPES:
        raise InvalidEvent(f"unknown type {event_type!r}; expected one of {sorted(EVENT_TYPES)}")
    record_id = _required(body, "id", str)
    if not record_id or len(record_id) > MAX_ID_LENGTH or not record_id.isprintable():
        raise InvalidEvent(f"id must be 1-{MAX_ID_LENGTH} printable characters")
    ts = _required(body, "ts", int)
    if isinstance(ts, bool) or ts < 0:
        raise InvalidEvent("ts must be a non-negative integer (ms since epoch)")

    attrs = body.get("attrs", {})
    if not isinstance(attrs, dict):
        raise InvalidEvent("attrs must be a map with string keys")
    _check_attrs(attrs)

    image = body.get("image")
    image_uri = body.get("image_uri")
    if image is not None and not isinstance(image, bytes):
        raise InvalidEvent(f"image must be bytes, got {type(image).__name__}")
    if image_uri is not None and not isinstance(image_uri, str):
        raise InvalidEvent(f"image_uri must be a string, got {type(image_uri).__name__}")
    is_delete = EVENT_TYPES[event_type][1]
    if not is_delete and image is None and image_uri is None:
        raise InvalidEvent(f"{event_type} needs 'image' or 'image_uri'")

    extra = {k: v for k, v in body.items() if k not in _KNOWN_FIELDS}
    return Event(event_type, record_id, ts, image, image_uri, attrs, extra)


def _check_attrs(attrs: dict) -> None:
    """Attrs come back in JSON answers: only JSON values, bounded in size and depth."""
    if len(attrs) > MAX_ATTRS:
        raise InvalidEvent(f"attrs has {len(attrs)} keys; at most {MAX_ATTRS} are allowed")

    def check(value: Any, path: str, depth: int) -> None:
        if depth > MAX_ATTRS_DEPTH:
            raise InvalidEvent(f"attrs are nested deeper than {MAX_ATTRS_DEPTH} levels at {path}")
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise InvalidEvent(f"attrs keys must be strings, got {type(key).__name__} at {path}")
                check(item, f"{path}.{key}", depth + 1)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                check(item, f"{path}[{index}]", depth + 1)
        elif isinstance(value, float) and not math.isfinite(value):
            raise InvalidEvent(f"attrs value at {path} is not a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            raise InvalidEvent(f"attrs value at {path} is too large for JSON clients")
        elif value is not None and not isinstance(value, str | int | float | bool):
            raise InvalidEvent(f"attrs value at {path} must be a JSON value, got {type(value).__name__}")

    check(attrs, "attrs", 0)
    size = len(json.dumps(attrs, ensure_ascii=False).encode())
    if size > MAX_ATTRS_BYTES:
        raise InvalidEvent(f"attrs take {size} bytes as JSON; at most {MAX_ATTRS_BYTES} are allowed")


def _required(body: dict, name: str, kind: type) -> Any:
    if name not in body:
        raise InvalidEvent(f"missing field {name!r}")
    value = body[name]
    if not isinstance(value, kind):
        raise InvalidEvent(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value
