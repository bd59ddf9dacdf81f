"""The indexing consumer: poll a batch, index it, then commit its offsets.

Ack lifecycle, per batch:

1. ``poll`` up to ``max_poll_records`` messages from the product and post topics.
2. Decode each envelope; events that fail (bad envelope, wrong topic, bad image)
   go to the dead-letter topic with the reason in the ``lookstream.reason`` header,
   and the producer is flushed so they are durable there.
3. The rest go through the pipeline and into the shards in one ``apply``.
4. Only then are the offsets committed (last offset + 1 per partition).

If step 2 or 3 fails (broker down, model error), nothing is committed, the
consumer seeks back to the last applied offsets and retries the batch after a
pause: no event is lost and, as upserts are idempotent, none is applied twice
in effect.

The shards live in memory until checkpoints exist (docs/architecture.md): when
this node is assigned a partition it holds nothing for, it replays the
partition from the beginning instead of trusting the group's committed offset,
since the vectors of those earlier events are not in its shards.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import OffsetAndMetadata

from indexer.config import KafkaSettings
from indexer.events import InvalidEvent, decode_event, now_ms
from indexer.pipeline import Delete, Pipeline, Rejected, Upsert
from indexer.shards import ShardSet
from indexer.stats import IngestStats

log = logging.getLogger(__name__)

REASON_HEADER = "lookstream.reason"
SOURCE_HEADER = "lookstream.source"
RETRY_PAUSE_S = 1.0


@dataclass(frozen=True)
class DeadLetter:
    record: ConsumerRecord
    reason: str


class _ReplayUnknownPartitions(ConsumerRebalanceListener):
    def __init__(self, consumer: KafkaConsumer, applied: dict[TopicPartition, int]) -> None:
        self.consumer = consumer
        self.applied = applied

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        pass  # every applied batch is already committed

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        for tp in assigned:
            if tp in self.applied:
                self.consumer.seek(tp, self.applied[tp])
            else:
                self.consumer.seek_to_beginning(tp)
        log.info("assigned partitions: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class IndexingConsumer:
    def __init__(self, kafka: KafkaSettings, pipeline: Pipeline, shards: ShardSet, stats: IngestStats) -> None:
        self.kafka = kafka
        self.pipeline = pipeline
        self.shards = shards
        self.stats = stats
        self.collection_of_topic = {kafka.topics.products: "products", kafka.topics.posts: "posts"}
        #: next offset to read per partition, for what is in the shards
        self.applied: dict[TopicPartition, int] = {}
        self.assigned = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="lookstream-consumer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to finish its batch and close; wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, stop: threading.Event) -> None:
        consumer = KafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            group_id=self.kafka.group_id,
            client_id="lookstream-indexer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.kafka.heartbeat_interval_ms,
            max_poll_records=self.kafka.max_poll_records,
            fetch_max_bytes=max(self.kafka.max_message_bytes, 50 * 1024 * 1024),
            max_partition_fetch_bytes=self.kafka.max_message_bytes,
        )
        producer = KafkaProducer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            client_id="lookstream-dead-letter",
            acks="all",
            enable_idempotence=self.kafka.enable_idempotence,
            max_request_size=self.kafka.max_message_bytes + 64 * 1024,
        )
        consumer.subscribe(
            [self.kafka.topics.products, self.kafka.topics.posts],
            listener=_ReplayUnknownPartitions(consumer, self.applied),
        )
        try:
            while not stop.is_set():
                batch = consumer.poll(timeout_ms=self.kafka.poll_timeout_ms)
                if consumer.assignment():
                    self.assigned.set()
                records = [record for part in batch.values() for record in part]
                if not records:
                    continue
                try:
                    self._index(records, producer)
                    consumer.commit(
                        {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in self._last_offsets(records).items()}
                    )
                except Exception as e:
                    log.exception("batch failed; retrying from the last applied offsets")
                    self.stats.record_error(f"{type(e).__name__}: {e}")
                    self._rewind(consumer, batch.keys())
                    stop.wait(RETRY_PAUSE_S)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=5)

    def _index(self, records: list[ConsumerRecord], producer: KafkaProducer) -> None:
        dead: list[DeadLetter] = []
        events, sources = [], []
        for record in records:
            try:
                event = decode_event(record.value)
                if event.collection != self.collection_of_topic[record.topic]:
                    raise InvalidEvent(f"{event.type} event does not belong on topic {record.topic}")
            except InvalidEvent as e:
                dead.append(DeadLetter(record, str(e)))
                continue
            events.append(event)
            sources.append(record)

        ops: list[Upsert | Delete] = []
        for record, outcome in zip(sources, self.pipeline.process(events), strict=True):
            if isinstance(outcome, Rejected):
                dead.append(DeadLetter(record, outcome.reason))
            else:
                ops.append(outcome)

        self._send_dead_letters(dead, producer)
        self.shards.apply(ops)
        searchable_at = now_ms()
        offsets = self._last_offsets(records)
        self.applied.update(offsets)
        self.stats.record_batch(
            consumed=len(records),
            indexed=sum(isinstance(op, Upsert) for op in ops),
            deleted=sum(isinstance(op, Delete) for op in ops),
            rejected=[d.reason for d in dead],
            offsets={f"{tp.topic}/{tp.partition}": offset for tp, offset in offsets.items()},
            # from the producer's timestamp of the newest event to now: how stale the index was
            freshness_ms=searchable_at - max(op.ts for op in ops) if ops else None,
        )

    def _send_dead_letters(self, dead: list[DeadLetter], producer: KafkaProducer) -> None:
        if not dead:
            return
        futures = []
        for letter in dead:
            record = letter.record
            log.warning("dead-lettering %s/%d@%d: %s", record.topic, record.partition, record.offset, letter.reason)
            headers = [
                *(record.headers or []),
                (REASON_HEADER, letter.reason.encode()),
                (SOURCE_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode()),
            ]
            futures.append(
                producer.send(
                    self.kafka.topics.dead_letter,
                    key=record.key,
                    value=record.value,
                    headers=headers,
                )
            )
        producer.flush()
        for future in futures:
            future.get(timeout=0)  # raises if the broker refused it: then nothing is committed

    @staticmethod
    def _last_offsets(records: list[ConsumerRecord]) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        return offsets

    def _rewind(self, consumer: KafkaConsumer, partitions) -> None:
        for tp in partitions:
            if tp in self.applied:
                consumer.seek(tp, self.applied[tp])
            else:
                consumer.seek_to_beginning(tp)
