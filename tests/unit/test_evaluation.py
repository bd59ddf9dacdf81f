import json

import pytest
from click.testing import CliRunner

from indexer.cli import main
from indexer.config import Settings
from indexer.evalset import QUERY_KINDS, build_offline_set
from indexer.evaluation import KS, average_precision, evaluate, load_queries
from indexer.node import Node


def test_average_precision():
    assert average_precision(["a", "b", "c"], frozenset({"a"})) == 1.0
    assert average_precision(["x", "a"], frozenset({"a"})) == 0.5
    assert average_precision(["a", "x", "b"], frozenset({"a", "b"})) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(["x"], frozenset({"a"})) == 0.0


def test_offline_set_is_deterministic_and_labelled(tmp_path):
    first = build_offline_set(tmp_path / "a", photos=2, crops_per_photo=2)
    second = build_offline_set(tmp_path / "b", photos=2, crops_per_photo=2)
    assert (first / "queries.jsonl").read_text() == (second / "queries.jsonl").read_text()
    queries = load_queries(first)
    assert len(queries) == 4 * len(QUERY_KINDS) and all(q.image.exists() for q in queries)
    gallery = {p.stem for p in (first / "gallery").rglob("*.jpg")}
    assert set().union(*(q.relevant for q in queries)) == gallery
    # The street composites are searched as street photos, the changed thumbnails as product photos.
    assert {(q.kind, q.photo) for q in queries} == {(k, "street" if k == "street" else "product") for k in QUERY_KINDS}


def test_queries_name_what_they_are_searched_as(tmp_path):
    lines = ['{"image": "q.jpg", "relevant": ["a"]}', '{"image": "q.jpg", "relevant": ["a"], "photo": "posts"}']
    (tmp_path / "queries.jsonl").write_text(lines[0] + "\n")
    assert load_queries(tmp_path)[0].photo == "product"
    (tmp_path / "queries.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 2: photo must be product or street"):
        load_queries(tmp_path)


def test_default_encoder_refinds_products_better_than_chance(tmp_path, default_models):
    root = build_offline_set(tmp_path, photos=3)
    report = evaluate(Node.create(Settings(), default_models), root)
    assert report.gallery == 12 and report.queries == 60
    assert list(report.recall) == list(KS) and report.recall[1] <= report.recall[20]
    # Chance Recall@1 is 1/12; flips and colour changes of a thumbnail are easy for a real encoder.
    assert report.recall[1] > 0.5 and report.by_kind["flip"] == 1.0


def test_evaluate_command_reads_a_set_and_writes_json(tmp_path):
    root = build_offline_set(tmp_path / "set", photos=1, crops_per_photo=2)
    result = CliRunner().invoke(main, ["evaluate", "--set", str(root), "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "| efficientnet-lite0 | 2 | 10 |" in result.output
    assert json.loads((tmp_path / "r.json").read_text())[0]["queries"] == 10


def test_evaluate_command_names_an_unknown_encoder(tmp_path):
    root = build_offline_set(tmp_path / "set", photos=1, crops_per_photo=2)
    result = CliRunner().invoke(main, ["evaluate", "--set", str(root), "--encoder", "nope"])
    assert result.exit_code != 0 and "no encoder named 'nope'" in result.output
