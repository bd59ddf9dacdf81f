"""The query flow: an image or a vector in, hits out.

```
image bytes -> decode, scaled down (indexer/images.py)
            -> Pipeline.analyse: detect, crop, encode, classify (exactly as indexed images)
            -> vectors weighed for the photo's kind, product or street (QueryEncoder)
            -> ShardSet.search per detected item, and for the whole image
            -> QueryResult with the milliseconds of each stage
vector      -> checked against the encoder's dimension, normalised -> ShardSet.search
record id   -> its stored vector (ShardSet.record_vectors) -> ShardSet.search, itself left out
```

The caller passes one generation's pipeline and shards, taken once, so that a
query is answered by the models its shards were built with even while a new
generation takes over. Where the work runs (an executor, the event loop) is
the HTTP layer's business (indexer/web/search.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from indexer.config import ImageSettings
from indexer.images import Decoded, decode
from indexer.pipeline import Pipeline
from indexer.pipeline import crop as pipeline_crop
from indexer.store.columns import compile_filter, keyword_values
from indexer.store.shards import Hit, ShardSet
from plugins.models import PHOTOS, Candidate, Encoder, Reranker, RerankQuery


@dataclass(frozen=True)
class Where:
    """Which records a search may return: collections, a category, and conditions on indexed attributes.

    ``keyword`` holds, per keyword attribute, the values one of which must
    match; ``ranges`` per numeric attribute an inclusive [low, high]. Both are
    applied inside the search (ShardSet.search), so k hits come back whenever
    k records match.
    """

    collections: tuple[str, ...]
    category: str | None = None
    keyword: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


def facets(attrs: Iterable[dict[str, Any]], attributes: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Per keyword attribute, how many of these hits' attrs have each value (as filters match it), most first.

    A hit whose attribute is a list counts once for each distinct value in it
    (``keyword_values``), so a value's count is how many hits a filter for it keeps.
    """
    attrs = list(attrs)
    out = {}
    for name in attributes:
        counts = Counter(v for a in attrs for v in keyword_values(a.get(name)))
        out[name] = dict(counts.most_common())
    return out


@dataclass(frozen=True)
class QueryItem:
    box: tuple[int, int, int, int]
    label: str | None
    category: str
    score: float
    hits: list[Hit]


@dataclass(frozen=True)
class QueryResult:
    items: list[QueryItem]
    hits: list[Hit]
    timings_ms: dict[str, float]
    size: tuple[int, int]  # width, height of the query image


@dataclass
class Stopwatch:
    """Milliseconds per stage; a stage timed twice adds up."""

    ms: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - start) * 1000)

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = round(self.ms.get(name, 0.0) + ms, 2)

    def total(self) -> dict[str, float]:
        return {**self.ms, "total": round((time.perf_counter() - self.started) * 1000, 2)}


#: What kind of photo a query is -> the collection whose detector finds its items.
PHOTO_KINDS = dict(zip(PHOTOS, ("products", "posts"), strict=True))


@dataclass(frozen=True)
class QueryEncoder:
    """The encoder as a query photo of one kind uses it: vectors weighed for the kind and normalised.

    An encoder that joins parts may weigh them per kind (``weigh_query``,
    plugins/models.py); others search with their vectors as stored. A
    re-ranker encodes its extra views through this, so they are weighed alike.
    """

    encoder: Encoder
    photo: str

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def version(self) -> str:
        return self.encoder.version

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def weigh(self, vectors: np.ndarray) -> np.ndarray:
        weigh = getattr(self.encoder, "weigh_query", None)
        if weigh is None:
            return vectors
        weighed = np.asarray(weigh(vectors, self.photo), dtype=np.float32)
        return weighed / np.linalg.norm(weighed, axis=-1, keepdims=True)

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        return self.weigh(np.asarray(self.encoder.encode(crops), dtype=np.float32))


@dataclass(frozen=True)
class AnalysedQuery:
    """A query image through the models: its items (with their vectors) and the whole image's vector."""

    items: list  # the pipeline's analysed items: box, label, category, score, vector
    whole: np.ndarray
    size: tuple[int, int]  # width, height of the query image
    clock: Stopwatch
    decoded: Decoded  # what a re-ranker crops the items from


def analyse_image(pipeline: Pipeline, images: ImageSettings, data: bytes, photo: str = "product") -> AnalysedQuery:
    """Decode, detect, encode and classify a query image exactly as indexed images are; search nothing yet.

    The vectors are then weighed for ``photo`` (:class:`QueryEncoder`); for
    most encoders they stay as encoded. The router (indexer/web/router.py) does this once per query and sends the
    vectors to the replicas; a node goes on with :func:`search_image`.
    """
    clock = Stopwatch()
    with clock.stage("decode"):
        decoded = decode(data, images.max_pixels, images.decode_max_side)
    stages: dict[str, float] = {}
    detector = pipeline.models.detector_for(PHOTO_KINDS[photo])
    items = pipeline.analyse([decoded], [{}], stages, detector=detector)[0]
    for name, ms in stages.items():
        clock.add(name, ms)
    width, height = decoded.original_size
    whole = next((item.vector for item in items if item.box == (0, 0, width, height)), None)
    if whole is None:  # the detector found garments, not the whole image: one more encoder pass
        with clock.stage("encode"):
            whole = pipeline.encode([decoded.image])[0]
    weigh = QueryEncoder(pipeline.models.encoder, photo).weigh
    if items:
        vectors = weigh(np.stack([item.vector for item in items]))
        items = [dataclasses.replace(item, vector=vector) for item, vector in zip(items, vectors, strict=True)]
    return AnalysedQuery(items, weigh(whole), decoded.original_size, clock, decoded)


