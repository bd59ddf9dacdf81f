"""`lookstream train`: fine-tuning on mined pairs, deterministic, resumable, loadable by the encoder plugin."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from indexer.cli import main
from indexer.config import PairSettings, Settings
from indexer.evaluation import PRODUCTS
from indexer.images import decode
from indexer.node import Node
from indexer.search import analyse_image, search_image
from indexer.store.thumbnails import store_thumbnails
from indexer.streetset import build_street_set, split_events
from indexer.training import augment
from indexer.training.pairs import PairMiner
from indexer.training.trainer import FeatureCache, TrainOptions, _batches, _self_pair_products, retrieval_metrics, train
from plugins.builtin.finetuned import load, query_scales
from plugins.manager import build_plugin_manager, registry
from plugins.models import ModelContext
from tests.conftest import catalog_event
from tests.support.imagegen import encoded, product_image
from tests.unit.test_pairs import street_node


@pytest.fixture(scope="module")
def mined(tmp_path_factory, default_models):
    """A data dir with thumbnails and pairs mined from a small generated street set."""
    tmp = tmp_path_factory.mktemp("mined")
    root = build_street_set(tmp / "set", products=30, heldout=3, posts_per_product=1.0)
    node = street_node(default_models, tmp)
    node.active.pipeline.observer = PairMiner(tmp / "data" / "pairs", PairSettings())
    products, posts = split_events(root / "train")
    for events in (products, posts):
        outcomes = node.active.pipeline.process(events)
        store_thumbnails(node.thumbnails, outcomes)
    node.close()
    return tmp / "data"


def test_retrieval_metrics():
    gallery = np.eye(3, dtype=np.float32)
    queries = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1]], dtype=np.float32)
    metrics = retrieval_metrics(queries, gallery, np.array([0, 1, 2]))
    assert metrics["recall@1"] == pytest.approx(2 / 3) and metrics["recall@5"] == 1.0
    assert metrics["map"] == pytest.approx((1 + 0.5 + 1) / 3)


def test_training_is_deterministic_resumable_and_loads_as_an_encoder(mined, tmp_path):
    options = TrainOptions(epochs=2, batch_size=8, views=2, heldout=0.3)
    first = train(mined, options, out=tmp_path / "a", progress=False, echo=lambda _: None)

    def interrupt(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    shutil.rmtree(mined / "training" / "runs")  # the same run again, from scratch, interrupted after epoch 1
    with pytest.raises(KeyboardInterrupt):
        train(mined, options, out=tmp_path / "b", progress=False, echo=interrupt)
    lines: list[str] = []
    resumed = train(mined, options, out=tmp_path / "b", progress=False, echo=lines.append)
    assert any(line.startswith("resuming") for line in lines)
    config = json.loads((first.path / "config.json").read_text())
    assert config == json.loads((resumed.path / "config.json").read_text())  # same weights: same version
    assert config["dim"] == 128 and config["trained_blocks"] == 0
    metrics = json.loads((first.path / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert set(metrics["heldout"]) == {"recall@1", "recall@5", "recall@10", "map"}
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["data"]["train_pairs"] > 0 and manifest["options"]["seed"] == 0

    reg = registry(build_plugin_manager(), "encoder")
    encoder = reg.create("finetuned", ModelContext("cpu", runtime="torch", options={"path": str(first.path)}))
    vectors = encoder.encode([Image.new("RGB", (50, 80), "red"), Image.new("RGB", (90, 60), "blue")])
    # The head's 128 numbers and, by default, the base's own 1,280 beside them (base_weight 0.5).
    assert vectors.shape == (2, 1280 + 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert encoder.version.startswith("efficientnet-lite0-")


def test_the_heads_first_weights_come_from_the_seed_alone(mined, tmp_path):
    """The first load of the base in a process draws from torch's generator; a later one does not."""
    from plugins.builtin import efficientnet

    options = TrainOptions(epochs=1, batch_size=8, views=2, heldout=0.3, base_weight=0.0)
    efficientnet.load_network.cache_clear()
    first = train(mined, options, out=tmp_path / "a", progress=False, echo=lambda _: None)
    shutil.rmtree(mined / "training" / "runs")
    again = train(mined, options, out=tmp_path / "b", progress=False, echo=lambda _: None)  # the base is cached now
    assert json.loads((first.path / "config.json").read_text()) == json.loads((again.path / "config.json").read_text())


def test_cached_features_are_kept_per_runtime_thread_count(tmp_path):
    """ONNX Runtime's sums move with its thread count: features of another count are computed, not reused."""
    from plugins.builtin.finetuned import build_network

    network = build_network("efficientnet-lite0", 16, 0)
    images = [lambda: Image.new("RGB", (64, 48), (200, 30, 30))] * 2
    one = FeatureCache(tmp_path, network, 1, progress=False)
    first = one.features("products", images, "key")
    assert np.array_equal(one.features("products", images, "key"), first) and one.images == 2  # from the file
    two = FeatureCache(tmp_path, network, 2, progress=False)
    two.features("products", images, "key")
    assert two.images == 2 and len(list(tmp_path.glob("products-*.npy"))) == 2


