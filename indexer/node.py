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
import time
from collections.abc import Callable

from indexer import generations, interpreter
from indexer.config import ModelSettings, Settings
from indexer.generations import Generation, Replica
from indexer.store.thumbnails import ThumbnailStore
from plugins.manager import Models

log = logging.getLogger(__name__)


class Node:
    """Serves queries from the active generation while a new one, if any, catches up."""

    def __init__(self, settings: Settings, active: Generation) -> None:
        self.settings = settings
        self.active = active
        #: set on a serve replica (``lookstream serve``): generations apply records, not events
        self.replica: Replica | None = active.replica
        self.building: Generation | None = None
        #: on a serve replica, the generation it answered from before its last flip, kept for routers
        #: that still ask for it until ``retire_at`` (monotonic seconds; docs/architecture.md, "Scale-out")
        self.retiring: Generation | None = None
        self.retire_at = 0.0
        self.thumbnails = ThumbnailStore(settings.data_dir / "thumbnails")
        self._freshness_observer: Callable[[float, str], None] | None = None
        self._ingesting = False
        self._switch_lock = threading.Lock()

    @classmethod
    def create(cls, settings: Settings, models: Models, replica: Replica | None = None) -> Node:
        """A node over empty, in-memory shards (tests, evaluation)."""
        return cls(settings, Generation.create(settings, models, replica=replica))

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
        return [g for g in (self.active, self.building, self.retiring) if g is not None]

    def answering(self, generation_id: str) -> Generation | None:
        """The generation with this id if this node answers from it (the active one, or one retiring)."""
        for generation in (self.active, self.retiring):
            if generation is not None and generation.id == generation_id:
                return generation
        return None

    def retire_if_due(self) -> None:
        with self._switch_lock:
            old = self.retiring
            if old is None or time.monotonic() < self.retire_at:
                return
            self.retiring = None
        log.info("generation %s retired", old.id)
        old.close()
        interpreter.freeze_new_long_lived(something_was_released=True)

    def switch(self, selection: ModelSettings) -> Generation | None:
        """Start a generation for this model selection; None if it is already active or building.

        Loading models is slow: call this off the event loop.
        """
        with self._switch_lock:
            for generation in (self.active, self.building):
                if generation is not None and generations.same_models(generation.selection, selection):
                    return None
            models = generations.load(self.settings, selection)
            new = Generation.create(
                self.settings, models, selection, durable=self.active.checkpointer is not None, replica=self.replica
            )
            self._observe(new)
            previous, self.building = self.building, new
            if previous is not None:
                previous.close()
            if self._ingesting:
                new.start_consumer(self.settings, self.thumbnails)
            log.info("generation %s started; %s answers until it has caught up", new.id, self.active.id)
        interpreter.freeze_new_long_lived(something_was_released=previous is not None)  # its models live long
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
            if new is None or not new.caught_up_with(self.active, self.settings.api.ready_max_lag):
                return False
            old = self.active
            if self.replica is not None and self.settings.cluster.retire_after_s > 0:
                # Routers may still ask for the old generation until every replica has flipped. It is
                # retiring before it stops being active, so that no query finds it in neither role (409).
                previous, self.retiring = self.retiring, old
                self.retire_at = time.monotonic() + self.settings.cluster.retire_after_s
                self.active, self.building = new, None
                released = previous is not None
                if previous is not None:
                    previous.close()
                _record_active(self.settings, new.selection)
                log.info("generation %s is active; %s answers routers that ask for it a while", new.id, old.id)
            else:
                self.active, self.building = new, None
                _record_active(self.settings, new.selection)
                log.info("generation %s is active; %s retired", new.id, old.id)
                old.close()
                released = True
        interpreter.freeze_new_long_lived(something_was_released=released)
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


def build_node(settings: Settings, *, durable: bool = True, replica: Replica | None = None) -> Node:
    """The node for these settings; with ``replica``, a serve replica fed by the records topics.

    Durable: shards are checkpointed under the data dir and restored. If the
    config now selects other models than the generation that answered last,
    that generation keeps answering (from its checkpoint) while the newly
    configured one replays the topics, and the node flips once it has caught up.
    """
    desired = settings.models
    if not durable:
        return Node(settings, Generation.create(settings, generations.load(settings, desired), replica=replica))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    recorded_path = settings.data_dir / ACTIVE_FILE
    recorded = ModelSettings.model_validate_json(recorded_path.read_text()) if recorded_path.exists() else None
    if recorded is not None and not generations.same_models(recorded, desired):
        previous = Generation.create(
            settings, generations.load(settings, recorded), recorded, durable=True, replica=replica
        )
        if previous.has_checkpoint():
            node = Node(settings, previous)
            node.switch(desired)
            return node
        previous.close()
    node = Node(
        settings,
        Generation.create(settings, generations.load(settings, desired), desired, durable=True, replica=replica),
    )
    _record_active(settings, desired)
    return node
