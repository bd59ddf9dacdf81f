"""The plugin module named by the ``lookstream`` entry point."""

from __future__ import annotations

import numpy as np
from PIL import Image

from plugins import hookimpl


class ColourHistogramEncoder:
    name = "colour-histogram"

    def __init__(self, context) -> None:
        self.bins = tuple(int(b) for b in context.options.get("bins", (8, 4, 4)))
        self.dim = int(np.prod(self.bins))
        self.version = "hsv-" + "x".join(map(str, self.bins))

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        out = np.zeros((len(crops), self.dim), dtype=np.float32)
        for i, crop in enumerate(crops):
            hsv = np.asarray(crop.convert("HSV").resize((64, 64))).reshape(-1, 3)
            histogram, _ = np.histogramdd(hsv, bins=self.bins, range=[(0, 256)] * 3)
            vector = np.sqrt(histogram.ravel())
            out[i] = vector / (np.linalg.norm(vector) or 1.0)
        return out


@hookimpl
def lookstream_register_encoders(registry):
    registry.add(ColourHistogramEncoder.name, ColourHistogramEncoder)
