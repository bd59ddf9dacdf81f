"""The consumer loop's supervision, with a fake Kafka client (the real broker is in tests/integration)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from kafka.errors import UnsupportedCodecError

import consumers.indexing as indexing
from consumers.indexing import IndexingConsumer
from consumers.stats import IngestStats
from indexer.config import IngestSettings, KafkaSettings
from indexer.store.shards import ShardSet


class FakeConsumer:
    """Polls that raise as kafka-python does on a batch compressed with a codec it lacks."""

    polls = 0
    fail_polls = 0
    created = 0

    def __init__(self, **config) -> None:
        FakeConsumer.created += 1

    def subscribe(self, topics, listener=None) -> None:
        pass

    def poll(self, timeout_ms: int):
        FakeConsumer.polls += 1
        if FakeConsumer.polls <= FakeConsumer.fail_polls:
            raise UnsupportedCodecError("Libraries for snappy compression codec not found")
        time.sleep(0.01)
        return {}

    def assignment(self):
        return set()

    def paused(self):
        return set()

    def metrics(self, raw=False):
        return {}

    def close(self, autocommit=False) -> None:
        pass


class FakeProducer:
    def __init__(self, **config) -> None:
        pass

    def close(self, timeout=None) -> None:
        pass


@pytest.fixture
def fake_kafka(monkeypatch):
    monkeypatch.setattr(indexing, "KafkaConsumer", FakeConsumer)
    monkeypatch.setattr(indexing, "KafkaProducer", FakeProducer)
    FakeConsumer.polls = FakeConsumer.created = 0
    return FakeConsumer


def consumer_with(ingest: IngestSettings) -> IndexingConsumer:
    return IndexingConsumer(KafkaSettings(), pipeline=None, shards=ShardSet(4), stats=IngestStats(), ingest=ingest)


def wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        time.sleep(0.01)


def test_a_failing_poll_restarts_the_loop_and_the_streak_ends_when_polls_work(fake_kafka):
    fake_kafka.fail_polls = 3
    consumer = consumer_with(IngestSettings(retry_backoff_s=0.05, unready_after_failures=2))
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: fake_kafka.polls > 10)
        assert fake_kafka.created == 4  # rebuilt after each of the 3 failures
        assert consumer.health.failures["loop"] == 3 and consumer.health.consecutive_failures == 0
        assert consumer.health.problems(waiting=0) == [] and consumer.health.gave_up is None
    finally:
        stop.set()
        thread.join()


def test_a_loop_that_cannot_recover_gives_up_and_says_why(fake_kafka):
    fake_kafka.fail_polls = 10**9
    consumer = consumer_with(IngestSettings(retry_backoff_s=0.01, unready_after_failures=2, give_up_after_s=0.3))
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert "UnsupportedCodecError" in consumer.health.gave_up
    assert consumer.health.problems(waiting=0) == [consumer.health.gave_up]


class HeartbeatMetric:
    """kafka-python's 'last-heartbeat-seconds-ago': computed when read."""

    def __init__(self) -> None:
        self.last_send = time.monotonic()

    def value(self) -> float:
        return time.monotonic() - self.last_send


class LosesTheBroker(FakeConsumer):
    """The first client polls with fresh heartbeats, then its poll fails; the next hangs in its bootstrap."""

    reconnect = threading.Event()

    def __init__(self, **config) -> None:
        super().__init__(**config)
        if FakeConsumer.created > 1:
            LosesTheBroker.reconnect.wait()  # as kafka-python's bootstrap waits for a broker that is away
        self.heartbeat = HeartbeatMetric()

    def poll(self, timeout_ms: int):
        self.heartbeat.last_send = time.monotonic()
        if FakeConsumer.polls >= 5:
            raise ConnectionError("coordinator dead")
        return super().poll(timeout_ms)

    def metrics(self, raw=False):
        return {type("Name", (), {"name": "last-heartbeat-seconds-ago"})(): self.heartbeat}


def test_the_heartbeat_age_grows_while_the_loop_rebuilds_its_client(monkeypatch):
    """CI saw /readyz stay 200 through a broker outage: the age was read at the last poll, and none came."""
    monkeypatch.setattr(indexing, "KafkaConsumer", LosesTheBroker)
    monkeypatch.setattr(indexing, "KafkaProducer", FakeProducer)
    FakeConsumer.polls = FakeConsumer.created = FakeConsumer.fail_polls = 0
    LosesTheBroker.reconnect.clear()
    consumer = consumer_with(IngestSettings(retry_backoff_s=0.01, unready_after_failures=5))
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: FakeConsumer.created == 2)
        time.sleep(0.3)
        assert consumer.heartbeat_age_s >= 0.3
        assert consumer.health.consecutive_failures == 1  # too few to say so: the heartbeat must
    finally:
        stop.set()
        LosesTheBroker.reconnect.set()
        thread.join()


