"""The indexing consumer: poll a batch, index it, checkpoint, then commit.

Ack lifecycle:

1. ``poll`` up to ``max_poll_records`` messages from the product and post topics.
2. Decode each envelope; events that fail (bad envelope, wrong topic, bad image)
   go to the dead-letter topic with the reason in the ``lookstream.reason`` header,
   and the producer is flushed so they are durable there.
3. The rest go through the pipeline and into the shards in one ``apply``; the
   partition's *applied* offset moves past the batch.
4. Every ``checkpoint_interval_s`` the shards and the applied offsets of that
   moment are written to a checkpoint in the background; once it is durable,
   those offsets are committed to Kafka. Before partitions are revoked and at
   shutdown a checkpoint is written and committed synchronously.

On start the node restores its newest checkpoint and seeks every assigned
partition to the offset the checkpoint holds; a partition the checkpoint does
not know is replayed from the beginning, because its events are not in the
shards. Kafka's committed offsets are never ahead of a durable checkpoint.

Failures (docs/reliability.md):

* one event's failure is that event's alone: the pipeline turns it into a
  dead letter with a reason kind (:class:`~indexer.failures.Reason`);
* a batch that fails as a whole for a reason that is not an event's (the
  dead-letter send refused, out of memory, models failing on every event) is
  retried from the applied offsets with exponential backoff; nothing is
  committed meanwhile and nothing is dead-lettered for it;
* an exception that escapes the loop itself (the client, a poll) is logged and
  counted, and the loop is rebuilt with backoff. ``/readyz`` turns 503 after
  ``ingest.unready_after_failures`` failures in a row; a failure streak that
  lasts ``ingest.give_up_after_s`` without a successful poll (transient batch
  failures such as a broker outage excepted) stops the consumer for good, and
  ``lookstream up`` exits non-zero so that a supervisor restarts it.

Without a checkpointer (tests of the API alone, and the encoder) offsets are committed after each batch.

The scale-out roles reuse this loop through four methods: ``_client_config``
(the client's settings), ``_subscribe`` (how partitions are taken),
``_operations`` (messages to operations, or dead letters) and ``_deliver``
(where operations go). consumers/encoding.py publishes them to a records
topic; consumers/replica.py reads that topic without a group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from consumers.health import ConsumerHealth
from consumers.stats import IngestStats
from indexer.config import IngestSettings, KafkaSettings
from indexer.events import InvalidEvent, decode_event, now_ms
from indexer.failures import Reason, describe, is_transient
from indexer.pipeline import Pipeline, Rejected
from indexer.store.checkpoint import Checkpointer
from indexer.store.records import Delete, Upsert
from indexer.store.shards import ShardSet
from indexer.store.thumbnails import ThumbnailStore, store_thumbnails

log = logging.getLogger(__name__)

#: The reason kind, one of :class:`~indexer.failures.Reason`.
REASON_HEADER = "lookstream.reason"
#: What exactly went wrong, in words (free text: never a metric label).
DETAIL_HEADER = "lookstream.reason-detail"
SOURCE_HEADER = "lookstream.source"
#: On a dead letter whose value was too large to forward: the dropped value's size in bytes.
DROPPED_HEADER = "lookstream.dropped-bytes"
MAX_DETAIL_BYTES = 1024


@dataclass(frozen=True)
class DeadLetter:
    record: ConsumerRecord
    kind: Reason
    detail: str
    keep_value: bool = True  # False for a value too large to forward: only its headers and size go on

    def headers(self) -> list[tuple[str, bytes]]:
        record = self.record
        headers = [
            *(record.headers or []),
            (REASON_HEADER, self.kind.value.encode()),
            (DETAIL_HEADER, self.detail.encode()[:MAX_DETAIL_BYTES]),
            (SOURCE_HEADER, f"{record.topic}/{record.partition}/{record.offset}".encode()),
        ]
        if not self.keep_value:
            headers.append((DROPPED_HEADER, str(len(record.value or b"")).encode()))
        return headers


class _CheckpointingListener(ConsumerRebalanceListener):
    """Checkpoint before partitions go; seek new ones to what the shards hold."""

    def __init__(self, owner: IndexingConsumer, consumer: KafkaConsumer) -> None:
        self.owner = owner
        self.consumer = consumer

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # kafka-python 3 runs listeners on its IO thread, where a blocking commit is refused.
        # The checkpoint alone is what a restart (or the next owner, on shared storage) resumes
        # from; the committed offsets catch up with the next scheduled checkpoint.
        if revoked:
            self.owner.checkpoint()

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.owner._seek_to_applied(self.consumer, assigned)
        log.info("assigned partitions: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class IndexingConsumer:
    def __init__(
        self,
        kafka: KafkaSettings,
        pipeline: Pipeline | None,
        shards: ShardSet | None,
        stats: IngestStats,
        checkpointer: Checkpointer | None = None,
        restored_offsets: dict[str, int] | None = None,
        thumbnails: ThumbnailStore | None = None,
        ingest: IngestSettings | None = None,
    ) -> None:
        self.kafka = kafka
        self.health = ConsumerHealth(ingest or IngestSettings())
        #: events produced before this moment are replays (a restart, a new generation), not live
        self.started_ms = now_ms()
        self.pipeline = pipeline
        self.shards = shards
        self.stats = stats
        self.checkpointer = checkpointer
        self.thumbnails = thumbnails
        self.collection_of_topic = {kafka.topics.products: "products", kafka.topics.posts: "posts"}
        #: next offset to read per partition, for what is in the shards
        self.applied: dict[TopicPartition, int] = {
            _partition(name): offset for name, offset in (restored_offsets or {}).items()
        }
        self.assigned = threading.Event()
        #: (topic, partition) -> messages not yet applied, replaced whole after each poll
        self.lag: dict[tuple[str, int], int] = {}
        #: the live client's "last-heartbeat-seconds-ago" metric, and the monotonic time of the
        #: last heartbeat a poll saw (what is left to go by while no client is up)
        self._heartbeat_metric = None
        self._last_heartbeat: float | None = None
        self._stop = threading.Event()
        self._checkpoint_requests: queue.SimpleQueue[Future] = queue.SimpleQueue()
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
    def heartbeat_age_s(self) -> float | None:
        """Seconds since the last heartbeat to the group: grows while the broker is away.

        Read live from the client's metric (its heartbeats go on during a long
        batch); while the loop is down and rebuilding its client, counted from
        the last heartbeat a poll saw, so it grows then too.
        """
        metric = self._heartbeat_metric
        if metric is not None:
            age = metric.value()
            if age < 1e9:  # before any heartbeat it counts from the epoch
                return age
        return None if self._last_heartbeat is None else time.monotonic() - self._last_heartbeat

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop``; rebuild the client with backoff whenever the loop itself fails."""
        while not stop.is_set():
            try:
                self._consume(stop)
                return
            except Exception as e:
                delay = self.health.failed("loop", describe(e), counts_towards_giving_up=True)
                if self.health.should_give_up():
                    log.error("the consumer gives up: %s", self.health.give_up(), exc_info=e)
                    return
                log.exception("the consumer loop failed; restarting it in %.0f s", delay)
                stop.wait(delay)

    #: The Kafka client id; subclasses (the encoder, a serve replica) name themselves.
    client_id = "lookstream-indexer"

    def _client_config(self) -> dict:
        """The KafkaConsumer's settings."""
        return {
            "bootstrap_servers": self.kafka.bootstrap_servers,
            "group_id": self.kafka.group_id,
            "client_id": self.client_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": self.kafka.session_timeout_ms,
            "heartbeat_interval_ms": self.kafka.heartbeat_interval_ms,
            "max_poll_records": self.kafka.max_poll_records,
            "fetch_max_wait_ms": self.kafka.fetch_max_wait_ms,
            "fetch_max_bytes": max(self.kafka.max_message_bytes, 50 * 1024 * 1024),
            "max_partition_fetch_bytes": self.kafka.max_message_bytes,
        }

    def _subscribe(self, consumer: KafkaConsumer) -> None:
        """Join the group on the product and post topics; partitions come and go with rebalances."""
        consumer.subscribe(
            [self.kafka.topics.products, self.kafka.topics.posts],
            listener=_CheckpointingListener(self, consumer),
        )

    def _consume(self, stop: threading.Event) -> None:
        consumer = KafkaConsumer(**self._client_config())
        try:
            producer = KafkaProducer(
                bootstrap_servers=self.kafka.bootstrap_servers,
                client_id="lookstream-dead-letter",
                acks="all",
                enable_idempotence=self.kafka.enable_idempotence,
                max_request_size=self.kafka.produce_request_bytes,
            )
        except Exception:
            consumer.close(autocommit=False)
            raise
        try:
            self._subscribe(consumer)
            while not stop.is_set():
                self._hold_back_while_backlogged(consumer)
                batch = consumer.poll(timeout_ms=self.kafka.poll_timeout_ms)
                self._after_poll(consumer)
                records = [record for part in batch.values() for record in part]
                try:
                    if records:
                        self._index(records, producer)
                        self.health.progressed()
                        if self.checkpointer is None:
                            self._commit(consumer, self._last_offsets(records))
                    if self.shards is not None:
                        self.shards.maintain()
                    self._checkpoint_on_schedule(consumer)
                    self._answer_checkpoint_requests(consumer)
                    if records:
                        self.health.succeeded()
                except Exception as e:
                    transient = is_transient(e)
                    delay = self.health.failed("batch", describe(e), counts_towards_giving_up=not transient)
                    log.exception("batch failed; retrying from the last applied offsets in %.0f s", delay)
                    self._seek_to_applied(consumer, batch.keys())
                    if self.health.should_give_up():
                        raise
                    stop.wait(delay)
            if self.checkpointer is not None and consumer.assignment():
                self.checkpoint_and_commit(consumer)
        finally:
            self._heartbeat_metric = None  # a closed client's heartbeats no longer count
            consumer.close(autocommit=False)
            producer.close(timeout=5)

    def _hold_back_while_backlogged(self, consumer: KafkaConsumer) -> None:
        """Pause fetching while the shards' unsealed rows are far past their bound, resume once a rebuild is in.

        Polling goes on meanwhile (the group keeps this member), and the
        loop's maintain() installs the rebuild; the wait is on purpose, so it
        is not a stall.
        """
        if self.shards is None:
            return
        paused = consumer.paused()
        if self.shards.backlogged():
            held = consumer.assignment() - paused
            if held:
                log.info("holding back %d partitions until a shard rebuild is in", len(held))
                consumer.pause(*held)
            self.health.progressed()
        elif paused:
            consumer.resume(*paused)

    def _after_poll(self, consumer: KafkaConsumer) -> None:
        """A poll returned: the loop works. Refresh what /readyz and /metrics read."""
        self.health.succeeded("loop")  # a failing batch keeps its own streak
        if self._heartbeat_metric is None:
            self._heartbeat_metric = _heartbeat_metric(consumer)
        age = self.heartbeat_age_s
        if age is not None:
            self._last_heartbeat = time.monotonic() - age
        if consumer.assignment():
            self.assigned.set()
            self.lag = self._lag(consumer)
            if not any(self.lag.values()):
                self.health.progressed()  # nothing waits: not a stall

    def request_checkpoint(self) -> Future:
        """Ask the consumer thread for a checkpoint of the current moment (the admin snapshot route)."""
        future: Future = Future()
        self._checkpoint_requests.put(future)
        return future

    def _answer_checkpoint_requests(self, consumer: KafkaConsumer) -> None:
        while not self._checkpoint_requests.empty():
            future = self._checkpoint_requests.get()
            try:
                self.checkpoint_and_commit(consumer)
                future.set_result(self.checkpointer.last if self.checkpointer else None)
            except Exception as e:  # the caller gets the error; the loop goes on
                future.set_exception(e)

    def _lag(self, consumer: KafkaConsumer) -> dict[tuple[str, int], int]:
        """Messages between what is applied and the high watermark the last fetch reported."""
        lag = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag[(tp.topic, tp.partition)] = max(0, highwater - self.applied.get(tp, 0))
        return lag

    def _checkpoint_on_schedule(self, consumer: KafkaConsumer) -> None:
        if self.checkpointer is None:
            return
        done = self.checkpointer.finished()
        if done is not None:
            self._commit(consumer, {_partition(name): offset for name, offset in done.offsets.items()})
        if self.checkpointer.due(self.shards.view):
            self.checkpointer.start(self.shards.view, self._offset_names(), self.stats.counters())

    def checkpoint(self):
        """Write a checkpoint of this moment unless the last one already holds it."""
        if self.checkpointer is None:
            return None
        offsets = self._offset_names()
        last = self.checkpointer.last
        if last is not None and last.seq == self.shards.view.seq and last.offsets == offsets:
            return last
        done = self.checkpointer.write_now(self.shards.view, offsets, self.stats.counters())
        log.info("checkpoint %s written", done.path.name)
        return done

    def checkpoint_and_commit(self, consumer: KafkaConsumer) -> None:
        """At shutdown: a checkpoint of this moment, then commit what it holds."""
        done = self.checkpoint()
        if done is not None:
            self._commit(consumer, {_partition(name): offset for name, offset in done.offsets.items()})

    def _offset_names(self) -> dict[str, int]:
        return {f"{tp.topic}/{tp.partition}": offset for tp, offset in self.applied.items()}

    @staticmethod
    def _commit(consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Commit what a durable checkpoint holds; a failure only delays the group's view of progress.

        The node resumes from its checkpoint, not from these offsets, so a
        broker that is away when a commit is due loses nothing: the next
        checkpoint's commit carries the same offsets or later ones.
        """
        owned = consumer.assignment()
        mine = {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items() if tp in owned}
        if not mine:
            return
        try:
            consumer.commit(mine)
        except KafkaError as e:
            log.warning("committing offsets failed (%s); the checkpoint holds them, the next commit retries", e)

    def _index(self, records: list[ConsumerRecord], producer: KafkaProducer) -> None:
        ops, sources, dead = self._operations(records)
        self._send_dead_letters(dead, producer)
        searchable_at = self._deliver(ops, sources, producer)
        offsets = self._last_offsets(records)
        self.applied.update(offsets)
        self.stats.record_batch(
            consumed=len(records),
            indexed=sum(isinstance(op, Upsert) for op in ops),
            deleted=sum(isinstance(op, Delete) for op in ops),
            rejected=[d.kind for d in dead],
            offsets={f"{tp.topic}/{tp.partition}": offset for tp, offset in offsets.items()},
            # from each event's producer timestamp to now: how stale the index was; events
            # produced before this consumer started are replays and counted apart
            freshness_ms=[(searchable_at - op.ts, op.ts < self.started_ms) for op in ops],
        )

    def _deliver(self, ops: list[Upsert | Delete], sources: list[ConsumerRecord], producer: KafkaProducer) -> int:
        """Make a batch's operations take effect (here: apply them to the shards); the moment they did, in ms."""
        self.shards.apply(ops)
        searchable_at = now_ms()
        if self.thumbnails is not None:
            store_thumbnails(self.thumbnails, ops)
        return searchable_at

    def _operations(
        self, records: list[ConsumerRecord]
    ) -> tuple[list[Upsert | Delete], list[ConsumerRecord], list[DeadLetter]]:
        """Decode and run the pipeline: each message's operation (with the message it came from), or its dead letter."""
        dead: list[DeadLetter] = []
        events, sources = [], []
        for record in records:
            size = len(record.value or b"")
            if size > self.kafka.max_message_bytes:
                detail = f"message of {size} bytes is over the {self.kafka.max_message_bytes} byte limit"
                dead.append(DeadLetter(record, Reason.MESSAGE_TOO_LARGE, detail, keep_value=False))
                continue
            try:
                event = decode_event(record.value)
            except InvalidEvent as e:
                dead.append(DeadLetter(record, Reason.BAD_ENVELOPE, str(e)))
                continue
            except Exception as e:  # msgpack or validation raising what it should not: still this event's fault
                dead.append(DeadLetter(record, Reason.BAD_ENVELOPE, describe(e)))
                continue
            if event.collection != self.collection_of_topic[record.topic]:
                detail = f"{event.type} event does not belong on topic {record.topic}"
                dead.append(DeadLetter(record, Reason.WRONG_TOPIC, detail))
                continue
            events.append(event)
            sources.append(record)

        ops: list[Upsert | Delete] = []
        op_sources: list[ConsumerRecord] = []
        for record, outcome in zip(sources, self.pipeline.process(events), strict=True):
            if isinstance(outcome, Rejected):
                dead.append(DeadLetter(record, outcome.kind, outcome.detail))
            else:
                ops.append(outcome)
                op_sources.append(record)
        return ops, op_sources, dead

    def _send_dead_letters(self, dead: list[DeadLetter], producer: KafkaProducer) -> None:
        """Send and wait for the broker's acknowledgement: a batch counts as applied only after it."""
        if not dead:
            return
        futures = []
        for letter in dead:
            record = letter.record
            log.warning(
                "dead-lettering %s/%d@%d (%s): %s",
                record.topic,
                record.partition,
                record.offset,
                letter.kind,
                letter.detail,
            )
            value = record.value if letter.keep_value else None
            futures.append(
                producer.send(self.kafka.topics.dead_letter, key=record.key, value=value, headers=letter.headers())
            )
        try:
            producer.flush()
            for future in futures:
                future.get(timeout=0)  # raises if the broker refused it: then nothing is committed
        except Exception:
            self.health.count("dead-letter")
            raise

    @staticmethod
    def _last_offsets(records: list[ConsumerRecord]) -> dict[TopicPartition, int]:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        return offsets

    def _seek_to_applied(self, consumer: KafkaConsumer, partitions) -> None:
        """To the applied offsets (or the beginning, for partitions with nothing applied)."""
        for tp in partitions:
            if tp in self.applied:
                consumer.seek(tp, self.applied[tp])
            else:
                consumer.seek_to_beginning(tp)


def _partition(name: str) -> TopicPartition:
    topic, _, partition = name.rpartition("/")
    return TopicPartition(topic, int(partition))


def _heartbeat_metric(consumer: KafkaConsumer):
    """kafka-python's live 'last-heartbeat-seconds-ago' metric, or None where the client has none."""
    for name, metric in (consumer.metrics(raw=True) or {}).items():
        if name.name == "last-heartbeat-seconds-ago":
            return metric
    return None
