"""docs/benchmarks.md is generated: the report must render from the results the steps write."""

import re
from pathlib import Path

from benchmarks import report

RESULTS = Path(report.__file__).parent / "results"


def test_the_report_renders_from_the_checked_in_results(tmp_path):
    text = report.write(RESULTS, tmp_path).read_text()
    for heading in (
        "## Runs and machines",
        "## Goals",
        "## Ingest and freshness",
        "## Query latency",
        "## Latency during rebuild swaps and generation flips",
        "## Shards",
        "## Models",
        "## GPU shards",
    ):
        assert heading in text
    goals = text.split("## Goals")[1].split("\n## ")[0]
    rows = [line for line in goals.splitlines() if line.startswith("| ") and not line.startswith(("| goal", "| ---"))]
    assert rows and all(line.endswith(("| met |", "| **not met** |")) for line in rows)
    for image in re.findall(r"\]\((benchmarks/[^)]+\.png)\)", text):
        assert (tmp_path / image).stat().st_size > 1000
