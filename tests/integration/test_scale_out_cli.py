"""The roles as an operator runs them: `lookstream encode` x2, `serve`, `route`; one encoder SIGKILLed mid-stream.

The colour-histogram example plugin is the encoder, so that 2,000 events
stream through real processes in seconds. The crash stream (tests/support/crash.py)
ends with known contents: nothing may be lost or doubled in the replica's
shards, whatever the killed encoder had published but not committed.
"""

import os
import signal
import subprocess
import sys

import pytest

from indexer.events import encode_event
from indexer.kafka.topics import ensure_topics
from producers.publisher import make_producer
from tests.support.crash import image, stream
from tests.support.processes import ROOT, free_port, get_json, kafka_toml, node_stats, wait_until

pytestmark = pytest.mark.integration
LOOKSTREAM = [sys.executable, "-m", "indexer"]


def test_encoders_serve_and_route_as_processes_and_an_encoder_killed_mid_stream_loses_nothing(
    topics, unique, tmp_path, example_plugin_site
):
    kafka = topics.kafka
    ensure_topics(kafka)
    config = tmp_path / "lookstream.toml"
    config.write_text(
        kafka_toml(kafka, max_poll_records=50)
        + f"""
[models]
encoder = "colour-histogram"
[cluster]
records_topic_prefix = "records-{unique}"
membership_topic = "members-{unique}"
records_partitions = 4
announce_interval_s = 0.5
member_ttl_s = 3
"""
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example_plugin_site), str(ROOT)]), "PYTHONUNBUFFERED": "1"}
    serve_port, route_port = free_port(), free_port()
    common = ["--config", str(config), "--bootstrap-servers", kafka.bootstrap_servers]
    commands = {
        "encode-1": ["encode", *common, "--data-dir", str(tmp_path / "e1")],
        "encode-2": ["encode", *common, "--data-dir", str(tmp_path / "e2")],
        "serve": ["serve", *common, "--port", str(serve_port), "--data-dir", str(tmp_path / "s")],
        "route": ["route", *common, "--port", str(route_port)],
    }
    processes = {}
    for name, args in commands.items():
        with open(tmp_path / f"{name}.log", "wb") as log:
            processes[name] = subprocess.Popen([*LOOKSTREAM, *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: _ready(route_port), 90, "the router ready")
        producer = make_producer(kafka)
        for event in stream():
            producer.send(kafka.topics.products, key=event.id.encode(), value=encode_event(event))
        producer.flush()
        producer.close()
        wait_until(lambda: (s := node_stats(serve_port)) and s["ingest"]["consumed"] >= 300, 120, "300 records applied")
        processes["encode-1"].send_signal(signal.SIGKILL)
        processes["encode-1"].wait(10)

        def final() -> bool:
            body = node_stats(serve_port)
            return bool(body) and body["records"]["products"] == 1400 and body["ingest"]["indexed"] >= 1900

        wait_until(final, 180, "every record on the replica")
        body = node_stats(serve_port)
        assert body["records"]["products"] == 1400 and sum(s["vectors"] for s in body["shards"]) == 1400
        for i in (0, 399):
            hit = get_json(route_port, "/search?k=3", image(10_000 + i))["hits"][0]
            assert hit["id"] == f"p{i}" and hit["attrs"]["v"] == 2, hit
        for i in (400, 1399):
            assert get_json(route_port, "/search?k=3", image(i))["hits"][0]["id"] == f"p{i}"
        for i in (1400, 1499):
            assert all(h["id"] != f"p{i}" for h in get_json(route_port, "/search?k=3", image(i))["hits"])
        answer = get_json(route_port, "/search?k=3", image(7))
        assert answer["missing_partitions"] == [] and answer["partitions_total"] == 4
        duplicates = body["ingest"]["consumed"] - 2000
        print(f"records applied twice after the encoder's SIGKILL (absorbed by upsert): {duplicates}")
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {name: process.wait(60) for name, process in processes.items()}
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in commands}
    for name in ("encode-2", "serve", "route"):
        assert codes[name] == 0, logs[name][-3000:]
    role = {"encode-2": "lookstream encode:", "serve": "lookstream serve:", "route": "lookstream route:"}
    for name, line in role.items():
        assert line in logs[name], logs[name][-2000:]
    assert f"API on http://127.0.0.1:{serve_port}" in logs["serve"]


def _ready(port: int) -> bool:
    try:
        return get_json(port, "/readyz")["ready"]
    except OSError:
        return False