def test_unready_after_consecutive_failures_and_when_stalled():
    from consumers.health import ConsumerHealth

    health = ConsumerHealth(IngestSettings(unready_after_failures=2, stall_after_s=0.05))
    health.failed("batch", "MemoryError", counts_towards_giving_up=False)
    assert health.problems(waiting=0) == []
    delay = health.failed("batch", "MemoryError", counts_towards_giving_up=False)
    assert delay == 2.0 and "failed 2 times in a row: MemoryError" in health.problems(waiting=0)[0]
    assert not health.should_give_up()  # transient failures never end in giving up
    health.succeeded()
    time.sleep(0.1)
    assert health.problems(waiting=0) == []
    assert "no event applied for" in health.problems(waiting=5)[0]


async def test_the_app_reports_a_consumer_that_gave_up_and_stops(fake_kafka, aiohttp_client, default_models, tmp_path):
    from indexer.config import Settings
    from indexer.node import Node
    from indexer.web.app import create_app

    fake_kafka.fail_polls = 10**9
    settings = Settings.model_validate(
        {"data_dir": str(tmp_path), "ingest": {"retry_backoff_s": 0.01, "give_up_after_s": 0.2}}
    )
    reasons: list[str] = []
    client = await aiohttp_client(create_app(Node.create(settings, default_models), on_fatal=reasons.append))
    for _ in range(100):
        if reasons:
            break
        await asyncio.sleep(0.1)
    assert len(reasons) == 1 and "UnsupportedCodecError" in reasons[0]
    response = await client.get("/readyz")
    assert response.status == 503 and reasons[0] in (await response.json())["reasons"]


class PausableClient:
    """The part of a KafkaConsumer that holding back uses: its assignment, and pausing partitions."""

    def __init__(self, partitions: set) -> None:
        self.partitions, self.held = partitions, set()

    def assignment(self):
        return set(self.partitions)

    def paused(self):
        return set(self.held)

    def pause(self, *partitions):
        self.held |= set(partitions)

    def resume(self, *partitions):
        self.held -= set(partitions)


def test_fetching_pauses_while_a_rebuild_lags_far_behind_and_resumes_once_it_is_in(monkeypatch):
    """A bulk load outruns the builder: the consumer holds back instead of letting exact search grow."""
    from indexer.config import ShardSettings
    from indexer.store import shards as shards_module
    from tests.support.shards import fill, unit_vectors

    release = threading.Event()
    real_build = shards_module.build_from_segments
    monkeypatch.setattr(
        shards_module, "build_from_segments", lambda *a, **k: (release.wait(10), real_build(*a, **k))[1]
    )
    settings = ShardSettings(seal_min_rows=100, growing_max_rows=100, growing_hold_factor=2, hnsw_m=8)
    shards = ShardSet(16, settings)
    consumer = IndexingConsumer(KafkaSettings(), pipeline=None, shards=shards, stats=IngestStats())

    client = PausableClient({("products", 0), ("posts", 0)})
    fill(shards, unit_vectors(120), batch=120)  # sealing starts, and waits
    fill(shards, unit_vectors(60, seed=1), start=120, batch=60)  # 180 unsealed rows: under 2 x 100
    consumer._hold_back_while_backlogged(client)
    assert client.held == set()
    fill(shards, unit_vectors(60, seed=2), start=180, batch=60)  # 240: over
    consumer._hold_back_while_backlogged(client)
    assert client.held == client.partitions
    release.set()
    shards.wait_for_rebuilds(timeout=30)
    consumer._hold_back_while_backlogged(client)
    assert client.held == set()
    shards.close()


def test_a_replica_catching_up_does_not_hold_back_and_holds_back_once_ready(monkeypatch):
    """Routers ask only ready replicas: one far behind gains nothing by sparing its queries."""
    from consumers.replica import ReplicaConsumer

    shards = ShardSet(4)
    monkeypatch.setattr(shards, "backlogged", lambda: True)
    replica = ReplicaConsumer(KafkaSettings(), "records", None, shards, IngestStats(), ready_max_lag=1000)

    client = PausableClient({("records", 0)})
    replica.lag = {("records", 0): 50_000}
    replica._hold_back_while_backlogged(client)
    assert client.held == set()
    replica.lag = {("records", 0): 10}
    replica._hold_back_while_backlogged(client)
    assert client.held == {("records", 0)}
    shards.close()
