"""SIGKILL a node at random points of a 2,000-event stream; check exactly-once after each restart.

    python -m benchmarks.crash_recovery --runs 20 --output benchmarks/results/crash-recovery.json

Each run starts its own local broker (kept running across the kill), a node
subprocess with the example colour-histogram encoder (installed into a temp
folder with pip, found through its entry point), streams 1,500 upserts, 400
updates and 100 deletes, kills the node once it has consumed a random number of
events, restarts it on the same data directory and checks ids, attrs and counts.
The scenario is tests/support/crash.py; tests/integration/test_crash_recovery.py runs it once.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from indexer.config import KafkaSettings, Topics
from indexer.kafka.broker import LocalBroker
from tests.support.crash import run_scenario
from tests.support.processes import free_port, install_example


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
