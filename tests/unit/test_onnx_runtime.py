"""The built-in network in ONNX Runtime: the same vectors and categories as eager PyTorch, exported once and cached."""

from __future__ import annotations

import numpy as np
import pytest

from plugins.builtin import onnx_runtime
from plugins.builtin.efficientnet import EfficientNetLite0Encoder, ImageNetGarmentClassifier
from plugins.manager import resolve_runtime
from plugins.models import ModelContext
from tests.support.imagegen import product_image

pytestmark = pytest.mark.skipif(not onnx_runtime.available(), reason="onnxruntime is not installed")


def test_auto_takes_onnxruntime_on_a_cpu_and_torch_on_a_gpu():
    assert resolve_runtime("auto", "cpu") == "onnxruntime"
    assert resolve_runtime("auto", "cuda") == "torch"
    assert resolve_runtime("torch", "cpu") == "torch"


def test_onnxruntime_gives_the_vectors_and_categories_of_eager_pytorch(tmp_path):
    crops = [product_image(i, (120 + 7 * i, 200 - 5 * i)) for i in range(12)]
    torch_context = ModelContext("cpu", runtime="torch")
    onnx_context = ModelContext("cpu", runtime="onnxruntime", cache_dir=tmp_path)
    reference = EfficientNetLite0Encoder(torch_context).encode(crops)
    exported = EfficientNetLite0Encoder(onnx_context).encode(crops)
    assert exported.shape == reference.shape == (12, 1280) and exported.dtype == np.float32
    assert float((reference * exported).sum(axis=1).min()) >= 0.999
    options = {"min_score": 0.0}
    as_torch = ImageNetGarmentClassifier(ModelContext("cpu", runtime="torch", options=options))
    as_onnx = ImageNetGarmentClassifier(ModelContext("cpu", runtime="onnxruntime", cache_dir=tmp_path, options=options))
    assert as_onnx.classify(crops, [], [{}] * 12) == as_torch.classify(crops, [], [{}] * 12)
    assert sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.glob("*.onnx")) == [
        "efficientnet-lite0-embedding",
        "efficientnet-lite0-probabilities",
    ]


def test_an_export_is_cached_by_weights_and_settings(tmp_path):
    import torch

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    first = onnx_runtime.export(module, (1, 3, 16, 16), "tiny", tmp_path)
    written = first.path.stat().st_mtime_ns
    again = onnx_runtime.export(module, (1, 3, 16, 16), "tiny", tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == written  # loaded, not exported again
    batch = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        expected = module(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(again(batch)[0], expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        module[0].weight.add_(1.0)
    changed = onnx_runtime.export(module, (1, 3, 16, 16), "tiny", tmp_path)
    assert changed.path != first.path and len(list(tmp_path.glob("tiny-*.onnx"))) == 2


def test_per_image_sessions_prepare_and_answer_a_batch_in_order(tmp_path):
    import torch

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    model = onnx_runtime.export(module, (1, 3, 16, 16), "tiny", tmp_path, threads=3, per_image=True)
    assert len(model.per_image) == 3
    for size in (1, 2, 7):  # one image (the all-threads session), fewer images than sessions, more
        batch = np.random.default_rng(size).standard_normal((size, 3, 16, 16)).astype(np.float32)
        with torch.inference_mode():
            expected = module(torch.from_numpy(batch)).numpy()
        np.testing.assert_allclose(model(batch)[0], expected, rtol=1e-4, atol=1e-5)
        prepared: list[int] = []  # how many images each call of ``prepare`` was given

        def stack(images: list[np.ndarray], calls: list[int] = prepared) -> np.ndarray:
            calls.append(len(images))
            return np.stack(images)

        np.testing.assert_allclose(model(list(batch), stack)[0], expected, rtol=1e-4, atol=1e-5)
        assert prepared == ([1] * size if size > 1 else [1])  # per image, in the session that runs it
