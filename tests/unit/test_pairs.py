"""Pair mining: posts that name their products become street-to-shop pairs, matched by category."""

from click.testing import CliRunner

from indexer.cli import main
from indexer.config import PairSettings, Settings
from indexer.events import Event
from indexer.node import Node
from indexer.streetset import build_street_set, read_posts, split_events
from indexer.training.pairs import PairMiner, counts, resolve
from plugins.manager import Models
from tests.support.detectors import OutfitRegionsDetector
from tests.support.imagegen import encoded, product_image


def test_street_set_is_deterministic_with_disjoint_heldout_products(tmp_path):
    a = build_street_set(tmp_path / "a", products=12, heldout=6, posts_per_product=1.0)
    b = build_street_set(tmp_path / "b", products=12, heldout=6, posts_per_product=1.0)
    assert (a / "train" / "posts.jsonl").read_text() == (b / "train" / "posts.jsonl").read_text()
    assert (a / "train" / "posts" / "s00000.jpg").read_bytes() == (b / "train" / "posts" / "s00000.jpg").read_bytes()
    train = {p.stem for p in (a / "train" / "catalog").rglob("*.jpg")}
    held = {p.stem for p in (a / "heldout" / "catalog").rglob("*.jpg")}
    assert len(train) == 12 and len(held) == 6 and not train & held
    for line in read_posts(a / "train"):
        assert 1 <= len(line["products"]) <= 3 and set(line["products"]) <= train
        assert set(line["boxes"]) == set(line["products"])


def street_node(default_models, tmp_path) -> Node:
    models = Models(
        default_models.detector, default_models.encoder, default_models.classifier, {"posts": OutfitRegionsDetector()}
    )
    return Node.create(Settings.model_validate({"data_dir": str(tmp_path / "data")}), models)


def run(node: Node, events):
    outcomes = node.active.pipeline.process(events)
    node.active.shards.apply(outcomes)
    return outcomes


def test_posts_naming_products_become_pairs_of_the_same_category(default_models, tmp_path):
    root = build_street_set(tmp_path / "set", products=9, heldout=3, posts_per_product=1.0)
    node = street_node(default_models, tmp_path)
    miner = PairMiner(tmp_path / "pairs", PairSettings())
    node.active.pipeline.observer = miner
    products, posts = split_events(root / "train")
    run(node, posts[:2])  # posts may arrive before the products they name
    run(node, products)
    run(node, posts[2:])
    run(node, posts)  # a replay adds nothing
    dataset = resolve(tmp_path / "pairs")
    named = sum(len(line["products"]) for line in read_posts(root / "train"))
    assert len(dataset.pairs) == named and dataset.posts == len(posts)
    categories = {p.stem: p.parent.name for p in (root / "train" / "catalog").rglob("*.jpg")}
    assert all(categories[pair.product_id] == pair.category for pair in dataset.pairs)
    assert all(pair.anchor.exists() for pair in dataset.pairs)
    # each post has three garment regions; those of categories it names no product of are dropped
    assert dataset.dropped == {"no-named-product-of-category": 3 * len(posts) - named}
    assert sum(row["pairs"] for row in counts(dataset).values()) == named
    node.close()


