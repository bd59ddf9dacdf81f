"""The serve replica's consumer: records in, shards out (``lookstream serve``).

The indexing consumer's loop (consumers/indexing.py: batches, checkpoints,
backoff, health) over a generation's records topic instead of the event
topics, with no model in the way: a record already carries its vectors.

* No consumer group: every replica reads the partitions it serves itself
  (``assign``), all of them or the ``--partitions`` subset, so that any number
  of replicas hold the same data. Nothing is committed to Kafka; the
  checkpoint's records-topic offsets are where a restart resumes.
* A record this version cannot read is logged and counted as rejected
  (``bad-envelope``); it is not dead-lettered, since every replica would send it.
* Readiness waits until the broker has told every served partition's high
  watermark, so that an empty replica that has not fetched yet is not ready.
"""

from __future__ import annotations

import logging
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.indexing import DeadLetter, IndexingConsumer
from consumers.records_topic import InvalidRecord, decode_record
from consumers.stats import IngestStats
from indexer.config import IngestSettings, KafkaSettings
from indexer.failures import Reason
from indexer.store.checkpoint import Checkpointer
from indexer.store.records import Delete, Upsert
from indexer.store.shards import ShardSet
from indexer.store.thumbnails import ThumbnailStore

log = logging.getLogger(__name__)

#: How long a replica waits for its records topic to appear (encoders or a serve node create it).
TOPIC_WAIT_S = 60.0


class MissingPartitions(ValueError):
    """``--partitions`` names partitions the records topic does not have."""


class ReplicaConsumer(IndexingConsumer):
    client_id = "lookstream-replica"

    def __init__(
        self,
        kafka: KafkaSettings,
        records_topic: str,
        partitions: tuple[int, ...] | None,
        shards: ShardSet,
        stats: IngestStats,
        checkpointer: Checkpointer | None = None,
        restored_offsets: dict[str, int] | None = None,
        thumbnails: ThumbnailStore | None = None,
        ingest: IngestSettings | None = None,
        ready_max_lag: int = 1000,
    ) -> None:
        super().__init__(kafka, None, shards, stats, checkpointer, restored_offsets, thumbnails, ingest)
        #: further behind than this the replica is not ready, and routers do not ask it (api.ready_max_lag)
        self.ready_max_lag = ready_max_lag
        self.records_topic = records_topic
        self.wanted = partitions
        #: the partitions served, and how many the topic has (for the router), once assigned
        self.partitions: tuple[int, ...] = ()
        self.total_partitions: int | None = None
        self._origins: dict[str, int] = {}  # the event offsets of the batch being applied

    def _client_config(self) -> dict:
        config = super()._client_config()
        config["group_id"] = None
        return config

    def _subscribe(self, consumer: KafkaConsumer) -> None:
        deadline = time.monotonic() + TOPIC_WAIT_S
        available = consumer.partitions_for_topic(self.records_topic)
        while not available and time.monotonic() < deadline:
            time.sleep(0.5)
            available = consumer.partitions_for_topic(self.records_topic)
        if not available:
            raise RuntimeError(f"records topic {self.records_topic} does not exist (start an encoder first)")
        wanted = sorted(available) if self.wanted is None else sorted(self.wanted)
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise MissingPartitions(f"{self.records_topic} has partitions {sorted(available)}; not {unknown}")
        assigned = [TopicPartition(self.records_topic, p) for p in wanted]
        consumer.assign(assigned)
        self._seek_to_applied(consumer, assigned)
        self.partitions = tuple(wanted)
        self.total_partitions = len(available)
        log.info("serving %s partitions %s of %d", self.records_topic, list(self.partitions), len(available))

    def _after_poll(self, consumer: KafkaConsumer) -> None:
        super()._after_poll(consumer)
        if len(self.lag) < len(consumer.assignment()):
            self.assigned.clear()  # not ready before the broker told how far every partition goes

    @staticmethod
    def _commit(consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """No group, nothing to commit: the checkpoint holds the offsets."""

    def _operations(
        self, records: list[ConsumerRecord]
    ) -> tuple[list[Upsert | Delete], list[ConsumerRecord], list[DeadLetter]]:
        ops, sources, bad = [], [], []
        origins: dict[str, int] = {}
        for record in records:
            try:
                op, origin = decode_record(record.value)
            except InvalidRecord as e:
                bad.append(DeadLetter(record, Reason.BAD_ENVELOPE, str(e)))
                continue
            wrong = [len(item.vector) for item in getattr(op, "items", ()) if len(item.vector) != self.shards.dim]
            if wrong:  # another model's record: the shards would refuse the whole batch, on every replica
                detail = f"vectors of {wrong[0]} numbers; this generation's encoder gives {self.shards.dim}"
                bad.append(DeadLetter(record, Reason.BAD_ENVELOPE, detail))
                continue
            ops.append(op)
            sources.append(record)
            origins[origin.name] = max(origins.get(origin.name, 0), origin.offset + 1)
        self._origins = origins
        return ops, sources, bad

    def _hold_back_while_backlogged(self, consumer) -> None:
        """A replica that is not ready answers no router, so it catches up at full speed; once ready it holds back."""
        if self.lag and max(self.lag.values()) > self.ready_max_lag:
            paused = consumer.paused()
            if paused:
                consumer.resume(*paused)
            return
        super()._hold_back_while_backlogged(consumer)

    def _deliver(self, ops: list[Upsert | Delete], sources: list[ConsumerRecord], producer: KafkaProducer) -> int:
        searchable_at = super()._deliver(ops, sources, producer)
        self.stats.record_sources(self._origins)
        return searchable_at

    def _send_dead_letters(self, dead: list[DeadLetter], producer: KafkaProducer) -> None:
        for letter in dead:
            record = letter.record
            log.warning("skipping record %s/%d@%d: %s", record.topic, record.partition, record.offset, letter.detail)
