"""The router's decisions, free of I/O: which generation, which replicas, and how hits merge.

* **Generation**: a query is answered by one generation only. Among the
  generations the router can encode for, it takes one whose ready replicas
  cover every records-topic partition, preferring the one most replicas
  answer from as their active generation (replicas keep the previous one
  for ``cluster.retire_after_s`` after a flip, so that one generation covers
  everything until all have flipped). Without full coverage, the generation
  covering most partitions.
* **Cover**: a greedy set cover over the ready replicas of that generation;
  the replica adding the most partitions not yet covered goes first, ties
  broken at random to spread the load over equal replicas. A replica that
  fails is left out and the uncovered partitions are planned again.
* **Merge**: a record is one hit: the best score per (collection, id) across
  the replicas' answers (a record lives in one partition, but overlapping
  replicas may both return it), then the top k by score.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from indexer.kafka.membership import Member


@dataclass(frozen=True)
class Candidate:
    """A ready replica able to answer one generation: its URL, its partitions, and whether it is active there."""

    url: str
    partitions: frozenset[int]
    active: bool


@dataclass(frozen=True)
class Choice:
    generation: str | None
    total: int | None
    candidates: tuple[Candidate, ...]

    @property
    def covered(self) -> frozenset[int]:
        return frozenset().union(*(c.partitions for c in self.candidates)) if self.candidates else frozenset()

    @property
    def missing(self) -> list[int]:
        return [] if self.total is None else sorted(set(range(self.total)) - self.covered)


def choose_generation(members: Iterable[Member], usable: Sequence[str]) -> Choice:
    """The generation to answer from, and the ready replicas that answer it.

    A member is a candidate for its active generation and for the one it is
    retiring. ``usable`` lists the generations the router can encode queries
    for, the configured one first.
    """
    by_generation: dict[str, list[Candidate]] = {}
    totals: dict[str, int] = {}
    active_on: Counter = Counter()
    for member in members:
        if not member.ready:
            continue
        for generation, active in ((member.generation, True), (member.retiring, False)):
            if generation is None or generation not in usable:
                continue
            by_generation.setdefault(generation, []).append(Candidate(member.url, frozenset(member.partitions), active))
            if member.total is not None:
                totals[generation] = max(totals.get(generation, 0), member.total)
            active_on[generation] += active
    if not by_generation:
        return Choice(usable[0] if usable else None, None, ())

    def rank(generation: str) -> tuple:
        choice = Choice(generation, totals.get(generation), tuple(by_generation[generation]))
        return (not choice.missing, len(choice.covered), active_on[generation], -usable.index(generation))

    best = max(by_generation, key=rank)
    return Choice(best, totals.get(best), tuple(by_generation[best]))


def plan(candidates: Iterable[Candidate], uncovered: set[int], rng: random.Random | None = None) -> list[Candidate]:
    """Replicas that together cover as much of ``uncovered`` as they can, fewest first (greedy set cover)."""
    rng = rng or random
    pool = list(candidates)
    rng.shuffle(pool)  # equal replicas share the load
    left, chosen = set(uncovered), []
    while left:
        best = max(pool, key=lambda c: (len(c.partitions & left), -len(c.partitions - left)), default=None)
        if best is None or not best.partitions & left:
            break
        chosen.append(best)
        left -= best.partitions
        pool.remove(best)
    return chosen


def merge(answers: Iterable[Sequence[dict[str, Any]]], k: int) -> list[dict[str, Any]]:
    """Hits of several replicas as one list: one hit per record, its best score, best first, at most k."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for hits in answers:
        for hit in hits:
            key = (hit["collection"], hit["id"])
            if key not in best or hit["score"] > best[key]["score"]:
                best[key] = hit
    return sorted(best.values(), key=lambda h: -h["score"])[:k]
