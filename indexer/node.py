"""A lookstream node: the models, the shards and the consumer that feeds them.

``Node`` is built once from the settings and shared by the HTTP app (which
searches) and the consumer thread (which indexes). Queries and indexing both
call the same :class:`~indexer.pipeline.Pipeline`, so a query image is
processed exactly as an indexed one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from indexer import generations
from indexer.config import ModelSettings, Settings
from indexer.generations import Generation
from indexer.images import decode_image
from indexer.pipeline import Pipeline
from indexer.shards import Hit, ShardSet
from indexer.stats import IngestStats
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


class Node:
    """Serves queries from the active generation while a new one, if any, catches up."""

    def __init__(self, settings: Settings, active: Generation) -> None:
        self.settings = settings
        self.active = active
        self.building: Generation | None = None
        #: Model inference and FAISS search run here, off the event loop.
        self.executor = ThreadPoolExecutor(2, "lookstream-query")
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

    def start_ingest(self) -> None:
        self._ingesting = True
        for generation in self.generations():
            generation.start_consumer(self.settings)

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
                if generation.selection == selection:
                    return None
            models = generations.load(self.settings, selection)
            new = Generation.create(self.settings, models, selection, durable=self.active.checkpointer is not None)
            previous, self.building = self.building, new
            if previous is not None:
                previous.close()
            if self._ingesting:
                new.start_consumer(self.settings)
            log.info("generation %s started; %s answers until it has caught up", new.id, self.active.id)
            return new

    def flip_if_caught_up(self) -> bool:
        """Make the building generation active once it holds everything the active one does."""
        with self._switch_lock:
            new = self.building
            if new is None or not new.caught_up_with(self.active):
                return False
            old, self.active, self.building = self.active, new, None
            _record_active(self.settings, new.selection)
            log.info("generation %s is active; %s retired", new.id, old.id)
        old.close()
        return True

    def query(self, data: bytes, k: int, collection: str, category: str | None) -> QueryResult:
        """Search with an image: hits per detected item, and for the whole image."""
        generation = self.active  # one generation for the whole query, even across a flip
        pipeline, shards = generation.pipeline, generation.shards
        start = time.perf_counter()
        image = decode_image(data, self.settings.images.max_pixels)
        decoded = time.perf_counter()
        items = pipeline.analyse([image], [{}])[0]
        whole = next((item for item in items if item.box == (0, 0, image.width, image.height)), None)
        whole_vector = whole.vector if whole is not None else pipeline.encode([image])[0]
        analysed = time.perf_counter()
        results = [
            QueryItem(
                item.box, item.label, item.category, item.score, shards.search(item.vector, k, collection, category)
            )
            for item in items
        ]
        hits = shards.search(whole_vector, k, collection, category)
        done = time.perf_counter()
        timings = {
            "decode": _ms(start, decoded),
            "models": _ms(decoded, analysed),
            "search": _ms(analysed, done),
            "total": _ms(start, done),
        }
        return QueryResult(results, hits, timings)

    def describe(self) -> dict[str, Any]:
        return self.active.describe()

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
    if recorded is not None and recorded != desired:
        previous = Generation.create(settings, generations.load(settings, recorded), recorded, durable=True)
        if previous.has_checkpoint():
            node = Node(settings, previous)
            node.switch(desired)
            return node
        previous.close()
    node = Node(settings, Generation.create(settings, generations.load(settings, desired), desired, durable=True))
    _record_active(settings, desired)
    return node
