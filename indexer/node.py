"""A lookstream node: the active model generation, and a new one while it catches up.

``Node`` is wiring: it is built once from the settings (:func:`build_node`),
starts and stops the generations' consumers, switches to new model settings
and flips to a new generation once it has caught up (indexer/generations.py).
The HTTP app searches ``node.active``'s pipeline and shards (indexer/search.py),
taking the generation once per query so that a query image is processed
exactly as the indexed ones it is compared with, even across a flip.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from indexer import generations
from indexer.config import ModelSettings, Settings
from indexer.generations import Generation
from indexer.store.thumbnails import ThumbnailStore
from plugins.manager import Models

log = logging.getLogger(__name__)


class Node:
    """Serves queries from the active generation while a new one, if any, catches up."""

    def __init__(self, settings: Settings, active: Generation) -> None:
        self.settings = settings
        self.active = active
        self.building: Generation | None = None
        self.thumbnails = ThumbnailStore(settings.data_dir / "thumbnails")
        self._freshness_observer: Callable[[float, str], None] | None = None
        self._ingesting = False
        self._switch_lock = threading.Lock()

    @classmethod
    def create(cls, settings: Settings, models: Models) -> Node:
        """A node over empty, in-memory shards (tests, evaluation)."""
        return cls(settings, Generation.create(settings, models))

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

    def close(self) -> None:
        for generation in self.generations():
            generation.close()


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
