"""A lookstream node: the active model generation, and a new one while it catches up.

``Node`` is built once from the settings and shared by the HTTP app (which
searches) and the consumer threads (which index). A query takes the active
generation once and uses its pipeline and shards throughout, so a query image
is processed exactly as the indexed ones it is compared with, even across a
flip to a new generation (indexer/generations.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from indexer import generations
from indexer.config import ModelSettings, Settings
from indexer.generations import Generation
from indexer.images import decode
from indexer.pipeline import Pipeline
from indexer.store.segments import ItemMeta
from indexer.store.shards import Hit, ShardSet
from consumers.stats import IngestStats
from indexer.store.thumbnails import ThumbnailStore
from plugins.manager import Models

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
    size: tuple[int, int]  # width, height of the query image


class Node:
    """Serves queries from the active generation while a new one, if any, catches up."""

    def __init__(self, settings: Settings, active: Generation) -> None:
        self.settings = settings
        self.active = active
        self.building: Generation | None = None
        #: Model inference and FAISS search run here, off the event loop.
        self.executor = ThreadPoolExecutor(2, "lookstream-query")
        #: Moving average of recent vector search times (seconds): the API runs searches
        #: faster than ``api.inline_search_ms`` on the event loop instead of the executor.
        self.vector_search_s = 0.0
        self.thumbnails = ThumbnailStore(settings.data_dir / "thumbnails")
        self._freshness_observer: Callable[[float, str], None] | None = None
        self._ingesting = False
        self._switch_lock = threading.Lock()

    @classmethod
    def create(cls, settings: Settings, models: Models) -> Node:
        """A node over empty, in-memory shards (tests, evaluation)."""
        return cls(settings, Generation.create(settings, models))

    # The active generation's parts, for callers that do not care about generations.
    @property
    def models(self) -> Models:
        return self.active.models

    @property
    def pipeline(self) -> Pipeline:
        return self.active.pipeline

    @property
    def shards(self) -> ShardSet:
        return self.active.shards

    @property
    def stats(self) -> IngestStats:
        return self.active.stats

    def observe_freshness(self, observer: Callable[[float, str], None]) -> None:
        """Feed every generation's per-event freshness to ``observer`` (the /metrics histogram).

        The observer gets seconds and a phase: "live" for events of the active
        generation that are newer than its consumer, "catch-up" for replays (a
        restart, a generation that is still catching up).
        """
        self._freshness_observer = observer
        for generation in self.generations():
            self._observe(generation)

    def _observe(self, generation: Generation) -> None:
        observer = self._freshness_observer
        if observer is None:
            return

        def observe(seconds: float, replay: bool) -> None:
            observer(seconds, "catch-up" if replay or generation is not self.active else "live")

        generation.stats.freshness_observer = observe

    @property
    def fatal(self) -> str | None:
        """Why ingestion stopped for good, if it did: the node should exit (and be restarted)."""
        for generation in self.generations():
            consumer = generation.consumer
            if consumer is not None and consumer.health.gave_up:
                return consumer.health.gave_up
        return None

    def start_ingest(self) -> None:
        self._ingesting = True
        for generation in self.generations():
            generation.start_consumer(self.settings, self.thumbnails)

    def stop_ingest(self) -> None:
        self._ingesting = False
        for generation in self.generations():
            generation.stop_consumer()

    def generations(self) -> list[Generation]:
        return [g for g in (self.active, self.building) if g is not None]

    def switch(self, selection: ModelSettings) -> Generation | None:
        """Start a generation for this model selection; None if it is already active or building.

        Loading models is slow: call this off the event loop.
        """
        with self._switch_lock:
            for generation in self.generations():
                if generations.same_models(generation.selection, selection):
                    return None
            models = generations.load(self.settings, selection)
            new = Generation.create(self.settings, models, selection, durable=self.active.checkpointer is not None)
            self._observe(new)
            previous, self.building = self.building, new
            if previous is not None:
                previous.close()
            if self._ingesting:
                new.start_consumer(self.settings, self.thumbnails)
            log.info("generation %s started; %s answers until it has caught up", new.id, self.active.id)
            return new

    def flip_if_caught_up(self) -> bool:
        """Make the building generation active once it holds everything the active one does.

        The retired generation is closed before the lock is let go: a switch
        straight back to its models joins its consumer group, and a member
        joining while the old one was still leaving kept the group rebalancing
        for minutes on the local broker (tests/integration/test_generations.py).
        """
        with self._switch_lock:
            new = self.building
            if new is None or not new.caught_up_with(self.active):
                return False
            old, self.active, self.building = self.active, new, None
            _record_active(self.settings, new.selection)
            log.info("generation %s is active; %s retired", new.id, old.id)
            old.close()
        return True

    def query(
        self,
        data: bytes,
        k: int,
        collection: str | tuple[str, ...],
        category: str | None = None,
        accept: Callable[[ItemMeta], bool] | None = None,
    ) -> QueryResult:
        """Search with an image: hits per detected item, and for the whole image."""
        generation = self.active  # one generation for the whole query, even across a flip
        pipeline, shards = generation.pipeline, generation.shards
        start = time.perf_counter()
        images = self.settings.images
        decoded = decode(data, images.max_pixels, images.decode_max_side)
        timings = {"decode": _ms(start, time.perf_counter())}
        items = pipeline.analyse([decoded], [{}], timings)[0]
        width, height = decoded.original_size
        whole = next((item for item in items if item.box == (0, 0, width, height)), None)
        if whole is not None:
            whole_vector = whole.vector
        else:
            encode_start = time.perf_counter()
            whole_vector = pipeline.encode([decoded.image])[0]
            timings["encode"] = round(timings.get("encode", 0.0) + _ms(encode_start, time.perf_counter()), 2)
        search_start = time.perf_counter()
        results = [
            QueryItem(
                item.box,
                item.label,
                item.category,
                item.score,
                shards.search(item.vector, k, collection, category, accept),
            )
            for item in items
        ]
        hits = shards.search(whole_vector, k, collection, category, accept)
        done = time.perf_counter()
        timings.update(search=_ms(search_start, done), total=_ms(start, done))
        return QueryResult(results, hits, timings, decoded.original_size)

    def search_vector(
        self,
        vector: np.ndarray,
        k: int,
        collection: str | tuple[str, ...],
        category: str | None = None,
        accept: Callable[[ItemMeta], bool] | None = None,
    ) -> list[Hit]:
        shards = self.active.shards
        if vector.shape != (shards.dim,):
            raise ValueError(
                f"vector must have {shards.dim} numbers (the active encoder's dimension), not {vector.size}"
            )
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise ValueError("vector must be finite and not all zeros")
        started = time.perf_counter()
        hits = shards.search((vector / norm).astype(np.float32), k, collection, category, accept)
        self.vector_search_s += 0.1 * (time.perf_counter() - started - self.vector_search_s)
        return hits

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        for generation in self.generations():
            generation.close()


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000, 2)


ACTIVE_FILE = "active-generation.json"


def _record_active(settings: Settings, selection: ModelSettings) -> None:
    """Remember which selection answers, so a restart with a changed config keeps answering from it."""
    path = settings.data_dir / ACTIVE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(selection.model_dump_json(indent=1))
    os.replace(tmp, path)


def build_node(settings: Settings, *, durable: bool = True) -> Node:
    """The node for these settings.

    Durable: shards are checkpointed under the data dir and restored. If the
    config now selects other models than the generation that answered last,
    that generation keeps answering (from its checkpoint) while the newly
    configured one replays the topics, and the node flips once it has caught up.
    """
    desired = settings.models
    if not durable:
        return Node(settings, Generation.create(settings, generations.load(settings, desired)))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    recorded_path = settings.data_dir / ACTIVE_FILE
    recorded = ModelSettings.model_validate_json(recorded_path.read_text()) if recorded_path.exists() else None
    if recorded is not None and not generations.same_models(recorded, desired):
        previous = Generation.create(settings, generations.load(settings, recorded), recorded, durable=True)
        if previous.has_checkpoint():
            node = Node(settings, previous)
            node.switch(desired)
            return node
        previous.close()
    node = Node(settings, Generation.create(settings, generations.load(settings, desired), desired, durable=True))
    _record_active(settings, desired)
    return node
