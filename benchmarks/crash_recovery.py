"""SIGKILL a node at random points of a 2,000-event stream; check exactly-once after each restart.

    python -m benchmarks.crash_recovery --runs 20 --output benchmarks/results/crash-recovery.json

Each run starts its own local broker (kept running across the kill), a node
subprocess with the example colour-histogram encoder (installed into a temp
folder with pip, found through its entry point), streams 1,500 upserts, 400
updates and 100 deletes, kills the node once it has consumed a random number of
events, restarts it on the same data directory and checks ids, attrs and counts.
tests/integration/test_crash_recovery.py runs the same scenario once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from indexer.kafka.broker import LocalBroker
from indexer.config import KafkaSettings, Topics
from indexer.events import Event, encode_event
from indexer.kafka.topics import ensure_topics
from producers.publisher import make_producer
from tests.support.imagegen import encoded, product_image

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "lookstream-colour-histogram"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_example(target: Path) -> Path:
    """pip-install examples/lookstream-colour-histogram into ``target`` (for PYTHONPATH).

    Its encoder is cheap, so thousands of events stream through a real node
    fast; it is found through its entry point like any plugin. Built from a
    copy, so setuptools leaves no build/ folder in the source tree.
    """
    source = target.parent / f"{target.name}-src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    return target


def image(seed: int) -> bytes:
    return encoded(product_image(seed, (48, 48)), "PNG")


def stream() -> list[Event]:
    """2,000 events: 1,500 products, 400 updates of the first 400, then 100 deletes of the last 100."""
    events = [
        Event("product.upsert", f"p{i}", i, image=image(i), attrs={"category": "top", "v": 1}) for i in range(1500)
    ]
    events += [
        Event("product.upsert", f"p{i}", 2000 + i, image=image(10_000 + i), attrs={"category": "top", "v": 2})
        for i in range(400)
    ]
    events += [Event("product.delete", f"p{i}", 3000 + i) for i in range(1400, 1500)]
    return events


def _get(port: int, path: str, data: bytes | None = None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers={"Content-Type": "image/png"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _stats(port: int) -> dict | None:
    try:
        return _get(port, "/stats")
    except OSError:
        return None


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout} s")


@dataclass
class Outcome:
    kill_after: int
    consumed_at_kill: int
    checkpoints_before_kill: int
    recovery_s: float


def run_scenario(kafka: KafkaSettings, workdir: Path, plugin_site: Path, kill_after: int) -> Outcome:
    """One kill and restart; raises AssertionError if any event is lost or applied twice."""
    ensure_topics(kafka)
    port = free_port()
    config = workdir / "lookstream.toml"
    config.write_text(f"""
[kafka]
bootstrap_servers = "{kafka.bootstrap_servers}"
group_id = "{kafka.group_id}"
max_poll_records = 50
[kafka.topics]
products = "{kafka.topics.products}"
posts = "{kafka.topics.posts}"
dead_letter = "{kafka.topics.dead_letter}"
[models]
encoder = "colour-histogram"
[shards]
checkpoint_interval_s = 0.3
seal_min_rows = 500
growing_max_rows = 400
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(ROOT)])}
    command = [
        sys.executable,
        "-m",
        "indexer",
        "up",
        "--config",
        str(config),
        "--port",
        str(port),
        "--data-dir",
        str(workdir / "data"),
        "--bootstrap-servers",
        kafka.bootstrap_servers,
    ]

    def start(log_name: str) -> subprocess.Popen:
        with open(workdir / log_name, "wb") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    node = start("first.log")
    try:
        _wait(lambda: (_stats(port) or {}).get("consumer", {}).get("assigned"), 60, "assignment")
        producer = make_producer(kafka)
        for event in stream():
            producer.send(kafka.topics.products, key=event.id.encode(), value=encode_event(event))
        producer.flush()
        producer.close()
        consumed = _wait(
            lambda: (s := _stats(port)) and s["ingest"]["consumed"] >= kill_after and s["ingest"]["consumed"],
            120,
            f"{kill_after} events consumed",
        )
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait(10)
    checkpoints = len(list((workdir / "data" / "checkpoints").glob("*/ckpt-*")))

    restarted = time.monotonic()
    node = start("second.log")
    try:
        _wait(lambda: (s := _stats(port)) and s["ingest"]["consumed"] >= 2000, 180, "all events after the restart")
        recovery_s = time.monotonic() - restarted
        time.sleep(1.5)  # anything replayed twice would show up now
        body = _stats(port)
        ingest = body["ingest"]
        counts = (ingest["consumed"], ingest["indexed"], ingest["deleted"], ingest["rejected"])
        assert counts == (2000, 1900, 100, 0), f"counts {counts}"
        assert body["records"]["products"] == 1400, body["records"]
        assert sum(s["vectors"] for s in body["shards"]) == 1400
        for i in (0, 399):
            hit = _get(port, "/search?k=3", image(10_000 + i))["hits"][0]
            assert hit["id"] == f"p{i}" and hit["attrs"]["v"] == 2, hit
        for i in (400, 1399):
            assert _get(port, "/search?k=3", image(i))["hits"][0]["id"] == f"p{i}"
        for i in (1400, 1499):
            assert all(h["id"] != f"p{i}" for h in _get(port, "/search?k=3", image(i))["hits"])
    finally:
        node.send_signal(signal.SIGTERM)
        code = node.wait(30)
    assert code == 0, (workdir / "second.log").read_text()[-3000:]
    return Outcome(kill_after, consumed, checkpoints, round(recovery_s, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="lookstream-crash-") as tmp:
        site = install_example(Path(tmp) / "site")
        with LocalBroker(free_port()) as broker:
            for run in range(args.runs):
                tag = f"crash{run}-{rng.randrange(1 << 30):x}"
                kafka = KafkaSettings(
                    bootstrap_servers=broker.bootstrap_servers,
                    group_id=tag,
                    partitions=2,
                    topics=Topics(products=f"products-{tag}", posts=f"posts-{tag}", dead_letter=f"dl-{tag}"),
                )
                workdir = Path(tmp) / tag
                workdir.mkdir()
                kill_after = rng.randint(50, 1950)
                try:
                    outcome = run_scenario(kafka, workdir, site, kill_after)
                    results.append({"run": run, "ok": True, **outcome.__dict__})
                except AssertionError as e:
                    results.append({"run": run, "ok": False, "kill_after": kill_after, "error": str(e)[:500]})
                print(results[-1], flush=True)
    passed = sum(r["ok"] for r in results)
    print(f"{passed} of {len(results)} runs exactly-once")
    if args.output:
        args.output.write_text(json.dumps({"runs": results, "passed": passed}, indent=2) + "\n")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
