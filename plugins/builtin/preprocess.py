"""Image batches for models: resize, scale to [0, 1], normalise, NCHW float32."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize_normalise(
    images: list[Image.Image], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Resize each whole image to ``size`` (height, width), no crop, as the seed encoders do."""
    height, width = size
    batch = np.empty((len(images), height, width, 3), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    batch *= 1 / 255
    batch -= np.asarray(mean, dtype=np.float32)
    batch /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
