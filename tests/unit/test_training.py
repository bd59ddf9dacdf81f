"""`lookstream train`: fine-tuning on mined pairs, deterministic, resumable, loadable by the encoder plugin."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from indexer.cli import main
from indexer.config import PairSettings
from indexer.store.thumbnails import store_thumbnails
from indexer.streetset import build_street_set, split_events
from indexer.training.pairs import PairMiner
from indexer.training.trainer import TrainOptions, retrieval_metrics, train
from plugins.manager import build_plugin_manager, registry
from plugins.models import ModelContext
from tests.unit.test_pairs import street_node


@pytest.fixture(scope="module")
def mined(tmp_path_factory, default_models):
    """A data dir with thumbnails and pairs mined from a small generated street set."""
    tmp = tmp_path_factory.mktemp("mined")
    root = build_street_set(tmp / "set", products=30, heldout=3, posts_per_product=1.0)
    node = street_node(default_models, tmp)
    node.active.pipeline.observer = PairMiner(tmp / "data" / "pairs", PairSettings()).observe
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
    assert vectors.shape == (2, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert encoder.version.startswith("efficientnet-lite0-")


def test_train_command_unfreezes_the_last_blocks_and_versions_its_output(mined):
    args = ["train", "--data-dir", str(mined), "--epochs", "1", "--views", "1", "--batch-size", "8", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--unfreeze", "1", "--dim", "32"])
    assert result.exit_code == 0, result.output
    assert "held-out R@1" in result.output and "base encoder, held-out" in result.output
    written = sorted((mined / "trained").iterdir())
    assert [p.name for p in written][-1].startswith("efficientnet-lite0-ft-v")
    config = json.loads((written[-1] / "config.json").read_text())
    assert (config["dim"], config["trained_blocks"]) == (32, 1)


def test_train_command_says_when_there_are_no_pairs(tmp_path):
    result = CliRunner().invoke(main, ["train", "--data-dir", str(tmp_path), "--no-progress"])
    assert result.exit_code != 0 and "attrs.products" in result.output
