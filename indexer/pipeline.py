"""Events in, index operations out: load -> detect -> crop -> encode -> classify.

The pipeline holds no index state; it turns a batch of validated events into
:class:`Upsert`, :class:`Delete` or :class:`Rejected` outcomes, one per event and
in the same order, so the consumer can dead-letter exactly the events that
failed and apply the rest. Crops of all events in a batch go through the encoder
together, in chunks of ``batch_size``.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from indexer.events import Event
from indexer.images import InvalidImage, UriPolicy, decode_image, read_image_uri
from plugins.manager import Models
from plugins.models import Detection


@dataclass(frozen=True)
class Item:
    """One garment of one record, ready for a shard."""

    category: str
    vector: np.ndarray
    box: tuple[int, int, int, int]
    label: str | None
    score: float


@dataclass(frozen=True)
class Upsert:
    collection: str
    record_id: str
    ts: int
    attrs: dict[str, Any]
    items: tuple[Item, ...]
    thumbnail: bytes | None = None  # a small JPEG of the image, for result pages


@dataclass(frozen=True)
class Delete:
    collection: str
    record_id: str
    ts: int


@dataclass(frozen=True)
class Rejected:
    reason: str


Outcome = Upsert | Delete | Rejected


class Pipeline:
    def __init__(self, models: Models, *, batch_size: int, max_pixels: int, uris: UriPolicy | None = None) -> None:
        self.models = models
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.uris = uris or UriPolicy()

    def process(self, events: list[Event]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(events)
        images: dict[int, Image.Image] = {}
        for i, event in enumerate(events):
            if event.is_delete:
                outcomes[i] = Delete(event.collection, event.id, event.ts)
                continue
            try:
                images[i] = self.load_image(event)
            except InvalidImage as e:
                outcomes[i] = Rejected(str(e))

        order = list(images)
        per_event = self.analyse([images[i] for i in order], [events[i].attrs for i in order])
        for i, items in zip(order, per_event, strict=True):
            event = events[i]
            outcomes[i] = Upsert(
                event.collection, event.id, event.ts, event.attrs, tuple(items), make_thumbnail(images[i])
            )
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def load_image(self, event: Event) -> Image.Image:
        data = event.image if event.image is not None else read_image_uri(event.image_uri or "", self.uris)
        return decode_image(data, self.max_pixels)

    def analyse(
        self, images: list[Image.Image], attrs: list[dict[str, Any]], timings: dict[str, float] | None = None
    ) -> list[list[Item]]:
        """Detect, crop, encode and classify; return the items of each image.

        ``timings``, if given, receives the milliseconds spent in "detect" and "encode" (encode + classify).
        """
        if not images:
            return []
        started = time.perf_counter()
        detections = self.models.detector.detect(images)
        detected = time.perf_counter()
        owners: list[int] = []
        crops: list[Image.Image] = []
        flat: list[Detection] = []
        for owner, (image, found) in enumerate(zip(images, detections, strict=True)):
            for detection in found:
                owners.append(owner)
                flat.append(detection)
                crops.append(crop(image, detection.box))
        vectors = self.encode(crops)
        categories = self.models.classifier.classify(crops, flat, [attrs[o] for o in owners])
        items: list[list[Item]] = [[] for _ in images]
        for owner, detection, vector, category in zip(owners, flat, vectors, categories, strict=True):
            items[owner].append(Item(category, vector, detection.box, detection.label, detection.score))
        if timings is not None:
            timings["detect"] = round((detected - started) * 1000, 2)
            timings["encode"] = round((time.perf_counter() - detected) * 1000, 2)
        return items

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        chunks = [
            self.models.encoder.encode(crops[start : start + self.batch_size])
            for start in range(0, len(crops), self.batch_size)
        ]
        if not chunks:
            return np.empty((0, self.models.encoder.dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


THUMBNAIL_SIZE = (160, 160)


def make_thumbnail(image: Image.Image) -> bytes:
    """A JPEG at most 160 px on a side (a few KB), kept at index time for result pages."""
    small = image.copy()
    small.thumbnail(THUMBNAIL_SIZE)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """Crop to a box clipped to the image; a box covering the whole image is a no-op."""
    x0, y0, x1, y1 = box
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, x1), min(image.height, y1)
    if (x0, y0, x1, y1) == (0, 0, image.width, image.height):
        return image
    if x1 <= x0 or y1 <= y0:
        return image
    return image.crop((x0, y0, x1, y1))
