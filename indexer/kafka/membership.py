"""Cluster membership on a Kafka topic: serve replicas announce themselves, routers listen.

Every ``cluster.announce_interval_s`` a serve node publishes an announcement
keyed by its URL to ``cluster.membership_topic``: a msgpack map with ``v`` (1),
``url``, ``generation`` (the id of the generation it answers from),
``retiring`` (the generation it answered from before its last flip, answered
still for a while, or nil), ``partitions`` (the records-topic partitions it
serves), ``total`` (how many the topic has), ``ready`` (what its ``/readyz``
says), ``ts`` (ms since epoch) and ``ttl_ms``. A router reads the topic from the beginning and keeps, per URL,
the newest announcement; one older than its ``ttl_ms`` is gone (a replica
that died without a word). A node that stops cleanly announces ``ready``
false with ``ttl_ms`` 0, so that routers drop it at once.

The same :class:`Member` is what a router builds from a statically listed
replica's ``/readyz`` (indexer/web/router.py), so both ways of finding
replicas feed one table.

Expiry compares the announcer's clock with the reader's: the machines'
clocks must agree to well within the TTL (NTP does).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from indexer.config import ClusterSettings, KafkaSettings

log = logging.getLogger(__name__)

ANNOUNCEMENT_VERSION = 1
#: The membership topic keeps the newest announcement per URL (key), so a router starting up reads little.
TOPIC_CONFIGS = {"cleanup.policy": "compact"}


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Member:
    """What a serve replica says about itself."""

    url: str
    generation: str | None
    partitions: tuple[int, ...]
    total: int | None
    ready: bool
    ts: int  # ms since epoch, when it said so
    ttl_ms: int
    #: the generation it answered from before its last flip, still answered for routers that ask for it
    retiring: str | None = None

    def alive(self, at_ms: int | None = None) -> bool:
        return (now_ms() if at_ms is None else at_ms) - self.ts <= self.ttl_ms

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": ANNOUNCEMENT_VERSION,
                "url": self.url,
                "generation": self.generation,
                "partitions": list(self.partitions),
                "total": self.total,
                "ready": self.ready,
                "ts": self.ts,
                "ttl_ms": self.ttl_ms,
                "retiring": self.retiring,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, payload: bytes) -> Member:
        """Raises ValueError for what is not a v1 announcement."""
        try:
            body = msgpack.unpackb(payload, raw=False)
            if body["v"] != ANNOUNCEMENT_VERSION:
                raise ValueError(f"unknown announcement version {body['v']!r}")
            return cls(
                str(body["url"]),
                None if body["generation"] is None else str(body["generation"]),
                tuple(int(p) for p in body["partitions"]),
                None if body["total"] is None else int(body["total"]),
                bool(body["ready"]),
                int(body["ts"]),
                int(body["ttl_ms"]),
                None if body.get("retiring") is None else str(body["retiring"]),
            )
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"not an announcement: {e}") from e


class _Worker:
    """A daemon thread running ``_run`` until ``stop()``."""

    thread_name: str

    def __init__(self, kafka: KafkaSettings, cluster: ClusterSettings) -> None:
        self.kafka = kafka
        self.cluster = cluster
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        raise NotImplementedError


class Announcer(_Worker):
    """A serve node's thread that announces what ``describe()`` returns, every interval, until stopped."""

    thread_name = "lookstream-announcer"

    def __init__(self, kafka: KafkaSettings, cluster: ClusterSettings, describe: Callable[[], Member]) -> None:
        super().__init__(kafka, cluster)
        self.describe = describe

    def _run(self) -> None:
        producer = None
        while True:
            try:
                if producer is None:
                    producer = KafkaProducer(
                        bootstrap_servers=self.kafka.bootstrap_servers, client_id="lookstream-announcer", acks=1
                    )
                if self._stop.is_set():
                    # Leaving: routers forget this node now rather than after the TTL.
                    member = self.describe()
                    gone = dataclasses.replace(member, ready=False, ts=now_ms(), ttl_ms=0)
                    producer.send(self.cluster.membership_topic, key=gone.url.encode(), value=gone.encode())
                    producer.flush(timeout=5)
                    producer.close(timeout=5)
                    return
                member = self.describe()
                producer.send(self.cluster.membership_topic, key=member.url.encode(), value=member.encode())
            except Exception:  # the broker away: announce again later; routers expire us meanwhile
                log.warning("announcing this node failed; retrying", exc_info=True)
                if self._stop.is_set():
                    return
            self._stop.wait(self.cluster.announce_interval_s)


class Directory(_Worker):
    """A router's view of the membership topic: the newest announcement per URL, read by a thread."""

    thread_name = "lookstream-membership"

    def __init__(self, kafka: KafkaSettings, cluster: ClusterSettings) -> None:
        super().__init__(kafka, cluster)
        self._members: dict[str, Member] = {}

    def members(self) -> list[Member]:
        """Announced members whose announcement has not expired."""
        at = now_ms()
        return [m for m in list(self._members.values()) if m.alive(at)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._read()
            except Exception:
                log.warning("reading the membership topic failed; retrying", exc_info=True)
                self._stop.wait(self.cluster.announce_interval_s)

    def _read(self) -> None:
        topic = self.cluster.membership_topic
        consumer = KafkaConsumer(
            bootstrap_servers=self.kafka.bootstrap_servers,
            client_id="lookstream-router-membership",
            group_id=None,
            enable_auto_commit=False,
        )
        try:
            partitions = consumer.partitions_for_topic(topic)
            while not partitions:
                if self._stop.wait(0.5):
                    return
                partitions = consumer.partitions_for_topic(topic)
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            while not self._stop.is_set():
                for messages in consumer.poll(timeout_ms=500).values():
                    for message in messages:
                        try:
                            member = Member.decode(message.value)
                        except ValueError as e:
                            log.warning("skipping a membership message: %s", e)
                            continue
                        known = self._members.get(member.url)
                        if known is None or member.ts >= known.ts:
                            self._members[member.url] = member
        finally:
            consumer.close(autocommit=False)
