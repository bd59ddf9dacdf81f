"""Scale-out on one machine: encoder processes, a replica catching up, freshness through the roles.

    python -m benchmarks.scale_out --output benchmarks/results/scale-out.json [--profile quick|full]

* encoders: 1, 2 and 4 ``lookstream encode`` processes in one group, with the
  fixed-cost encoder (benchmarks/fixed_cost_encoder: a wait per batch, the
  shape of a GPU-bound model, so that the CPU cores of this machine are not
  what is measured). Events are published once every encoder has its
  partitions; the rate is records over the span of their broker timestamps,
  first to last. Goal: 4 encoders >= 0.85 x 4 x one encoder.
* catch-up: N synthetic records (one 192-d float32 item each, no thumbnail)
  are published to a records topic, then a ``lookstream serve`` process is
  started: records/s applied, and seconds from start until ``/readyz`` is 200
  with all N records searchable.
* freshness: one ``lookstream up`` node (the single-node path) beside an
  encoder, a replica and a router on the same topics; events published at a
  steady rate, each polled on ``GET /items/{id}`` of the three every
  ``POLL_S`` until found: event timestamp -> found, p50 and p99.
* float16: Recall@K and mAP of the default models on the offline evaluation
  set, the indexed vectors passed through the records codec in float32 and in
  float16.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np

from indexer.config import Settings
from indexer.events import Event, encode_event, now_ms
from indexer.kafka.broker import LocalBroker
from indexer.kafka.topics import ensure_topic, ensure_topics
from producers.publisher import make_producer
from tests.support.imagegen import encoded, product_image
from tests.support.processes import ROOT, free_port, kafka_toml, wait_until

PROFILES = {
    "quick": {"events": 3200, "cost_ms": 200, "records": 100_000, "freshness_events": 60},
    "full": {"events": 12800, "cost_ms": 200, "records": 1_000_000, "freshness_events": 300},
}
BATCH = 32
EVENT_PARTITIONS = 8
POLL_S = 0.025
PLUGIN = Path(__file__).parent / "fixed_cost_encoder"
LOOKSTREAM = [sys.executable, "-m", "indexer"]


def settings_for(bootstrap: str, work: Path, cost_ms: int) -> tuple[Settings, str]:
    """Fresh topics, and the config file text every process of one phase shares."""
    tag = uuid.uuid4().hex[:6]
    settings = Settings.model_validate(
        {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "group_id": f"bench-{tag}",
                "partitions": EVENT_PARTITIONS,
                "max_poll_records": BATCH,
                "topics": {"products": f"products-{tag}", "posts": f"posts-{tag}", "dead_letter": f"dl-{tag}"},
            },
            "models": {"encoder": "fixed-cost", "batch_size": BATCH, "options": {"fixed-cost": {"cost_ms": cost_ms}}},
            "cluster": {
                "records_topic_prefix": f"records-{tag}",
                "membership_topic": f"members-{tag}",
                "records_partitions": EVENT_PARTITIONS,
                "announce_interval_s": 0.5,
                "member_ttl_s": 3,
            },
            "data_dir": str(work / tag),
        }
    )
    text = kafka_toml(settings.kafka, max_poll_records=BATCH, partitions=EVENT_PARTITIONS)
    text += f'[models]\nencoder = "fixed-cost"\nbatch_size = {BATCH}\n'
    text += f"[models.options.fixed-cost]\ncost_ms = {cost_ms}\n[cluster]\n"
    text += "".join(
        f"{key} = {json.dumps(value)}\n"
        for key, value in settings.cluster.model_dump(exclude={"replicas"}).items()
        if value is not None
    )
    return settings, text


class Processes:
    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work, self.env, self.running = work, env, {}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.work / f"{name}.log", "wb") as log:
            process = subprocess.Popen([*LOOKSTREAM, *args], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.running[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.work / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.running = {}


def event_images(n: int) -> list[bytes]:
    return [encoded(product_image(i, (32, 32)), "PNG") for i in range(n)]


def assigned(processes: Processes, names: list[str]) -> bool:
    """Every encoder's latest assignment, together, is every event partition exactly once."""
    owned = []
    for name in names:
        lines = re.findall(r"encoding partitions: \[(.*)\]", processes.log(name))
        if not lines:
            return False
        owned += re.findall(r"'([^']+)'", lines[-1])
    return len(owned) == len(set(owned)) == 2 * EVENT_PARTITIONS


