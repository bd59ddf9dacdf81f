"""Publish events to Kafka keyed by id, with a progress bar and a closing summary."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from kafka import KafkaProducer
from tqdm import tqdm

from indexer.config import KafkaSettings
from indexer.events import Event, encode_event
from producers.folders import Skipped


@dataclass
class Summary:
    sent: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"sent {self.sent}, skipped {len(self.skipped)}"]
        for reason, count in Counter(s.reason for s in self.skipped).most_common():
            examples = [s.path.name for s in self.skipped if s.reason == reason][:3]
            out.append(f"  {count} skipped: {reason} (e.g. {', '.join(examples)})")
        return out


def make_producer(kafka: KafkaSettings) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=kafka.bootstrap_servers,
        client_id="lookstream-producer",
        acks="all",
        enable_idempotence=kafka.enable_idempotence,
        max_request_size=kafka.produce_request_bytes,
        linger_ms=5,
    )


def publish(items: Iterable[Event | Skipped], topic: str, producer: KafkaProducer, progress: bool = True) -> Summary:
    """Send every event, wait until the broker acknowledged all of them, and count."""
    summary = Summary()
    futures = []
    for item in tqdm(items, unit="file", disable=not progress, desc=topic):
        if isinstance(item, Skipped):
            summary.skipped.append(item)
            continue
        futures.append(producer.send(topic, key=item.id.encode(), value=encode_event(item)))
    producer.flush()
    for future in futures:
        future.get(timeout=30)  # raises KafkaError if the broker refused one
        summary.sent += 1
    return summary
