"""Events in, index operations out: read -> decode -> detect -> crop -> encode -> classify.

Each collection is detected with its own detector (``models.detectors``):
catalog thumbnails as whole images, street photos by a garment detector.

The pipeline holds no index state; it turns a batch of validated events into
:class:`Upsert`, :class:`Delete` or :class:`Rejected` outcomes, one per event and
in the same order, so the consumer can dead-letter exactly the events that
failed and apply the rest.

Failures are kept to the event that caused them (docs/reliability.md):

* reading, decoding and the thumbnail are per event: whatever one raises
  rejects that event alone, with a reason kind (:class:`~indexer.failures.Reason`);
* the models run on chunks; a chunk the models fail on ``model_attempts``
  times is split in halves until the event that fails is found, and only that
  one is rejected (``model-failed``);
* a failure that is not the event's fault (:func:`~indexer.failures.is_transient`:
  out of memory, a full disk, :class:`~plugins.models.RetryableError`) is raised
  to the consumer, which retries the batch with backoff and rejects nothing.

Memory is bounded per chunk, not per poll: a chunk holds at most
``batch_size`` images and ``images.max_batch_pixels`` decoded pixels, and every
image is scaled down while decoding to ``images.decode_max_side``. While the
models run on one group of ``batch_size`` events, a worker thread reads,
decodes and thumbnails the next (Pillow and the model runtimes release the
GIL), so at most two groups are decoded at once.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from indexer.config import ImageSettings
from indexer.events import Event
from indexer.failures import Reason, Rejection, describe, is_transient
from indexer.images import Decoded, decode
from indexer.sources import ImageSources
from indexer.store.records import Delete, Item, Upsert
from plugins.manager import Models
from plugins.models import Detection, Detector, RetryableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejected:
    kind: Reason
    detail: str

    @classmethod
    def of(cls, rejection: Rejection) -> Rejected:
        return cls(rejection.kind, rejection.detail)


Outcome = Upsert | Delete | Rejected


class EventObserver(Protocol):
    """What sees the pipeline's events besides the index (the pair miner)."""

    def observe(self, event: Event, decoded: Decoded, upsert: Upsert) -> None:
        """An upsert was analysed: its decoded image and what the models found."""

    def deleted(self, event: Event) -> None:
        """A delete passed through."""


class ModelOutputError(RuntimeError):
    """A model answered with something the pipeline cannot use (wrong length, shape, NaN)."""


class ModelsFailing(RetryableError):
    """The models failed on every event of a chunk, one by one: not the events' fault, retried later."""