def test_ambiguous_garments_and_unknown_products_are_dropped(default_models, tmp_path):
    node = street_node(default_models, tmp_path)
    miner = PairMiner(tmp_path / "pairs", PairSettings(max_anchors=6))
    node.active.pipeline.observer = miner
    image = encoded(product_image(1, (240, 320)))

    def product(pid, category):
        return Event(
            "product.upsert", pid, 1, image=encoded(product_image(hash(pid) % 100)), attrs={"category": category}
        )

    run(node, [product("t1", "top"), product("t2", "top"), product("b1", "bottom")])
    run(
        node,
        [
            Event("post.upsert", "two-tops", 1, image=image, attrs={"products": ["t1", "t2", "b1"]}),
            Event("post.upsert", "unknown", 1, image=image, attrs={"products": ["nope"]}),
            Event("post.upsert", "full", 1, image=image, attrs={"products": ["b1"]}),  # over max_anchors
            Event("post.upsert", "untagged", 1, image=image),
        ],
    )
    dataset = resolve(tmp_path / "pairs")
    assert [(p.post_id, p.product_id, p.category) for p in dataset.pairs] == [("two-tops", "b1", "bottom")]
    assert dataset.dropped == {"ambiguous": 1, "no-named-product-of-category": 1, "unknown-product": 3}
    assert miner.dropped_full == 1 and dataset.posts == 2
    # a newer version of a post replaces the older one (a miner restarted on the dataset, with room for it)
    node.active.pipeline.observer = PairMiner(tmp_path / "pairs", PairSettings())
    run(node, [Event("post.upsert", "two-tops", 2, image=image, attrs={"products": ["t1"]})])
    assert [(p.post_id, p.product_id) for p in resolve(tmp_path / "pairs").pairs] == [("two-tops", "t1")]
    node.close()


def test_pairs_command_counts_per_category(default_models, tmp_path):
    root = build_street_set(tmp_path / "set", products=6, heldout=3, posts_per_product=1.0)
    node = street_node(default_models, tmp_path)
    node.active.pipeline.observer = PairMiner(tmp_path / "data" / "pairs", PairSettings())
    products, posts = split_events(root / "train")
    run(node, products + posts)
    result = CliRunner().invoke(main, ["pairs", "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["category", "pairs", "products", "posts"]
    assert {line.split()[0] for line in lines[1:4]} == {"bag", "bottom", "top"}
    assert "no-named-product-of-category" in result.output
    node.close()


def test_deletes_end_pairs_and_remove_the_posts_crops(default_models, tmp_path):
    node = street_node(default_models, tmp_path)
    root = tmp_path / "pairs"
    node.active.pipeline.observer = PairMiner(root, PairSettings())
    image = encoded(product_image(1, (240, 320)))

    def pairs():
        return sorted((p.post_id, p.product_id) for p in resolve(root).pairs)

    def crops():
        return {p.name for p in (root / "anchors").iterdir()}

    products = [
        Event("product.upsert", pid, 1, image=encoded(product_image(n)), attrs={"category": "bottom"})
        for n, pid in enumerate(("b1", "b2"))
    ]
    run(node, products)
    run(node, [Event("post.upsert", f"s{n}", 1, image=image, attrs={"products": ["b1"]}) for n in range(3)])
    assert pairs() == [("s0", "b1"), ("s1", "b1"), ("s2", "b1")] and len(crops()) == 9
    first = crops()

    run(node, [Event("post.upsert", "s0", 2, image=image, attrs={"products": ["b2"]})])  # a new version
    assert pairs() == [("s0", "b2"), ("s1", "b1"), ("s2", "b1")] and len(crops()) == 9 and crops() != first
    run(node, [Event("post.delete", "s1", 3)])
    assert pairs() == [("s0", "b2"), ("s2", "b1")] and len(crops()) == 6
    run(node, [Event("post.upsert", "s1", 1, image=image, attrs={"products": ["b1"]})])  # a replay: stays deleted
    assert pairs() == [("s0", "b2"), ("s2", "b1")] and len(crops()) == 6
    run(node, [Event("product.delete", "b1", 2)])
    assert pairs() == [("s0", "b2")]  # s2's crops stay: a product named later under that id would pair again

    (root / "anchors" / "left-by-a-crash.jpg").write_bytes(b"")
    reopened = PairMiner(root, PairSettings())
    assert reopened.anchors == 6 and len(crops()) == 6
    node.active.pipeline.observer = reopened
    run(node, [Event("post.upsert", "s1", 4, image=image, attrs={"products": ["b2"]})])  # newer than its delete
    assert pairs() == [("s0", "b2"), ("s1", "b2")] and reopened.anchors == 9
    node.close()
