"""Model generations: the models, the shards built with them, and the consumer that feeds them.

Vectors from two encoders cannot be compared, so each model selection (detector,
encoder and its version, classifier, options) is a *generation* with shards,
checkpoints (``data_dir/checkpoints/<generation id>/``) and a Kafka consumer
group (``<group_id>.<generation id>``) of its own. A new generation replays the
topics from the beginning; the node keeps answering from the active one until
the new one has caught up with it, then flips (indexer/node.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from consumers.indexing import IndexingConsumer
from consumers.records_topic import topic_name
from consumers.replica import ReplicaConsumer
from consumers.stats import IngestStats
from indexer.config import ModelSettings, Settings
from indexer.events import COLLECTIONS
from indexer.pipeline import Pipeline
from indexer.store import backends
from indexer.store.checkpoint import Checkpointer, load_latest
from indexer.store.shards import ShardSet
from indexer.store.thumbnails import ThumbnailStore
from indexer.training import pairs
from plugins.manager import Models, build_plugin_manager, load_models, resolve_device, resolve_runtime
from plugins.models import ModelContext

log = logging.getLogger(__name__)


def load(settings: Settings, selection: ModelSettings) -> Models:
    pm = build_plugin_manager(settings.disabled_plugins)
    device = resolve_device(selection.device)
    context = ModelContext(
        device=device,
        cpu_threads=selection.cpu_threads,
        runtime=resolve_runtime(selection.runtime, device),
        cache_dir=settings.data_dir / "models",
    )
    models = load_models(
        pm,
        selection.detector,
        selection.encoder,
        selection.classifier,
        context,
        selection.options,
        selection.detectors,
        selection.reranker,
    )
    log.info(
        "models: %s/%s/%s on %s (%s)",
        models.detector.name,
        models.encoder.name,
        models.classifier.name,
        context.device,
        context.runtime,
    )
    # One forward pass now, so the first event is not the one that pays for lazy initialisation.
    models.encoder.encode([Image.new("RGB", (64, 64))])
    return models


def identity(models: Models, selection: ModelSettings) -> dict[str, Any]:
    """What the vectors and categories in the shards depend on."""
    encoder = models.encoder
    return {
        "encoder": encoder.name,
        "version": encoder.version,
        "dim": encoder.dim,
        "detector": models.detector.name,
        "classifier": models.classifier.name,
        "options": stored_options(selection),
        # only where a collection has its own detector, so that existing generations keep their ids
        **({"detectors": {c: d.name for c, d in sorted(models.detectors.items())}} if models.detectors else {}),
    }


def stored_options(selection: ModelSettings) -> dict[str, Any]:
    """The model options that shape what the shards hold.

    Left out: the selected re-ranker's table, and any option named ``query_*``
    (docs/plugins.md): both are read when queries are answered, so changing
    them keeps the generation and its shards, and applies from the next start.
    """
    return {
        name: {key: value for key, value in table.items() if not key.startswith("query_")}
        for name, table in selection.options.items()
        if name != selection.reranker
    }


def same_models(a: ModelSettings, b: ModelSettings) -> bool:
    """Whether two selections give the same vectors and categories (device, batch size or query options do not)."""

    def models(s: ModelSettings) -> tuple:
        return (s.encoder, s.classifier, stored_options(s), *(s.detector_for(c) for c in COLLECTIONS))

    return models(a) == models(b)


def generation_id(ident: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", f"{ident['encoder']}-{digest}")


@dataclass(frozen=True)
class Replica:
    """How a serve replica's generations are fed: from the generation's records topic, not from the events.

    ``partitions``: the records-topic partitions served; None for all of them.
    """

    partitions: tuple[int, ...] | None = None


@dataclass
class Generation:
    id: str
    selection: ModelSettings
    models: Models
    pipeline: Pipeline
    shards: ShardSet
    stats: IngestStats = field(default_factory=IngestStats)
    checkpointer: Checkpointer | None = None
    #: "topic/partition" -> next offset, for what the restored checkpoint holds
    restored_offsets: dict[str, int] = field(default_factory=dict)
    #: the checkpoint the shards were restored from, and the newer ones that could not be read
    restored_from: str | None = None
    skipped_checkpoints: list[str] = field(default_factory=list)
    consumer: IndexingConsumer | None = None
    #: set on a serve replica: the generation applies records from its records topic
    replica: Replica | None = None

    @classmethod
    def create(
        cls,
        settings: Settings,
        models: Models,
        selection: ModelSettings | None = None,
        *,
        durable: bool = False,
        replica: Replica | None = None,
    ) -> Generation:
        """Empty shards for these models; with ``durable``, restored from this generation's newest checkpoint."""
        selection = selection or settings.models
        pipeline = Pipeline(
            models,
            settings.images,
            batch_size=selection.batch_size,
            model_attempts=settings.ingest.model_attempts,
        )
        s = settings.shards
        backend = backends.choose(s.backend)
        ident = identity(models, selection)
        generation = cls(generation_id(ident), selection, models, pipeline, ShardSet(models.encoder.dim, s, backend))
        generation.replica = replica
        if durable:
            if settings.pairs.enabled:
                pipeline.observer = pairs.miner(settings.data_dir / "pairs", settings.pairs)
            root = settings.data_dir / "checkpoints" / generation.id
            generation.checkpointer = Checkpointer(root, ident, s.checkpoint_interval_s)
            restored = load_latest(root, ident, s, backend, generation.skipped_checkpoints)
            topic = generation.records_topic(settings)
            if restored is not None and not _fits(replica, topic, checkpoint_offsets := restored[0].offsets):
                # Records of partitions this replica does not follow would stay in its shards, never updated.
                log.warning(
                    "checkpoint %s holds %s, not only partitions of %s served here (%s): starting empty",
                    restored[0].path.name,
                    sorted(checkpoint_offsets),
                    topic,
                    "all" if replica.partitions is None else list(replica.partitions),
                )
                restored[1].close()
                generation.skipped_checkpoints.append(restored[0].path.name)
                restored = None
            if restored is not None:
                checkpoint, generation.shards = restored
                generation.restored_from = checkpoint.path.name
                generation.stats.restore(checkpoint.counters)
                generation.restored_offsets = checkpoint.offsets
        return generation

    def has_checkpoint(self) -> bool:
        return bool(self.restored_offsets) or (self.checkpointer is not None and self.checkpointer.last is not None)

    def records_topic(self, settings: Settings) -> str:
        """This generation's records topic (written by encoders, read by serve replicas)."""
        return topic_name(settings.cluster.records_topic_prefix, self.id)

    def start_consumer(self, settings: Settings, thumbnails: ThumbnailStore | None = None) -> None:
        if self.replica is not None:
            self.consumer = ReplicaConsumer(
                settings.kafka,
                self.records_topic(settings),
                self.replica.partitions,
                self.shards,
                self.stats,
                self.checkpointer,
                self.restored_offsets,
                thumbnails,
                settings.ingest,
                settings.api.ready_max_lag,
            )
            self.consumer.start()
            return
        kafka = settings.kafka.model_copy(update={"group_id": f"{settings.kafka.group_id}.{self.id}"})
        self.consumer = IndexingConsumer(
            kafka,
            self.pipeline,
            self.shards,
            self.stats,
            self.checkpointer,
            self.restored_offsets,
            thumbnails,
            settings.ingest,
        )
        self.consumer.start()

    def stop_consumer(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()

    def caught_up_with(self, other: Generation, max_lag: int = 0) -> bool:
        """True once this generation has applied every partition at least as far as ``other`` has.

        A replica compares the events its records came from (two records
        topics have offsets of their own), and also needs every records
        partition it reads within ``max_lag`` of its end: the newest source
        offset seen in one records partition says nothing of the others.
        """
        mine, theirs = self.consumer, other.consumer
        if mine is None or not mine.assigned.is_set():
            return False
        if self.replica is not None:
            if not mine.lag or max(mine.lag.values()) > max_lag:
                return False
            target = other.stats.counters().get("sources", {})
            applied = self.stats.counters().get("sources", {})
            return all(applied.get(name, -1) >= offset for name, offset in target.items())
        target = dict(theirs.applied) if theirs is not None else {}
        applied = dict(mine.applied)
        return all(applied.get(tp, -1) >= offset for tp, offset in target.items())

    def describe(self) -> dict[str, Any]:
        encoder = self.models.encoder
        return {
            "id": self.id,
            "detector": self.models.detector.name,
            "detectors": {c: self.models.detector_for(c).name for c in COLLECTIONS},
            "encoder": encoder.name,
            "encoder_version": encoder.version,
            "dim": encoder.dim,
            "classifier": self.models.classifier.name,
            "backend": self.shards.backend.name,
            "records": {c: self.shards.records(c) for c in COLLECTIONS},
            "consumer": {
                "running": self.consumer is not None and self.consumer.running,
                "assigned": self.consumer is not None and self.consumer.assigned.is_set(),
                **(self.consumer.health.snapshot() if self.consumer is not None else {}),
            },
            "checkpoint": {"restored_from": self.restored_from, "skipped": list(self.skipped_checkpoints)},
        }

    def close(self) -> None:
        self.stop_consumer()
        self.pipeline.close()
        self.shards.close()
        if self.checkpointer is not None:
            self.checkpointer.close()


def _fits(replica: Replica | None, records_topic: str, offsets: dict[str, int]) -> bool:
    """Whether a checkpoint with these offsets holds only records-topic partitions this replica follows.

    A node that indexes events (``lookstream up``) checkpoints event-topic offsets: those do not fit a replica.
    """
    if replica is None:
        return True
    for name in offsets:
        topic, _, partition = name.rpartition("/")
        if topic != records_topic or (replica.partitions is not None and int(partition) not in replica.partitions):
            return False
    return True
