"""What a detector, an encoder and a classifier are, as the pipeline sees them.

Plugins return objects that satisfy these protocols. Every method takes a batch,
so a model can run one forward pass for many crops; images are 8-bit RGB PIL
images (the pipeline converted them already).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

# Re-exported for plugins: raise it from a model when a failure is not the input's fault.
from indexer.failures import RetryableError as RetryableError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

#: The fashion categories of the seed detector (ModaNet + Fashionpedia, 7 classes).
CATEGORIES = ("bag", "bottom", "dress", "hat", "outer", "shoes", "top")
#: Shard name for items no classifier could place.
UNCATEGORIZED = "uncategorized"


@dataclass(frozen=True)
class Detection:
    """One garment found in an image: pixel box (x0, y0, x1, y1), label and score."""

    box: tuple[int, int, int, int]
    label: str | None
    score: float


@dataclass(frozen=True)
class ModelContext:
    """What a model factory may use: where and how to run, CPU threads, a cache folder, and its own options.

    ``options`` is the ``[models.options.<name>]`` table of the config for the
    model being built (for example ``name_or_path`` or a label table).
    """

    device: str  # "cpu" or "cuda"
    cpu_threads: int | None = None  # applied by plugins.manager.load_models
    options: Mapping[str, Any] = field(default_factory=dict)
    #: "onnxruntime" or "torch": how a model that can run both ways should run (``models.runtime``,
    #: resolved by plugins.manager.resolve_runtime). Models with one way of running ignore it.
    runtime: str = "torch"
    #: Where a model may cache files it derives from its weights (exported graphs); None: keep them in memory.
    cache_dir: Path | None = None


class ModelNotAvailable(RuntimeError):
    """The model's files are not on this machine; the message says how to provide them."""


@runtime_checkable
class Detector(Protocol):
    name: str

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        """Return the detections of each image; an empty list means nothing found."""


@runtime_checkable
class Encoder(Protocol):
    name: str
    #: Changes whenever the vectors change (weights, preprocessing): a new model generation.
    version: str
    dim: int

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        """Return a float32 array (len(crops), dim) of L2-normalised vectors."""

    # Optional: ``weigh_query(vectors, photo) -> np.ndarray``, the vectors of a query photo of one
    # kind (one of PHOTOS) as they should search the stored vectors: an encoder whose vectors join
    # parts (the fine-tuned encoder: the base's features beside a trained head) may weigh the parts
    # per kind. The query flow (indexer/search.py) calls it where defined and normalises the result.


#: What a query photo can be: a catalog thumbnail ("product") or a photo like a post ("street").
PHOTOS = ("product", "street")


@dataclass(frozen=True)
class RerankQuery:
    """What a re-ranker may look at: the query crop, its vector, the encoder that made it, and the photo's kind."""

    image: Image.Image
    vector: np.ndarray
    encoder: Encoder  # encodes more views of the query as its vector was made (weighed for ``photo``)
    photo: str = "product"  # one of PHOTOS


@dataclass(frozen=True)
class Candidate:
    """One hit to re-score: its record id and collection, its score from the index, and its stored vector."""

    id: str
    collection: str
    score: float
    vector: np.ndarray


@runtime_checkable
class Reranker(Protocol):
    name: str
    #: How many of the nearest hits it re-scores (the answer keeps the best ``k`` of them).
    candidates: int
    # Optional: ``photos``, the query photo kinds (of PHOTOS) it re-ranks; every kind where absent.

    def rerank(self, query: RerankQuery, candidates: list[Candidate]) -> list[Candidate]:
        """Return the candidates re-scored (a new ``score`` each), best first."""


@runtime_checkable
class Classifier(Protocol):
    name: str

    def classify(self, crops: list[Image.Image], detections: list[Detection], attrs: list[dict[str, Any]]) -> list[str]:
        """Return the category (shard name) of each crop."""
