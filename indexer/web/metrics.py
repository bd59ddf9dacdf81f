"""Prometheus metrics of a node, served at ``GET /metrics``.

Counts, lag and shard sizes are read from the node when Prometheus scrapes (a
custom collector), so the consumer's hot path only feeds the two histograms:
freshness (event timestamp -> searchable) and query latency per stage. Each
node has its own registry, so tests can build many apps in one process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from indexer.node import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Freshness is live for events newer than the consumer of the active generation, catch-up for replays.
FRESHNESS_PHASES = ("live", "catch-up")


class _NodeCollector:
    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self):
        generation = self.node.active
        counts = generation.stats.counters()
        for name, help_text in (
            ("consumed", "events read from Kafka"),
            ("indexed", "upserts applied"),
            ("deleted", "deletes applied"),
        ):
            yield CounterMetricFamily(f"lookstream_events_{name}", help_text, value=counts[name])
        rejected = CounterMetricFamily(
            "lookstream_events_rejected", "events sent to the dead-letter topic", labels=["reason"]
        )
        for reason, count in counts["rejected"].items():
            rejected.add_metric([reason], count)
        yield rejected
        lag = GaugeMetricFamily(
            "lookstream_consumer_lag", "messages behind the partition's high watermark", labels=["topic", "partition"]
        )
        consumer = generation.consumer
        for (topic, partition), value in consumer.lag.items() if consumer is not None else ():
            lag.add_metric([topic, str(partition)], value)
        yield lag
        failures = CounterMetricFamily(
            "lookstream_consumer_failures",
            "consumer failures: loop (the client was rebuilt), batch (retried with backoff), "
            "dead-letter (the broker refused a dead letter; the batch was retried)",
            labels=["what"],
        )
        if consumer is not None:
            for what, count in consumer.health.failure_counts().items():
                failures.add_metric([what], count)
        yield failures
        vectors = GaugeMetricFamily(
            "lookstream_shard_vectors", "live vectors per shard", labels=["collection", "category"]
        )
        for size in generation.shards.sizes():
            vectors.add_metric([size["collection"], size["category"]], size["vectors"])
        yield vectors


class Metrics:
    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry()
        self.freshness = Histogram(
            "lookstream_freshness_seconds",
            "event timestamp to searchable; phase: live, or catch-up for replays (a restart, a new generation)",
            labelnames=["phase"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        for phase in FRESHNESS_PHASES:  # both series exist from the start, at zero
            self.freshness.labels(phase)
        self.query = Histogram(
            "lookstream_query_stage_seconds",
            "query latency per stage",
            labelnames=["stage"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.registry.register(_NodeCollector(node))

    def observe_freshness(self, seconds: float, phase: str) -> None:
        self.freshness.labels(phase).observe(seconds)

    def observe_query(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.query.labels(stage).observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
