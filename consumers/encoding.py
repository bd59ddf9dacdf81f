"""The encoder role: events in, records out (``lookstream encode``).

The same loop as the indexing consumer (consumers/indexing.py: poll, decode,
dead letters, the pipeline), but each batch's operations are published to the
generation's records topic (consumers/records_topic.py) instead of applied to
shards. Ack lifecycle:

1. poll a batch from the product and post topics as a member of the encoders'
   group (``<kafka.group_id>.encode.<generation>``);
2. dead letters are sent and acknowledged, as on a node;
3. every operation is sent to the records topic keyed by collection/id, and the
   producer is flushed: the batch counts only once the broker acknowledged all;
4. then the batch's offsets are committed.

A crash between 3 and 4 re-encodes the batch on whichever encoder gets the
partitions next: records are published at least once, and replicas absorb the
duplicates because an upsert by id is idempotent. Nothing is committed before
its records are acknowledged, so nothing is lost.
"""

from __future__ import annotations

import logging

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from consumers.indexing import IndexingConsumer
from consumers.records_topic import Source, encode_record, record_key
from consumers.stats import IngestStats
from indexer.config import ClusterSettings, IngestSettings, KafkaSettings
from indexer.events import now_ms
from indexer.pipeline import Pipeline
from indexer.store.records import Delete, Upsert

log = logging.getLogger(__name__)


def encoder_group(group_id: str, generation: str) -> str:
    """The consumer group of a generation's encoders (apart from ``lookstream up`` nodes' groups)."""
    return f"{group_id}.encode.{generation}"


class _ForgetRevoked(ConsumerRebalanceListener):
    """Newly assigned partitions start from the group's committed offsets (Kafka's default position).

    What this encoder applied to a partition it loses is forgotten, so that a
    later retry never seeks back behind what another encoder committed since.
    """

    def __init__(self, owner: EncodingConsumer) -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self.owner.applied.pop(tp, None)

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("encoding partitions: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class EncodingConsumer(IndexingConsumer):
    """Encodes the events of its share of the partitions and publishes the records; holds no shards."""

    client_id = "lookstream-encoder"

    def __init__(
        self,
        kafka: KafkaSettings,
        cluster: ClusterSettings,
        pipeline: Pipeline,
        stats: IngestStats,
        generation: str,
        records_topic: str,
        ingest: IngestSettings | None = None,
    ) -> None:
        super().__init__(kafka, pipeline, None, stats, ingest=ingest)
        self.cluster = cluster
        self.generation = generation
        self.records_topic = records_topic
        self._records_producer: KafkaProducer | None = None

    def _subscribe(self, consumer: KafkaConsumer) -> None:
        consumer.subscribe([self.kafka.topics.products, self.kafka.topics.posts], listener=_ForgetRevoked(self))

    def _seek_to_applied(self, consumer: KafkaConsumer, partitions) -> None:
        """After a failed batch: back to what this encoder published, else to the group's committed offset."""
        for tp in partitions:
            if tp in self.applied:
                consumer.seek(tp, self.applied[tp])
            else:
                committed = consumer.committed(tp)
                if committed is None:
                    consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, committed)

    def _producer(self) -> KafkaProducer:
        if self._records_producer is None:
            self._records_producer = KafkaProducer(
                bootstrap_servers=self.kafka.bootstrap_servers,
                client_id="lookstream-encoder-records",
                acks="all",
                enable_idempotence=self.kafka.enable_idempotence,
                # a record's changes stay in order even when a request is retried (an upsert retried
                # after the delete that followed it would bring the record back on every replica):
                # idempotence orders retries where it is on, else one request is in flight at a time
                max_in_flight_requests_per_connection=5 if self.kafka.enable_idempotence else 1,
                max_request_size=self.kafka.produce_request_bytes,
                compression_type=self.cluster.compression,
                linger_ms=5,
            )
        return self._records_producer

    def _deliver(self, ops: list[Upsert | Delete], sources: list[ConsumerRecord], producer: KafkaProducer) -> int:
        """Publish the batch's records and wait until the broker has all of them; a refusal fails the batch."""
        records = self._producer()
        futures = [
            records.send(
                self.records_topic,
                key=record_key(op.collection, op.record_id),
                value=encode_record(
                    op, Source(src.topic, src.partition, src.offset), self.generation, self.cluster.vector_dtype
                ),
            )
            for op, src in zip(ops, sources, strict=True)
        ]
        records.flush()
        for future in futures:
            future.get(timeout=0)  # raises if the broker refused one: the batch is retried, nothing committed
        return now_ms()

    def run(self, stop) -> None:
        try:
            super().run(stop)
        finally:
            if self._records_producer is not None:
                self._records_producer.close(timeout=5)
                self._records_producer = None
