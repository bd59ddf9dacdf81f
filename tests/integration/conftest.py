import asyncio
import time

import pytest

from indexer.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(kafka_settings):
    ensure_topics(kafka_settings.kafka)
    return kafka_settings


async def eventually(check, timeout: float = 30.0, interval: float = 0.2):
    """Await ``check()`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; last result {result!r}")
        await asyncio.sleep(interval)


def read_dead_letters(kafka, expected: int) -> dict[str, tuple[bytes | None, dict[str, bytes]]]:
    """The dead-letter topic's messages by key: (value, headers); stops at ``expected`` keys or after 10 s."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        kafka.topics.dead_letter,
        bootstrap_servers=kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        consumer_timeout_ms=10_000,
        max_partition_fetch_bytes=2_000_000,
    )
    letters = {}
    for message in consumer:
        letters[message.key.decode()] = (message.value, dict(message.headers))
        if len(letters) == expected:
            break
    consumer.close()
    return letters
