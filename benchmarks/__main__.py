"""Run every benchmark, then write docs/benchmarks.md from the results.

\b
    python -m benchmarks --profile quick            # a laptop: about 75 minutes on 2 cores
    python -m benchmarks --profile full             # a bigger machine: longer phases, 1M x 1280 too
    python -m benchmarks --only gpu models-gpu      # some steps (on a GPU machine, say); the report keeps the rest
    python -m benchmarks --report                   # only rewrite docs/benchmarks.md from benchmarks/results

Each step runs in its own process (memory measures start clean; one failing
step does not stop the others) and writes benchmarks/results/<step>.json.
Steps that need CUDA are skipped without it. Needs the ``bench`` extra
(Milvus Lite, matplotlib): ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

from benchmarks import report

RESULTS = Path(__file__).parent / "results"


def steps(profile: str) -> dict[str, list[str]]:
    """Step name -> module and arguments; each also gets ``--output results/<name>.json``."""
    gpu_sizes = ["1000000x128"] if profile == "quick" else ["1000000x128", "10000000x128", "1000000x1280"]
    return {
        "shards": ["benchmarks.shards_bench", "--profile", profile],
        # quick: 1M x 128 per codec; full: 10M x 128 and 1M x 1280
        "filters": ["benchmarks.filters_bench", "--profile", profile],
        "ingest": ["benchmarks.ingest", "--profile", profile],
        "query": ["benchmarks.query_bench", "--profile", profile],
        # 1M x 1280: up to 19 GB for lookstream (a rebuild under ingest), its own step. Without Milvus Lite,
        # whose process was killed for memory while inserting these rows on a 24 GiB machine.
        "query-large": ["benchmarks.query_bench", "--profile", profile, "--sizes", "1000000x1280", "--no-milvus"],
        "swaps": ["benchmarks.swaps", "--profile", profile],
        "models-cpu": ["benchmarks.models_throughput", "--device", "cpu"],
        "models-gpu": ["benchmarks.models_throughput", "--device", "cuda", "--scale", "8"],
        "gpu": ["benchmarks.gpu_search", "--sizes", *gpu_sizes],
        # encoder processes 1/2/4, a replica catching up, freshness through encode/serve/route vs one node
        "scale-out": ["benchmarks.scale_out", "--profile", profile],
    }


NEEDS_CUDA = {"models-gpu", "gpu"}
FULL_ONLY = {"query-large"}


@click.command(help=__doc__)
@click.option("--profile", type=click.Choice(["quick", "full"]), default="quick", show_default=True)
@click.option("--only", multiple=True, help="Run these steps only (repeat the option, or list them).")
@click.option("--report", "report_only", is_flag=True, help="Do not run anything; rewrite the report.")
@click.argument("names", nargs=-1)
def main(profile: str, only: tuple[str, ...], report_only: bool, names: tuple[str, ...]) -> None:
    plan = steps(profile)
    wanted = set(only) | set(names)
    unknown = wanted - set(plan)
    if unknown:
        raise click.BadParameter(f"unknown steps {sorted(unknown)}; the steps are {sorted(plan)}", param_hint="--only")
    if not report_only:
        RESULTS.mkdir(exist_ok=True)
        log_path = RESULTS / "runs.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        for name, command in plan.items():
            if wanted and name not in wanted:
                continue
            if name in FULL_ONLY and profile != "full" and not wanted:
                continue
            if name in NEEDS_CUDA and not torch.cuda.is_available():
                click.echo(f"-- {name}: skipped (no CUDA device)")
                continue
            click.echo(f"-- {name}: python -m {' '.join(command)}")
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", *command, "--output", str(RESULTS / f"{name}.json")])
            log[name] = {
                "profile": profile,
                "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "minutes": round((time.monotonic() - started) / 60, 1),
                "exit_code": done.returncode,
                "machine": report.describe_machine(),
            }
            log_path.write_text(json.dumps(log, indent=2) + "\n")
            if done.returncode != 0:
                click.echo(f"-- {name}: failed with exit code {done.returncode}", err=True)
    report.write(RESULTS, Path(__file__).parent.parent / "docs")
    click.echo("-- wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
