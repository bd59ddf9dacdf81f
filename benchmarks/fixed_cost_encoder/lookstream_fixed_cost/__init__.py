"""An encoder whose cost is a fixed wait per batch, as a model on a GPU is: the CPU stays free meanwhile.

benchmarks/scale_out.py runs several encoder processes with it on one machine,
so that their throughput shows how the encoder role scales, not how many
CPU cores the machine has. The vector is the image scaled to 8x8 (192 numbers),
enough to tell the benchmark's images apart.
"""

from __future__ import annotations

import time

import numpy as np
from PIL import Image

from plugins import hookimpl


class FixedCostEncoder:
    name = "fixed-cost"
    dim = 192

    def __init__(self, context) -> None:
        self.cost_s = float(context.options.get("cost_ms", 100)) / 1000
        self.version = f"8x8-{self.cost_s * 1000:g}ms"

    def encode(self, crops: list[Image.Image]) -> np.ndarray:
        time.sleep(self.cost_s)
        out = np.stack([np.asarray(c.convert("RGB").resize((8, 8)), dtype=np.float32).ravel() for c in crops])
        out += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@hookimpl
def lookstream_register_encoders(registry):
    registry.add(FixedCostEncoder.name, FixedCostEncoder)