def test_photo_views_are_a_function_of_image_and_seed():
    image = Image.effect_mandelbrot((96, 128), (-2, -1.5, 1, 1.5), 60).convert("RGB")
    first, again, other = augment.photo(image, 7), augment.photo(image, 7), augment.photo(image, 8)
    assert first.tobytes() == again.tobytes() and first.size == again.size
    assert first.tobytes() != other.tobytes() and first.tobytes() != image.tobytes()


def test_self_pairs_share_batches_with_street_pairs_and_never_repeat_a_product_in_one():
    rng = np.random.default_rng(0)
    street = np.array([0, 0, 1, 2, 3, 3, 4])  # product of each street pair
    products = _self_pair_products(rng, 5, 12)
    assert sorted(products[:5]) == [0, 1, 2, 3, 4] and sorted(products[5:10]) == [0, 1, 2, 3, 4]
    items = np.concatenate([street, products])
    batches = _batches(rng.permutation(len(items)), items, 4)
    assert sorted(np.concatenate(batches)) == list(range(len(items)))
    assert all(len(set(items[b])) == len(b) for b in batches)
    assert any((b < len(street)).any() and (b >= len(street)).any() for b in batches)


def test_self_pairs_are_cached_deterministically_and_train_deterministically(mined, tmp_path):
    options = TrainOptions(epochs=2, batch_size=8, views=2, heldout=0.3, self_pairs=0.5)
    cache = mined / "training" / "cache"
    lines: list[str] = []
    first = train(mined, options, out=tmp_path / "a", progress=False, echo=lines.append)
    assert any("self pairs per epoch" in line for line in lines)
    (photos,) = cache.glob("photos-*.npy")  # a view kind of its own, under its own key
    views = np.load(photos)
    assert len(views) == 2 * json.loads((first.path / "manifest.json").read_text())["data"]["train_products"]
    assert not any(np.array_equal(views, np.load(p)) for p in cache.glob("products-*.npy"))

    others = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy") if p != photos}
    photos.unlink()  # built again from the same images and seed: the same views
    shutil.rmtree(mined / "training" / "runs")  # and trained again from scratch: the same weights
    again = train(mined, options, out=tmp_path / "b", progress=False, echo=lambda _: None)
    assert np.array_equal(np.load(photos), views)
    assert {p: p.stat().st_mtime_ns for p in others} == others  # the other kinds came from the cache
    assert json.loads((first.path / "config.json").read_text()) == json.loads((again.path / "config.json").read_text())
    manifest = json.loads((again.path / "manifest.json").read_text())
    assert manifest["options"]["self_pairs"] == 0.5
    assert first.metrics["epochs"][0]["images"] > 2 * manifest["data"]["train_pairs"]  # street and self pairs

    without = dataclasses.replace(options, self_pairs=0.0)
    plain = train(mined, without, out=tmp_path / "c", progress=False, echo=lambda _: None)
    version = json.loads((first.path / "config.json").read_text())["version"]
    assert json.loads((plain.path / "config.json").read_text())["version"] != version


