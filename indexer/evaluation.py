"""Recall@K and mAP of a configured detector + encoder on a labelled query set.

The seeds' metrics: Recall@K is the share of queries with at least one
relevant product among the first K hits; mAP is the mean over queries of the
average precision of the ranked hits (with one relevant product, 1/rank). The
gallery is indexed and the queries searched through the same Pipeline and
ShardSet as the live service, across all categories, so the figures measure
what a user of /search gets.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from indexer.node import Node
from indexer.pipeline import Rejected
from indexer.search import PHOTO_KINDS, Where, search_image
from producers.folders import Skipped, product_events

KS = (1, 5, 10, 20)


@dataclass(frozen=True)
class Query:
    image: Path
    relevant: frozenset[str]
    kind: str
    photo: str = "product"  # what the query is searched as (indexer.search.PHOTO_KINDS)


@dataclass(frozen=True)
class Report:
    encoder: str
    gallery: int
    queries: int
    recall: dict[int, float]
    mean_average_precision: float
    ms_per_image: float
    by_kind: dict[str, float]  # Recall@1 per query kind


def load_queries(root: Path) -> list[Query]:
    queries = []
    with open(root / "queries.jsonl") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                photo = row.get("photo", "product")
                if photo not in PHOTO_KINDS:
                    raise ValueError(f"photo must be {' or '.join(PHOTO_KINDS)}, got {photo!r}")
                queries.append(Query(root / row["image"], frozenset(row["relevant"]), row.get("kind", ""), photo))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"queries.jsonl line {number}: {e}") from e
    return queries


def average_precision(ranked: list[str], relevant: frozenset[str]) -> float:
    hits, total = 0, 0.0
    for rank, product_id in enumerate(ranked, 1):
        if product_id in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant) if relevant else 0.0


PRODUCTS = Where(("products",))


def evaluate(node: Node, root: Path) -> Report:
    """Index ``root/gallery`` into the node's (empty) shards, then run every query."""
    settings = node.settings
    generation = node.active
    events = [
        e
        for e in product_events(root / "gallery", settings.kafka.max_message_bytes, settings.images.max_pixels)
        if not isinstance(e, Skipped)
    ]
    started = time.perf_counter()
    outcomes = generation.pipeline.process(events)
    indexing_s = time.perf_counter() - started
    generation.shards.apply([o for o in outcomes if not isinstance(o, Rejected)])

    queries = load_queries(root)
    k = max(KS)
    found = {kk: 0 for kk in KS}
    ap_sum = 0.0
    per_kind: dict[str, list[int]] = {}
    for query in queries:
        data = query.image.read_bytes()
        result = search_image(generation.pipeline, generation.shards, settings.images, data, k, PRODUCTS, query.photo)
        best: dict[str, float] = {}
        for hit in [*result.hits, *(h for item in result.items for h in item.hits)]:
            best[hit.id] = max(best.get(hit.id, -1.0), hit.score)
        ranked = sorted(best, key=lambda i: -best[i])[:k]
        for kk in KS:
            found[kk] += bool(set(ranked[:kk]) & query.relevant)
        ap_sum += average_precision(ranked, query.relevant)
        counts = per_kind.setdefault(query.kind, [0, 0])
        counts[0] += bool(ranked[:1] and ranked[0] in query.relevant)
        counts[1] += 1
    n = max(len(queries), 1)
    return Report(
        encoder=generation.models.encoder.name,
        gallery=len(events),
        queries=len(queries),
        recall={kk: found[kk] / n for kk in KS},
        mean_average_precision=ap_sum / n,
        ms_per_image=1000 * indexing_s / max(len(events), 1),
        by_kind={kind: hit / total for kind, (hit, total) in sorted(per_kind.items())},
    )


def markdown_table(reports: list[Report]) -> str:
    header = "| encoder | gallery | queries | " + " | ".join(f"R@{k}" for k in KS) + " | mAP | ms/image (index) |"
    rule = "|" + " --- |" * (len(KS) + 5)
    rows = [
        f"| {r.encoder} | {r.gallery} | {r.queries} | "
        + " | ".join(f"{r.recall[k]:.3f}" for k in KS)
        + f" | {r.mean_average_precision:.3f} | {r.ms_per_image:.1f} |"
        for r in reports
    ]
    return "\n".join([header, rule, *rows])
