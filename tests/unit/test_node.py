"""Node and generations without Kafka: switching, flipping, the recorded active generation, freshness phases.

The consumers here are stand-ins holding only what the node reads of them (applied
offsets, assignment, health); tests/integration/test_generations.py runs the same
flows against the real broker.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kafka import TopicPartition

from consumers.health import ConsumerHealth
from indexer import generations
from indexer.config import IngestSettings, ModelSettings, Settings
from indexer.node import ACTIVE_FILE, Node, build_node


@dataclass
class StandIn:
    """What Node and Generation read of an IndexingConsumer."""

    applied: dict = field(default_factory=dict)
    lag: dict = field(default_factory=dict)  # (topic, partition) -> messages not applied yet
    assigned: threading.Event = field(default_factory=threading.Event)
    health: ConsumerHealth = field(default_factory=lambda: ConsumerHealth(IngestSettings()))
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True


OTHER = ModelSettings(classifier="imagenet-garments")


def test_same_models_ignores_what_does_not_change_vectors():
    base = ModelSettings()
    assert generations.same_models(base, base.model_copy(update={"device": "cuda", "batch_size": 4}))
    assert not generations.same_models(base, OTHER)
    assert not generations.same_models(base, base.model_copy(update={"options": {"x": {"y": 1}}}))
    # Options read only when queries are answered: the selected re-ranker's, and any named query_*.
    finetuned = ModelSettings(encoder="finetuned", options={"finetuned": {"path": "m"}})
    query_only = {"finetuned": {"path": "m", "query_base_weight": {"product": 0.8}}, "multi-crop": {"candidates": 9}}
    reranked = finetuned.model_copy(update={"reranker": "multi-crop", "options": query_only})
    assert generations.same_models(finetuned, reranked)
    assert generations.stored_options(reranked) == {"finetuned": {"path": "m"}}
    assert not generations.same_models(finetuned, reranked.model_copy(update={"options": {"finetuned": {"path": "n"}}}))


def test_generation_ids_are_stable_and_differ_by_models(default_models):
    a = generations.identity(default_models, ModelSettings())
    b = {**a, "classifier": "imagenet-garments"}
    assert generations.generation_id(a) == generations.generation_id(dict(a))
    assert generations.generation_id(a) != generations.generation_id(b)
    assert generations.generation_id(a).startswith("efficientnet-lite0-")


def test_a_switch_builds_beside_the_active_generation_and_flips_once_caught_up(default_models, tmp_path):
    node = Node.create(Settings(data_dir=tmp_path), default_models)
    active = node.active
    assert node.switch(ModelSettings()) is None  # the same models: nothing to build
    new = node.switch(OTHER)
    assert new is not None and node.building is new and node.active is active
    assert node.switch(OTHER) is None  # already building

    tp = TopicPartition("products", 0)
    active.consumer, new.consumer = StandIn({tp: 10}), StandIn({tp: 9})
    new.consumer.assigned.set()
    assert not node.flip_if_caught_up()  # one event behind
    new.consumer.applied[tp] = 10
    assert node.flip_if_caught_up()
    assert node.active is new and node.building is None and active.consumer.stopped
    assert ModelSettings.model_validate_json((tmp_path / ACTIVE_FILE).read_text()) == OTHER
    node.close()


def test_freshness_is_live_only_for_the_active_generation_and_new_events(default_models, tmp_path):
    node = Node.create(Settings(data_dir=tmp_path), default_models)
    seen: list[tuple[float, str]] = []
    node.observe_freshness(lambda seconds, phase: seen.append((seconds, phase)))
    building = node.switch(OTHER)
    node.active.stats.freshness_observer(0.2, False)
    node.active.stats.freshness_observer(30.0, True)  # produced before the consumer started
    building.stats.freshness_observer(0.3, False)  # a generation still catching up
    assert seen == [(0.2, "live"), (30.0, "catch-up"), (0.3, "catch-up")]
    node.close()


def test_fatal_names_the_consumer_that_gave_up(default_models, tmp_path):
    node = Node.create(Settings(data_dir=tmp_path), default_models)
    assert node.fatal is None
    node.active.consumer = StandIn()
    node.active.consumer.health.last_failure = "NoBrokersAvailable"
    reason = node.active.consumer.health.give_up()
    assert node.fatal == reason and "NoBrokersAvailable" in reason
    node.close()


def test_build_node_records_the_answering_generation(tmp_path):
    node = build_node(Settings(data_dir=tmp_path))
    try:
        recorded = ModelSettings.model_validate_json((tmp_path / ACTIVE_FILE).read_text())
        assert generations.same_models(recorded, Settings().models)
        assert node.active.checkpointer is not None and node.active.restored_from is None
    finally:
        node.close()


def test_a_detector_per_collection_is_part_of_the_generation(default_models):
    from dataclasses import replace

    from plugins.builtin.whole_image import WholeImageDetector
    from plugins.models import ModelContext

    plain = generations.identity(default_models, ModelSettings())
    assert "detectors" not in plain  # generations without per-collection detectors keep their ids
    street = replace(default_models, detectors={"posts": WholeImageDetector(ModelContext("cpu"))})
    with_street = generations.identity(street, ModelSettings(detectors={"posts": "ssd-street"}))
    assert generations.generation_id(with_street) != generations.generation_id(plain)
    assert generations.same_models(ModelSettings(), ModelSettings(detectors={"posts": "whole-image"}))
    assert not generations.same_models(ModelSettings(), ModelSettings(detectors={"posts": "ssd-street"}))


def test_a_replica_flips_on_source_offsets_and_answers_the_old_generation_a_while(default_models, tmp_path):
    import time

    from indexer.generations import Replica

    settings = Settings.model_validate({"data_dir": str(tmp_path), "cluster": {"retire_after_s": 0.3}})
    node = Node.create(settings, default_models, replica=Replica((0, 1)))
    old = node.active
    new = node.switch(OTHER)
    assert new is not None and new.replica == Replica((0, 1))
    old.consumer, new.consumer = StandIn(), StandIn()
    new.consumer.assigned.set()
    # Records topics of two generations have offsets of their own: the events they came from are compared.
    old.stats.record_sources({"products/0": 10, "posts/0": 3})
    new.stats.record_sources({"products/0": 10})
    new.consumer.lag = {("records", 0): 0, ("records", 1): 0}
    assert not node.flip_if_caught_up()
    new.stats.record_sources({"posts/0": 3})
    new.consumer.lag[("records", 1)] = 5_000  # one records partition far behind: its sources may be too
    assert not node.flip_if_caught_up()
    new.consumer.lag[("records", 1)] = 0
    assert node.flip_if_caught_up()
    assert node.active is new and node.retiring is old and not old.consumer.stopped
    assert node.answering(old.id) is old and node.answering(new.id) is new and node.answering("other") is None
    node.retire_if_due()
    assert node.retiring is old  # not yet
    time.sleep(0.35)
    node.retire_if_due()
    assert node.retiring is None and old.consumer.stopped and node.answering(old.id) is None
    node.close()
