"""Learning from the stream, end to end on a real broker: tagged posts -> pairs -> `lookstream train --swap` -> flip."""

import asyncio

import numpy as np
import pytest
from click.testing import CliRunner

from indexer.cli import main
from indexer.config import Settings
from indexer.node import build_node
from indexer.streetset import build_street_set, split_events
from indexer.training.pairs import resolve
from indexer.web.app import create_app
from plugins import manager
from producers.publisher import make_producer, publish
from tests.integration.conftest import eventually
from tests.support.imagegen import JPEG

pytestmark = pytest.mark.integration

TOKEN = "t0ken"


async def test_pairs_mined_from_tagged_posts_train_an_encoder_that_takes_over_with_no_failed_query(
    aiohttp_client, topics, tmp_path, monkeypatch
):
    # Posts are detected by the outfit-regions test detector, registered like any plugin.
    monkeypatch.setattr(manager, "DEFAULT_PLUGINS", (*manager.DEFAULT_PLUGINS, "tests.support.detectors"))
    root = build_street_set(tmp_path / "set", products=30, heldout=3, posts_per_product=1.0)
    products, posts = split_events(root / "train")
    settings = Settings.model_validate(
        {
            **topics.model_dump(),
            "data_dir": tmp_path / "data",
            "models": {"detectors": {"posts": "outfit-regions"}},
            "api": {"admin_token": TOKEN},
            "shards": {"checkpoint_interval_s": 0.5},
        }
    )
    loop = asyncio.get_running_loop()
    node = await loop.run_in_executor(None, build_node, settings)
    client = await aiohttp_client(create_app(node))
    producer = make_producer(settings.kafka)
    publish(posts[:5], settings.kafka.topics.posts, producer, progress=False)  # before the products they name
    publish(products, settings.kafka.topics.products, producer, progress=False)
    publish(posts[5:], settings.kafka.topics.posts, producer, progress=False)
    named = sum(len(post.attrs["products"]) for post in posts)

    async def mined():
        stats = await (await client.get("/stats")).json()
        indexed = stats["records"] == {"products": len(products), "posts": len(posts)}
        return indexed and len(resolve(settings.data_dir / "pairs").pairs) == named

    await eventually(mined, timeout=120)
    first = node.active.id

    failures: list[str] = []
    queries = 0
    stop = asyncio.Event()

    async def client_loop():
        nonlocal queries
        i = 0
        while not stop.is_set():
            product = products[i % len(products)]
            response = await client.post("/search?k=1", data=product.image, headers=JPEG)
            queries += 1
            if response.status != 200:
                failures.append(f"{response.status}: {await response.text()}")
            elif [h["id"] for h in (await response.json())["hits"][:1]] != [product.id]:
                failures.append(f"{product.id} not first")
            i += 1
            await asyncio.sleep(0.05)

    querying = asyncio.create_task(client_loop())
    args = ["train", "--data-dir", str(settings.data_dir), "--epochs", "2", "--views", "2", "--batch-size", "8"]
    args += ["--heldout", "0.2", "--no-progress", "--swap", str(client.make_url("")), "--token", TOKEN]
    result = await loop.run_in_executor(None, lambda: CliRunner().invoke(main, args))
    assert result.exit_code == 0, result.output
    assert "held-out R@1" in result.output and "catching-up" in result.output

    async def flipped() -> bool:
        return node.active.id != first and node.active.models.encoder.name == "finetuned"

    await eventually(flipped, timeout=120)
    await asyncio.sleep(1.0)  # keep querying the new generation for a moment
    stop.set()
    await querying
    assert failures == [] and queries > 10

    stats = await (await client.get("/stats")).json()
    # The trained head's 128 numbers beside the base's 1,280 (`lookstream train --base-weight`, 0.5 by default).
    assert [(g["encoder"], g["state"], g["dim"]) for g in stats["generations"]] == [("finetuned", "active", 1408)]
    assert stats["records"] == {"products": len(products), "posts": len(posts)}
    # Answers come from the new encoder: its vectors are what the shards take now.
    vector = node.active.models.encoder.encode([split_image(products[0].image)])[0]
    response = await client.post("/search/vector", json={"vector": vector.tolist(), "k": 1})
    assert response.status == 200 and (await response.json())["hits"][0]["id"] == products[0].id
    response = await client.post("/search/vector", json={"vector": np.ones(1280).tolist(), "k": 1})
    assert response.status == 400
    # A street photo finds the products it shows among the catalog's records.
    response = await client.post("/search?photo=street&k=5", data=posts[0].image, headers=JPEG)
    body = await response.json()
    assert response.status == 200 and {item["label"] for item in body["items"]} == {"top", "bottom", "bag"}
    producer.close()


def split_image(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