def search_image(
    pipeline: Pipeline,
    shards: ShardSet,
    images: ImageSettings,
    data: bytes,
    k: int,
    where: Where,
    photo: str = "product",
) -> QueryResult:
    """Hits per detected item, and for the whole image; raises InvalidImage for bytes that are not one.

    ``photo`` says what the query image is, so that it is detected as its kind
    is indexed: "product" (a catalog thumbnail) or "street" (a photo like a post).
    """
    query = analyse_image(pipeline, images, data, photo)
    clock = query.clock
    reranker = _reranker(pipeline, photo)
    wanted = max(k, reranker.candidates) if reranker is not None else k
    with clock.stage("search"):
        found = [_search(shards, item.vector, wanted, where) for item in query.items]
        hits = _search(shards, query.whole, k, where)
    if reranker is not None:
        encoder = QueryEncoder(pipeline.models.encoder, photo)
        with clock.stage("rerank"):
            found = [
                rerank(reranker, encoder, shards, crop(query.decoded, item.box), item.vector, hits_, k)
                for item, hits_ in zip(query.items, found, strict=True)
            ]
    results = [
        QueryItem(item.box, item.label, item.category, item.score, hits_)
        for item, hits_ in zip(query.items, found, strict=True)
    ]
    return QueryResult(results, hits, clock.total(), query.size)


def _reranker(pipeline: Pipeline, photo: str) -> Reranker | None:
    """The re-ranker, where there is one and it re-ranks this kind of photo (its optional ``photos``)."""
    reranker = pipeline.models.reranker
    return reranker if reranker is not None and photo in getattr(reranker, "photos", PHOTOS) else None


def crop(decoded: Decoded, box: tuple[int, int, int, int]) -> Image.Image:
    """An item's crop from the decoded image, its box given in the original image's pixels."""
    image = decoded.image
    sx, sy = image.width / decoded.original_size[0], image.height / decoded.original_size[1]
    x0, y0, x1, y1 = box
    return pipeline_crop(image, (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)))


def rerank(
    reranker: Reranker,
    encoder: QueryEncoder,
    shards: ShardSet,
    image: Image.Image,
    vector: np.ndarray,
    hits: list[Hit],
    k: int,
) -> list[Hit]:
    """The re-ranker's order of ``hits`` (each with its stored item vector), the best ``k`` kept."""
    stored = {}
    for hit in hits:
        for meta, row in shards.record_vectors(hit.collection, hit.id) or []:
            if meta.item == hit.item:
                stored[(hit.collection, hit.id)] = row
    by_key = {(h.collection, h.id): h for h in hits if (h.collection, h.id) in stored}
    candidates = [Candidate(h.id, h.collection, h.score, stored[key]) for key, h in by_key.items()]
    ranked = reranker.rerank(RerankQuery(image, vector, encoder, encoder.photo), candidates)
    return [
        dataclasses.replace(by_key[(c.collection, c.id)], score=c.score)
        for c in ranked
        if (c.collection, c.id) in by_key
    ][:k]


def search_vector(shards: ShardSet, vector: np.ndarray, k: int, where: Where) -> list[Hit]:
    """Hits for an embedding of the shards' encoder; raises ValueError for one of another size, or zero."""
    if vector.shape != (shards.dim,):
        raise ValueError(f"vector must have {shards.dim} numbers (the active encoder's dimension), not {vector.size}")
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("vector must be finite and not all zeros")
    return _search(shards, (vector / norm).astype(np.float32), k, where)


class NotIndexed(LookupError):
    """The record (or the item of it) asked for is not in the shards."""


def similar(shards: ShardSet, collection: str, record_id: str, item: int | None, k: int, where: Where) -> list[Hit]:
    """More like this: the nearest records to a stored item of a record (its best-scoring one by default).

    No image is sent or encoded: the vector is the one indexed. The record
    itself is never among the hits (a record is one hit, so k + 1 suffice).
    """
    items = shards.record_vectors(collection, record_id)
    if not items:
        raise NotIndexed(f"no {collection} record with id {record_id!r}")
    if item is None:
        _, vector = max(items, key=lambda found: found[0].score)
    else:
        chosen = [vector for meta, vector in items if meta.item == item]
        if not chosen:
            raise NotIndexed(f"{collection} record {record_id!r} has no item {item} (it has {len(items)})")
        vector = chosen[0]
    hits = _search(shards, vector, k + 1, where)
    return [h for h in hits if (h.collection, h.id) != (collection, record_id)][:k]


def _search(shards: ShardSet, vector: np.ndarray, k: int, where: Where) -> list[Hit]:
    selected = compile_filter(shards.codes, where.keyword, where.ranges) if where.keyword or where.ranges else None
    return shards.search(vector, k, where.collections, where.category, selected)
