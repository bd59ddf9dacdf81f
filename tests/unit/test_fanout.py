"""The router's choices: one generation per answer, a cover of the partitions, one hit per record."""

import random

import pytest

from indexer.kafka.membership import Member, now_ms
from indexer.web.fanout import Candidate, choose_generation, merge, plan


def member(url, generation, partitions, ready=True, total=4, retiring=None) -> Member:
    return Member(url, generation, tuple(partitions), total, ready, now_ms(), 10_000, retiring)


def test_a_cover_takes_one_replica_per_partition_set_and_spreads_over_equal_ones():
    halves = [Candidate(f"h{i}", frozenset(p), True) for i, p in enumerate(([0, 1], [2, 3], [0, 1], [2, 3]))]
    seen = set()
    for seed in range(20):
        chosen = plan(halves, {0, 1, 2, 3}, random.Random(seed))
        assert sorted(p for c in chosen for p in c.partitions) == [0, 1, 2, 3]
        seen.update(c.url for c in chosen)
    assert seen == {"h0", "h1", "h2", "h3"}


def test_a_full_replica_covers_alone_and_uncoverable_partitions_are_left_out():
    full, half = Candidate("full", frozenset(range(4)), True), Candidate("half", frozenset([0, 1]), True)
    assert plan([half, full], {0, 1, 2, 3}) == [full]
    assert plan([half], {0, 1, 2, 3}) == [half]
    assert plan([], {0}) == []


def test_the_generation_covering_every_partition_answers_and_never_a_mix():
    members = [member("a", "g2", [0, 1], retiring="g1"), member("b", "g1", [2, 3])]
    choice = choose_generation(members, ["g2", "g1"])
    assert choice.generation == "g1" and not choice.missing
    assert {c.url for c in choice.candidates} == {"a", "b"}
    # Once every replica has flipped, the new one is active on more replicas: it answers.
    members = [member("a", "g2", [0, 1], retiring="g1"), member("b", "g2", [2, 3], retiring="g1")]
    assert choose_generation(members, ["g2", "g1"]).generation == "g2"


def test_missing_partitions_are_named_and_unready_or_unknown_generations_ignored():
    members = [member("a", "g1", [0, 1]), member("b", "g1", [2, 3], ready=False), member("c", "gx", [2, 3])]
    choice = choose_generation(members, ["g1"])
    assert choice.generation == "g1" and choice.missing == [2, 3]
    assert choose_generation([], ["g1"]).candidates == ()


def test_merge_keeps_one_hit_per_record_with_its_best_score():
    def hit(i, score, collection="products"):
        return {"id": f"p{i}", "collection": collection, "score": score}

    merged = merge([[hit(1, 0.9), hit(2, 0.5)], [hit(3, 0.7), hit(1, 0.95), hit(2, 0.1, "posts")]], k=3)
    assert [(h["id"], h["collection"], h["score"]) for h in merged] == [
        ("p1", "products", 0.95),
        ("p3", "products", 0.7),
        ("p2", "products", 0.5),
    ]


def test_an_announcement_survives_the_round_trip_and_expires():
    announced = member("http://a:1", "g2", [0, 3], retiring="g1")
    assert Member.decode(announced.encode()) == announced
    assert announced.alive() and not announced.alive(at_ms=announced.ts + 10_001)
    with pytest.raises(ValueError):
        Member.decode(b"\x93\x01\x02\x03")
