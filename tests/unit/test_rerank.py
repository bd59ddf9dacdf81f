"""The re-rank hook: off by default; the built-in multi-crop re-ranker re-scores the nearest hits."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from indexer.config import Settings
from indexer.node import Node
from indexer.search import Where, search_image
from plugins.builtin.rerankers import MultiCropReranker, sub_crops
from plugins.manager import build_plugin_manager, load_models
from plugins.models import Candidate, ModelContext, RerankQuery
from plugins.registry import UnknownModel
from tests.conftest import catalog_event
from tests.support.imagegen import encoded, product_image


class FixedEncoder:
    """Encodes every crop as the same vector, to show which view decided."""

    name, version, dim = "fixed", "1", 2

    def encode(self, crops):
        return np.tile(np.array([[0.0, 1.0]], dtype=np.float32), (len(crops), 1))


def test_multi_crop_scores_each_candidate_by_its_best_view():
    reranker = MultiCropReranker(ModelContext("cpu"))
    assert len(sub_crops(Image.new("RGB", (40, 20)), 0.75)) == 6
    query = RerankQuery(Image.new("RGB", (40, 20)), np.array([1.0, 0.0], dtype=np.float32), FixedEncoder(), "street")
    a = Candidate("a", "products", 0.9, np.array([1.0, 0.0], dtype=np.float32))  # like the query vector
    b = Candidate("b", "products", 0.1, np.array([0.0, 1.0], dtype=np.float32))  # like its sub-crops
    c = Candidate("c", "products", 0.5, np.array([-1.0, 0.0], dtype=np.float32))
    ranked = reranker.rerank(query, [c, b, a])
    assert [x.id for x in ranked][:2] in (["a", "b"], ["b", "a"]) and ranked[-1].id == "c"
    assert [x.score for x in ranked] == pytest.approx([1.0, 1.0, 0.0])
    # A catalog thumbnail is framed already: product photos keep the index's order unless asked for.
    product = dataclasses.replace(query, photo="product")
    assert reranker.rerank(product, [c, b, a]) == [c, b, a]
    both = MultiCropReranker(ModelContext("cpu", options={"photos": ["product", "street"]}))
    assert [x.score for x in both.rerank(product, [c, b, a])] == pytest.approx([1.0, 1.0, 0.0])
    for bad in (["posts"], "street"):
        with pytest.raises(ValueError, match="photo kinds"):
            MultiCropReranker(ModelContext("cpu", options={"photos": bad}))


def test_rerank_is_off_by_default_and_an_unknown_name_lists_the_known_ones(default_models):
    assert default_models.reranker is None
    with pytest.raises(UnknownModel, match="multi-crop"):
        load_models(
            build_plugin_manager(),
            "whole-image",
            "efficientnet-lite0",
            "event-attrs",
            ModelContext("cpu"),
            reranker="x",
        )


def test_search_with_the_multi_crop_reranker_keeps_k_hits_and_times_it(default_models):
    reranker = MultiCropReranker(ModelContext("cpu", options={"candidates": 5}))
    models = dataclasses.replace(default_models, reranker=reranker)
    node = Node.create(Settings(), models)
    events = [catalog_event(i) for i in range(8)]
    node.active.shards.apply(node.active.pipeline.process(events))
    data = encoded(product_image(3))
    where = Where(("products",))
    result = search_image(node.active.pipeline, node.active.shards, Settings().images, data, 2, where, "street")
    hits = result.items[0].hits
    assert len(hits) == 2 and hits[0].id == "p3" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].score >= hits[1].score and "rerank" in result.timings_ms
    # A product photo is not re-ranked (the re-ranker's photos): no candidates fetched for it, no rerank stage.
    result = search_image(node.active.pipeline, node.active.shards, Settings().images, data, 2, where, "product")
    assert [h.id for h in result.items[0].hits][:1] == ["p3"] and "rerank" not in result.timings_ms
    node.close()