def read_timestamps(bootstrap: str, topic: str, count: int, timeout_s: float) -> list[int]:
    """Broker timestamps of the first ``count`` distinct keys on ``topic`` (duplicates are re-encodings)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    first: dict[bytes, int] = {}
    deadline = time.monotonic() + timeout_s
    while len(first) < count and time.monotonic() < deadline:
        for messages in consumer.poll(timeout_ms=1000).values():
            for message in messages:
                first.setdefault(message.key, message.timestamp)
    consumer.close()
    return sorted(first.values())


def encoders_phase(bootstrap: str, work: Path, env: dict, n: int, events: int, cost_ms: int, data: list[bytes]):
    settings, text = settings_for(bootstrap, work, cost_ms)
    ensure_topics(settings.kafka)
    config = work / f"encoders-{n}.toml"
    config.write_text(text)
    processes = Processes(work, env)
    names = [f"encode-{n}-{i}" for i in range(n)]
    try:
        for name in names:
            processes.start(name, "encode", "--config", str(config), "--data-dir", str(settings.data_dir))
        wait_until(lambda: assigned(processes, names), 180, f"{n} encoders assigned")
        topic = re.search(r"-> (\S+)", processes.log(names[0])).group(1)
        producer = make_producer(settings.kafka)
        for i in range(events):
            event = Event("product.upsert", f"p{i}", now_ms(), image=data[i % len(data)], attrs={"category": "top"})
            producer.send(settings.kafka.topics.products, key=event.id.encode(), value=encode_event(event))
        producer.flush()
        producer.close()
        stamps = read_timestamps(bootstrap, topic, events, 600)
    finally:
        processes.stop()
    if len(stamps) < events:
        raise RuntimeError(f"{n} encoders published {len(stamps)} of {events} records")
    span = (stamps[-1] - stamps[0]) / 1000
    return {"encoders": n, "events": events, "seconds": round(span, 2), "records_per_s": round(events / span, 1)}


def catch_up_phase(bootstrap: str, work: Path, env: dict, records: int, cost_ms: int) -> dict:
    """Publish N records, then time a fresh replica from start to ready."""
    from kafka import KafkaProducer

    from consumers.records_topic import Source, encode_record, record_key
    from indexer import generations
    from indexer.generations import Generation
    from indexer.store.records import Item, Upsert

    settings, text = settings_for(bootstrap, work, cost_ms)
    ensure_topics(settings.kafka)
    generation = Generation.create(settings, generations.load(settings, settings.models))
    topic = generation.records_topic(settings)
    ensure_topic(settings.kafka, topic, EVENT_PARTITIONS)
    generation.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for start in range(0, records, 10_000):
        vectors = rng.normal(size=(min(10_000, records - start), 192)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        for j, vector in enumerate(vectors):
            i = start + j
            item = Item("top", vector, (0, 0, 32, 32), None, 1.0)
            op = Upsert("products", f"p{i}", now_ms(), {"category": "top", "i": i}, (item,))
            value = encode_record(op, Source("bench", 0, i), generation.id)
            producer.send(topic, key=record_key("products", op.record_id), value=value)
    producer.flush()
    producer.close()
    publish_s = time.perf_counter() - started
    size = len(encode_record(op, Source("bench", 0, 0), generation.id))
    config = work / "catch-up.toml"
    config.write_text(text)
    port = free_port()
    processes = Processes(work, env)
    try:
        begun = time.monotonic()
        data_dir = str(work / "catch-up")
        processes.start("serve-catch-up", "serve", "--config", str(config), "--port", str(port), "--data-dir", data_dir)
        url = f"http://127.0.0.1:{port}"
        first = wait_until(lambda: _applied(url) > 0 and time.monotonic(), 600, "the first records applied")
        done = wait_until(lambda: _applied(url) >= records and time.monotonic(), 3600, "every record applied")
        ready = wait_until(lambda: _ready(url) and time.monotonic(), 600, "the replica ready")
        rss = _rss_mb(processes.running["serve-catch-up"].pid)
    finally:
        processes.stop()
    return {
        "records": records,
        "record_bytes": size,
        "publish_s": round(publish_s, 1),
        "applied_per_s": round(records / (done - first), 1),
        "start_to_first_applied_s": round(first - begun, 1),
        "start_to_ready_s": round(ready - begun, 1),
        "replica_rss_mb": rss,
    }


def _get(url: str):
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except OSError as e:
        status = getattr(e, "code", None)
        return status, None


def _applied(url: str) -> int:
    _, body = _get(f"{url}/stats")
    return body["records"]["products"] if body else 0


def _ready(url: str) -> bool:
    return _get(f"{url}/readyz")[0] == 200


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def freshness_phase(bootstrap: str, work: Path, env: dict, events: int, cost_ms: int, data: list[bytes]) -> dict:
    settings, text = settings_for(bootstrap, work, cost_ms)
    ensure_topics(settings.kafka)
    config = work / "freshness.toml"
    config.write_text(text)
    ports = {name: free_port() for name in ("single", "replica", "router")}
    processes = Processes(work, env)
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    try:
        common = ["--config", str(config)]
        processes.start("encode-fresh", "encode", *common, "--data-dir", str(work / "fe"))
        replica = ["--port", str(ports["replica"]), "--data-dir", str(work / "fs")]
        processes.start("serve-fresh", "serve", *common, *replica)
        processes.start("route-fresh", "route", *common, "--port", str(ports["router"]))
        up = ["--port", str(ports["single"]), "--data-dir", str(work / "fu"), "--bootstrap-servers", bootstrap]
        processes.start("up-fresh", "up", *common, *up)

        def all_ready() -> bool:
            return all(_ready(u) for u in urls.values()) and assigned(processes, ["encode-fresh"])

        wait_until(all_ready, 180, "all ready")
        time.sleep(5)  # the single node's group join settles
        latencies = asyncio.run(_poll_freshness(settings, urls, events, data))
    finally:
        processes.stop()
    out = {}
    for name, values in latencies.items():
        found = [v for v in values if v is not None]
        out[name] = {
            "found": len(found),
            "p50_ms": round(float(np.percentile(found, 50)), 1) if found else None,
            "p99_ms": round(float(np.percentile(found, 99)), 1) if found else None,
        }
    out["events"] = events
    out["rate_per_s"] = 5
    out["poll_ms"] = POLL_S * 1000
    return out


async def _poll_freshness(settings: Settings, urls: dict[str, str], events: int, data: list[bytes]) -> dict:
    producer = make_producer(settings.kafka)
    latencies: dict[str, list[float | None]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as session:

        async def watch(name: str, record_id: str, ts: int) -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                async with session.get(f"{urls[name]}/items/{record_id}") as response:
                    if response.status == 200:
                        latencies[name].append(now_ms() - ts)
                        return
                await asyncio.sleep(POLL_S)
            latencies[name].append(None)

        tasks = []
        for i in range(events):
            event = Event("product.upsert", f"f{i}", now_ms(), image=data[i % len(data)], attrs={"category": "top"})
            producer.send(settings.kafka.topics.products, key=event.id.encode(), value=encode_event(event))
            producer.flush()
            tasks += [asyncio.create_task(watch(name, event.id, event.ts)) for name in urls]
            await asyncio.sleep(0.2)
        await asyncio.gather(*tasks)
    producer.close()
    return latencies


def float16_phase(work: Path) -> dict:
    """Recall@K and mAP on the offline evaluation set with the default models, vectors through the records topic's
    codec in float32 and in float16 (what a replica would hold with ``cluster.vector_dtype = "float16"``)."""
    from consumers.records_topic import Source, decode_record, encode_record
    from indexer.evalset import build_offline_set
    from indexer.evaluation import evaluate
    from indexer.node import build_node

    root = build_offline_set(work / "evalset")
    out = {}
    for dtype in ("float32", "float16"):
        node = build_node(Settings(data_dir=work / f"eval-{dtype}"), durable=False)
        shards = node.active.shards
        apply = shards.apply

        def through_records(ops, apply=apply, dtype=dtype):
            return apply([decode_record(encode_record(op, Source("eval", 0, 0), "g", dtype))[0] for op in ops])

        shards.apply = through_records
        report = evaluate(node, root)
        node.close()
        out[dtype] = {
            "recall": {str(k): round(v, 4) for k, v in report.recall.items()},
            "map": round(report.mean_average_precision, 4),
            "queries": report.queries,
            "gallery": report.gallery,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--only", nargs="*", choices=["encoders", "catch-up", "freshness", "float16"])
    args = parser.parse_args()
    profile = PROFILES[args.profile]
    phases = set(args.only or ["encoders", "catch-up", "freshness", "float16"])
    results: dict = json.loads(args.output.read_text()) if args.output.exists() else {}
    results.update(
        {"profile": args.profile, "batch": BATCH, "cost_ms_per_batch": profile["cost_ms"], "cores": os.cpu_count()}
    )
    with tempfile.TemporaryDirectory(prefix="lookstream-scale-") as tmp:
        work = Path(tmp)
        site = _install_plugin(work / "site")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
        sys.path.insert(0, str(site))
        data = event_images(256)
        with LocalBroker(free_port(), log_path=work / "broker.log") as broker:
            bootstrap = broker.bootstrap_servers
            if "encoders" in phases:
                runs = []
                for n in (1, 2, 4):
                    runs.append(encoders_phase(bootstrap, work, env, n, profile["events"], profile["cost_ms"], data))
                    print(json.dumps(runs[-1]), flush=True)
                one = runs[0]["records_per_s"]
                results["encoders"] = runs
                results["encoders_scaling_at_4"] = round(runs[-1]["records_per_s"] / (4 * one), 3)
                _note_load(results, "encoders")
            if "catch-up" in phases:
                results["catch_up"] = catch_up_phase(bootstrap, work, env, profile["records"], profile["cost_ms"])
                print(json.dumps(results["catch_up"]), flush=True)
                _note_load(results, "catch-up")
            if "freshness" in phases:
                results["freshness"] = freshness_phase(
                    bootstrap, work, env, profile["freshness_events"], profile["cost_ms"], data
                )
                print(json.dumps(results["freshness"]), flush=True)
                _note_load(results, "freshness")
        if "float16" in phases:
            results["float16"] = float16_phase(work)
            print(json.dumps(results["float16"]), flush=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")


def _note_load(results: dict, phase: str) -> None:
    """The machine's 1-minute load average as a phase ends: other work on a shared machine skews the figures."""
    results.setdefault("load_average", {})[phase] = round(os.getloadavg()[0], 1)


def _install_plugin(target: Path) -> Path:
    """pip-install the fixed-cost encoder plugin into ``target`` (for PYTHONPATH), from a copy of its source."""
    import shutil

    source = target.parent / "fixed-cost-src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


if __name__ == "__main__":
    main()