def test_train_command_unfreezes_the_last_blocks_with_self_pairs_and_versions_its_output(mined):
    args = ["train", "--data-dir", str(mined), "--epochs", "1", "--views", "1", "--batch-size", "8", "--no-progress"]
    args += ["--unfreeze", "1", "--dim", "32", "--self-pairs", "0.5", "--base-weight", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "held-out R@1" in result.output and "base encoder, held-out" in result.output
    assert "self pairs per epoch" in result.output
    written = sorted((mined / "trained").iterdir())
    assert [p.name for p in written][-1].startswith("efficientnet-lite0-ft-v")
    config = json.loads((written[-1] / "config.json").read_text())
    assert (config["dim"], config["trained_blocks"], config["base_weight"]) == (32, 1, 0)


def test_base_weight_keeps_the_base_encoders_features_beside_the_trained_head(mined, default_models):
    """With the last block trained, the embedding still carries the base's features as they were before training."""
    args = ["train", "--data-dir", str(mined), "--epochs", "1", "--views", "1", "--batch-size", "8", "--no-progress"]
    args += ["--unfreeze", "1", "--block-lr", "0.05", "--dim", "32", "--base-weight", "0.4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    path = sorted((mined / "trained").iterdir())[-1]
    assert json.loads((path / "config.json").read_text())["base_weight"] == 0.4

    reg = registry(build_plugin_manager(), "encoder")
    encoder = reg.create("finetuned", ModelContext("cpu", runtime="onnxruntime", options={"path": str(path)}))
    crops = [Image.effect_mandelbrot((90, 120), (-2, -1.5, 1, 1.5), 40).convert("RGB"), Image.new("RGB", (60, 50))]
    crops[1].paste(crops[0].rotate(90).resize((40, 40)), (10, 5))
    vectors = encoder.encode(crops)
    assert encoder.dim == vectors.shape[1] == 1280 + 32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    base, head = vectors[:, :1280] / 0.4**0.5, vectors[:, 1280:] / 0.6**0.5
    assert np.allclose(np.linalg.norm(head, axis=1), 1, atol=1e-4)
    assert np.allclose(base, default_models.encoder.encode(crops), atol=1e-3)  # the base's own vectors
    trained, _ = load(path)
    assert not np.allclose(  # ... though the block they come from has trained
        trained.base._blocks[-1].state_dict()["_project_conv.weight"],
        trained.original["blocks"][0].state_dict()["_project_conv.weight"],
    )


def test_query_scales_weigh_the_cosine_of_the_parts():
    rng = np.random.default_rng(0)
    unit = lambda n: (lambda v: v / np.linalg.norm(v))(rng.normal(size=n))  # noqa: E731
    w, q = 0.65, 0.9
    base, head, stored_base, stored_head = unit(6), unit(3), unit(6), unit(3)
    query = np.concatenate([w**0.5 * base, (1 - w) ** 0.5 * head])
    stored = np.concatenate([w**0.5 * stored_base, (1 - w) ** 0.5 * stored_head])
    scales = query_scales(w, 6, 9, {"product": q, "street": w})
    assert query * scales["product"] @ stored == pytest.approx(q * base @ stored_base + (1 - q) * head @ stored_head)
    assert np.allclose(scales["street"], 1) and set(query_scales(w, 6, 9, None)) == {"product"}
    with pytest.raises(ValueError, match="product / street"):
        query_scales(w, 6, 9, {"posts": 1.0})
    for bad in (1.5, True, "1"):
        with pytest.raises(ValueError, match="from 0 to 1"):
            query_scales(w, 6, 9, {"product": bad})
    # A model trained without the base's features has nothing to weigh: a config's weights are ignored.
    assert query_scales(0.0, 0, 3, {"product": 1.0}) == query_scales(0.0, 0, 3, None) == {}


def test_product_photos_search_on_the_base_features_street_photos_on_the_trained_mix(mined, default_models, tmp_path):
    options = TrainOptions(epochs=1, batch_size=8, views=1, heldout=0.3, trained_blocks=1, base_weight=0.4, dim=32)
    path = train(mined, options, out=tmp_path / "model", progress=False, echo=lambda _: None).path
    reg = registry(build_plugin_manager(), "encoder")
    encoder = reg.create("finetuned", ModelContext("cpu", runtime="onnxruntime", options={"path": str(path)}))
    query = encoded(ImageOps.mirror(product_image(3)).rotate(10))
    events = [catalog_event(i) for i in range(8)]

    def search(models, photo):
        data_dir = tmp_path / f"{models.encoder.name}-{photo}"
        node = Node.create(Settings.model_validate({"data_dir": str(data_dir)}), models)
        node.active.shards.apply(node.active.pipeline.process(events))
        vector = analyse_image(node.active.pipeline, node.settings.images, query, photo).whole
        result = search_image(node.active.pipeline, node.active.shards, node.settings.images, query, 8, PRODUCTS, photo)
        node.close()
        return vector, [(hit.id, hit.score) for hit in result.hits]

    finetuned = dataclasses.replace(default_models, encoder=encoder)
    base_vector, base_hits = search(default_models, "product")
    street_vector, _ = search(finetuned, "street")
    product_vector, product_hits = search(finetuned, "product")
    # A street photo searches with the vector as indexed: the trained mix.
    assert np.allclose(street_vector, encoder.encode([decode(query, 10**8, 10**4).image])[0], atol=1e-5)
    # A product photo on the base's features alone (query_base_weight.product 1.0): the base encoder's
    # vector, the head's numbers zero, so the base encoder's order, every score scaled by sqrt(0.4).
    assert np.allclose(product_vector, np.concatenate([base_vector, np.zeros(32)]), atol=1e-3)
    assert [i for i, _ in product_hits] == [i for i, _ in base_hits]
    assert [s for _, s in product_hits] == pytest.approx([0.4**0.5 * s for _, s in base_hits], abs=1e-3)


def test_train_command_says_when_there_are_no_pairs(tmp_path):
    result = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path), "--no-progress"])
    assert result.exit_code != 0 and "attrs.products" in result.output


def test_swap_keeps_the_configs_other_finetuned_options(monkeypatch, tmp_path):
    from indexer import cli

    sent = []
    monkeypatch.setattr(cli, "_request_json", lambda request, url, **_: sent.append(request) or {"generation": "g"})
    options = {"finetuned": {"path": "old", "query_base_weight": {"product": 0.8}}, "multi-crop": {"candidates": 9}}
    settings = Settings.model_validate({"models": {"options": options}})
    cli._swap("http://127.0.0.1:1", "t", settings, tmp_path / "new")
    body = json.loads(sent[0].data)
    assert body["encoder"] == "finetuned" and body["options"]["multi-crop"] == {"candidates": 9}
    path = str((tmp_path / "new").resolve())
    assert body["options"]["finetuned"] == {"path": path, "query_base_weight": {"product": 0.8}}
