import asyncio
import time

import pytest

from indexer.topics import ensure_topics

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