@dataclass
class _Chunk:
    """Events of one group ready for the models (decoded, with their thumbnail), and those already refused."""

    ready: list[tuple[int, Decoded, bytes]] = field(default_factory=list)
    rejected: dict[int, Rejected] = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        models: Models,
        images: ImageSettings,
        *,
        batch_size: int,
        model_attempts: int = 1,
        sources: ImageSources | None = None,
    ) -> None:
        self.models = models
        self.images = images
        self.batch_size = batch_size
        self.model_attempts = model_attempts
        self.sources = sources or ImageSources(images)
        #: Told of each event analysed and each delete, e.g. to mine training pairs (indexer/training/pairs.py).
        #: A failure there is logged and never fails the event.
        self.observer: EventObserver | None = None
        #: Prepares the next group of a batch (read, decode, thumbnail) while the models run on this one.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="lookstream-prepare")

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self.sources.close()

    def process(self, events: Sequence[Event]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(events)
        upserts: list[int] = []
        for i, event in enumerate(events):
            if event.is_delete:
                outcomes[i] = Delete(event.collection, event.id, event.ts)
                self._observe(event)
            else:
                upserts.append(i)
        groups = [upserts[start : start + self.batch_size] for start in range(0, len(upserts), self.batch_size)]
        pending: Future | None = None
        try:
            for n, group in enumerate(groups):
                prepared = pending.result() if pending is not None else self._prepare(events, group)
                # The next group is read, decoded and thumbnailed in the worker while the models run on this one.
                pending = self._worker.submit(self._prepare, events, groups[n + 1]) if n + 1 < len(groups) else None
                for chunk in prepared:
                    for i, outcome in chunk.rejected.items():
                        outcomes[i] = outcome
                    if chunk.ready:
                        self._finish(events, chunk, outcomes)
        finally:
            if pending is not None:
                wait([pending])  # a transient failure above: let the worker finish before the batch is retried
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def _prepare(self, events: Sequence[Event], group: list[int]) -> list[_Chunk]:
        """Read, decode and thumbnail a group of events, cut into chunks within ``images.max_batch_pixels``."""
        chunks = [_Chunk()]
        pixels = 0
        for i, data in zip(group, self._read([events[i] for i in group]), strict=True):
            chunk = chunks[-1]
            try:
                if isinstance(data, Rejection):
                    raise data
                decoded = decode(data, self.images.max_pixels, self.images.decode_max_side)
            except Exception as e:
                chunk.rejected[i] = _rejected(e, Reason.IMAGE_UNDECODABLE)
                continue
            try:
                thumbnail = make_thumbnail(decoded.image)
            except Exception as e:
                chunk.rejected[i] = _rejected(e, Reason.THUMBNAIL_FAILED)
                continue
            size = decoded.image.width * decoded.image.height
            if chunk.ready and pixels + size > self.images.max_batch_pixels:
                chunk, pixels = _Chunk(), 0
                chunks.append(chunk)
            chunk.ready.append((i, decoded, thumbnail))
            pixels += size
        return chunks

    def _read(self, events: list[Event]) -> list[bytes | Rejection]:
        """Each event's image bytes: inline, or read from its ``image_uri`` (concurrently)."""
        uris = [i for i, event in enumerate(events) if event.image is None]
        fetched = dict(zip(uris, self.sources.read_many([events[i].image_uri or "" for i in uris]), strict=True))
        return [fetched.get(i, event.image) for i, event in enumerate(events)]  # type: ignore[misc]

    def _finish(self, events: Sequence[Event], chunk: _Chunk, outcomes: list) -> None:
        """Analyse one chunk of decoded images, each collection with its own detector; fill in their outcomes."""
        by_collection: dict[str, list[tuple[int, Decoded, bytes]]] = {}
        for ready in chunk.ready:
            by_collection.setdefault(events[ready[0]].collection, []).append(ready)
        for collection, members in by_collection.items():
            detector = self.models.detector_for(collection)
            decoded = [d for _, d, _ in members]
            results = self._analyse_isolating(decoded, [events[i].attrs for i, _, _ in members], detector)
            for (i, image, thumbnail), result in zip(members, results, strict=True):
                event = events[i]
                if isinstance(result, Rejection):
                    outcomes[i] = Rejected.of(result)
                else:
                    outcomes[i] = Upsert(event.collection, event.id, event.ts, event.attrs, tuple(result), thumbnail)
                    self._observe(event, image, outcomes[i])

    def _observe(self, event: Event, image: Decoded | None = None, upsert: Upsert | None = None) -> None:
        if self.observer is None:
            return
        try:
            if upsert is None:
                self.observer.deleted(event)
            else:
                self.observer.observe(event, image, upsert)
        except Exception as e:
            if is_transient(e):
                raise
            log.warning("the pipeline's observer failed on %s %s: %s", event.collection, event.id, describe(e))

    def _analyse_isolating(
        self, images: list[Decoded], attrs: list[dict[str, Any]], detector: Detector
    ) -> list[list[Item] | Rejection]:
        """Analyse; if the models keep failing, split the chunk to reject only the events that fail."""
        results = self._bisect(images, attrs, detector)
        if len(results) > 1 and all(isinstance(r, Rejection) for r in results):
            # Every event failed on its own: the models are broken, not the events. Retry the
            # batch later rather than dead-letter a whole stream.
            first = results[0]
            raise ModelsFailing(f"the models failed on each of {len(images)} images: {first}")
        return results

    def _bisect(
        self, images: list[Decoded], attrs: list[dict[str, Any]], detector: Detector
    ) -> list[list[Item] | Rejection]:
        error: Exception | None = None
        for attempt in range(1, self.model_attempts + 1):
            try:
                return self.analyse(images, attrs, detector=detector)  # type: ignore[return-value]
            except Exception as e:
                if is_transient(e):
                    raise
                error = e
                log.warning("models failed on %d images (attempt %d): %s", len(images), attempt, describe(e))
        if len(images) == 1:
            return [Rejection(Reason.MODEL_FAILED, describe(error))]  # type: ignore[arg-type]
        middle = len(images) // 2
        return self._bisect(images[:middle], attrs[:middle], detector) + self._bisect(
            images[middle:], attrs[middle:], detector
        )

    def analyse(
        self,
        images: Sequence[Decoded | Image.Image],
        attrs: list[dict[str, Any]],
        timings: dict[str, float] | None = None,
        detector: Detector | None = None,
    ) -> list[list[Item]]:
        """Detect, crop, encode and classify; return the items of each image.

        Boxes are given in the original image's pixels where an image is a
        :class:`~indexer.images.Decoded`. ``timings``, if given, receives the
        milliseconds spent in "detect" and "encode" (encode + classify).
        ``detector`` defaults to the products' (``models.detector``).
        """
        detector = detector or self.models.detector
        if not images:
            return []
        decoded = [d if isinstance(d, Decoded) else Decoded(d, d.size) for d in images]
        pictures = [d.image for d in decoded]
        started = time.perf_counter()
        detections = detector.detect(pictures)
        if len(detections) != len(pictures):
            raise ModelOutputError(f"the detector answered for {len(detections)} of {len(pictures)} images")
        detected = time.perf_counter()
        owners: list[int] = []
        crops: list[Image.Image] = []
        flat: list[Detection] = []
        for owner, (image, found) in enumerate(zip(pictures, detections, strict=True)):
            for detection in found:
                owners.append(owner)
                flat.append(detection)
                crops.append(crop(image, detection.box))
        vectors = self.encode(crops)
        categories = self.models.classifier.classify(crops, flat, [attrs[o] for o in owners])
        if len(categories) != len(crops) or not all(isinstance(c, str) and c for c in categories):
            raise ModelOutputError(f"the classifier did not answer a category name for each of {len(crops)} crops")
        items: list[list[Item]] = [[] for _ in pictures]
        for owner, detection, vector, category in zip(owners, flat, vectors, categories, strict=True):
            box = decoded[owner].to_original(detection.box)
            items[owner].append(Item(category, vector, box, detection.label, float(detection.score)))
        if timings is not None:
            timings["detect"] = round((detected - started) * 1000, 2)
            timings["encode"] = round((time.perf_counter() - detected) * 1000, 2)
        return items

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        dim = self.models.encoder.dim
        chunks = []
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start : start + self.batch_size]
            vectors = np.asarray(self.models.encoder.encode(batch), dtype=np.float32)
            if vectors.shape != (len(batch), dim):
                raise ModelOutputError(
                    f"the encoder answered {vectors.shape} for {len(batch)} crops of dimension {dim}"
                )
            if not np.isfinite(vectors).all():
                raise ModelOutputError("the encoder answered a vector that is not finite")
            chunks.append(vectors)
        if not chunks:
            return np.empty((0, dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def _rejected(error: Exception, kind: Reason) -> Rejected:
    """The outcome for an event whose step raised ``error``; machine trouble is raised instead."""
    if isinstance(error, Rejection):
        return Rejected.of(error)
    if is_transient(error):
        raise error
    return Rejected(kind, describe(error))


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
