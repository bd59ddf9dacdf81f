"""A built-in re-ranker: multi-crop re-scoring of the nearest hits, as the seeds' second stage.

The seeds re-rank their first results with a second model (Street2Shop's
MobileViT). lookstream's built-in needs no other weights: a garment box from a
street photo is loose (background, a neighbour's sleeve), so the query crop is
encoded again as a few sub-crops (centre, four corners, and its mirror) and a
candidate's new score is its best cosine over the crop and the sub-crops:
whichever view frames the garment best decides. It costs one encoder batch of
six crops per query item. Off unless ``models.reranker = "multi-crop"``;
options: ``candidates`` (30), ``scale`` (0.75: the sub-crops' share of each side),
``photos`` (["street"]: the query photo kinds it re-ranks).

A catalog thumbnail is framed already: on product photos the sub-crops only
add ways to match a neighbour (measured in docs/models.md: on the offline set
the base encoder with it re-finds fewer JPEG and scale queries, and more
street composites searched as street photos), so by default product photos
keep the index's order.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from plugins import hookimpl
from plugins.models import PHOTOS, Candidate, ModelContext, RerankQuery


def sub_crops(image: Image.Image, scale: float) -> list[Image.Image]:
    w, h = image.size
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    corners = [(0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch), ((w - cw) // 2, (h - ch) // 2)]
    return [image.crop((x, y, x + cw, y + ch)) for x, y in corners] + [ImageOps.mirror(image)]


class MultiCropReranker:
    name = "multi-crop"

    def __init__(self, context: ModelContext) -> None:
        self.candidates = int(context.options.get("candidates", 30))
        self.scale = float(context.options.get("scale", 0.75))
        if not 0 < self.scale <= 1:
            raise ValueError("models.options.multi-crop.scale must be in (0, 1]")
        photos = context.options.get("photos", ["street"])
        if not isinstance(photos, list | tuple) or not all(photo in PHOTOS for photo in photos):
            raise ValueError(f"models.options.multi-crop.photos must be a list of photo kinds of {', '.join(PHOTOS)}")
        #: The photo kinds it re-ranks (the query flow asks before it fetches candidates).
        self.photos = frozenset(photos)

    def rerank(self, query: RerankQuery, candidates: list[Candidate]) -> list[Candidate]:
        if query.photo not in self.photos:
            return candidates
        if not candidates:
            return []
        views = np.asarray(query.encoder.encode(sub_crops(query.image, self.scale)), dtype=np.float32)
        views = np.vstack([query.vector[None, :], views])
        stored = np.stack([c.vector for c in candidates])
        best = (stored @ views.T).max(axis=1)
        rescored = [Candidate(c.id, c.collection, float(s), c.vector) for c, s in zip(candidates, best.tolist())]
        return sorted(rescored, key=lambda c: -c.score)


@hookimpl
def lookstream_register_rerankers(registry):
    registry.add(MultiCropReranker.name, MultiCropReranker)
