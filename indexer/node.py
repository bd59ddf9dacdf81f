"""A lookstream node: the models, the shards and the consumer that feeds them.

``Node`` is built once from the settings and shared by the HTTP app (which
searches) and the consumer thread (which indexes). Queries and indexing both
call the same :class:`~indexer.pipeline.Pipeline`, so a query image is
processed exactly as an indexed one.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from indexer import gpu
from indexer.checkpoint import Checkpointer, load_latest
from indexer.config import Settings
from indexer.images import decode_image
from indexer.pipeline import Pipeline
from indexer.segments import IndexPolicy
from indexer.shards import Hit, ShardSet
from indexer.stats import IngestStats
from plugins.manager import Models, build_plugin_manager, load_models, resolve_device
from plugins.models import ModelContext

log = logging.getLogger(__name__)


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


@dataclass
class Node:
    settings: Settings
    models: Models
    pipeline: Pipeline
    shards: ShardSet
    stats: IngestStats = field(default_factory=IngestStats)
    checkpointer: Checkpointer | None = None
    #: "topic/partition" -> next offset, for what the restored checkpoint holds
    restored_offsets: dict[str, int] = field(default_factory=dict)
    #: Model inference and FAISS search run here, off the event loop.
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(2, "lookstream-query"))

    @classmethod
    def create(cls, settings: Settings, models: Models, *, durable: bool = False) -> Node:
        """A node over empty shards; with ``durable``, restored from the newest checkpoint in the data dir."""
        pipeline = Pipeline(
            models,
            batch_size=settings.models.batch_size,
            max_pixels=settings.images.max_pixels,
            file_roots=settings.images.file_roots,
        )
        s = settings.shards
        policy = IndexPolicy(
            seal_min_rows=s.seal_min_rows, growing_max_rows=s.growing_max_rows, hnsw_max_rows=s.hnsw_max_rows
        )
        backend = s.backend
        if backend == "auto":
            backend = gpu.NAME if gpu.available() else "cpu"
        node = cls(settings, models, pipeline, ShardSet(models.encoder.dim, policy, backend))
        if durable:
            root = settings.data_dir / "checkpoints"
            node.checkpointer = Checkpointer(root, node.generation(), s.checkpoint_interval_s)
            restored = load_latest(root, node.generation(), policy, backend)
            if restored is not None:
                checkpoint, node.shards = restored
                node.stats.restore(checkpoint.counters)
                node.restored_offsets = checkpoint.offsets
        return node

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.shards.close()
        if self.checkpointer is not None:
            self.checkpointer.close()

    def generation(self) -> dict[str, Any]:
        """What the vectors in the shards depend on; a checkpoint of another generation is not loaded."""
        encoder = self.models.encoder
        return {
            "encoder": encoder.name,
            "version": encoder.version,
            "dim": encoder.dim,
            "detector": self.models.detector.name,
            "classifier": self.models.classifier.name,
        }

    def query(self, data: bytes, k: int, collection: str, category: str | None) -> QueryResult:
        """Search with an image: hits per detected item, and for the whole image."""
        start = time.perf_counter()
        image = decode_image(data, self.settings.images.max_pixels)
        decoded = time.perf_counter()
        items = self.pipeline.analyse([image], [{}])[0]
        whole = next((item for item in items if item.box == (0, 0, image.width, image.height)), None)
        whole_vector = whole.vector if whole is not None else self.pipeline.encode([image])[0]
        analysed = time.perf_counter()
        results = [
            QueryItem(
                item.box,
                item.label,
                item.category,
                item.score,
                self.shards.search(item.vector, k, collection, category),
            )
            for item in items
        ]
        hits = self.shards.search(whole_vector, k, collection, category)
        done = time.perf_counter()
        return QueryResult(
            results,
            hits,
            {
                "decode": _ms(start, decoded),
                "models": _ms(decoded, analysed),
                "search": _ms(analysed, done),
                "total": _ms(start, done),
            },
        )

    def describe(self) -> dict[str, Any]:
        return {
            "detector": self.models.detector.name,
            "encoder": self.models.encoder.name,
            "encoder_version": self.models.encoder.version,
            "dim": self.models.encoder.dim,
            "classifier": self.models.classifier.name,
        }


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 2)


def build_node(settings: Settings, *, durable: bool = True) -> Node:
    pm = build_plugin_manager(settings.disabled_plugins)
    context = ModelContext(device=resolve_device(settings.models.device), cpu_threads=settings.models.cpu_threads)
    s = settings.models
    models = load_models(pm, s.detector, s.encoder, s.classifier, context, s.options)
    log.info(
        "models: %s/%s/%s on %s", models.detector.name, models.encoder.name, models.classifier.name, context.device
    )
    # One forward pass now, so the first event is not the one that pays for lazy initialisation.
    models.encoder.encode([Image.new("RGB", (64, 64))])
    return Node.create(settings, models, durable=durable)
