"""Image batches for models: resize into uint8 NHWC, and optionally scale, normalise and make NCHW float32."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def resize(images: list[Image.Image], size: tuple[int, int]) -> np.ndarray:
    """Each whole image resized to ``size`` (height, width), no crop, as the seed encoders do: uint8 NHWC.

    A model that takes these bytes and normalises inside its own graph (the
    built-in EfficientNet does) moves a quarter of its preprocessing off the
    Python thread and into the runtime's vectorised, multi-threaded kernels.
    """
    height, width = size
    batch = np.empty((len(images), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return batch


def resize_normalise(
    images: list[Image.Image], size: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """:func:`resize`, then scaled to [0, 1] and normalised per channel: float32 NCHW."""
    batch = resize(images, size).astype(np.float32)
    batch *= 1 / 255
    batch -= np.asarray(mean, dtype=np.float32)
    batch /= np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
