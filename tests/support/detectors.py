"""Small detectors for tests: plugins in tests are small objects, registered or passed in directly."""

from __future__ import annotations

from plugins import hookimpl
from plugins.models import Detection


class HalvesDetector:
    """A street-photo detector for tests: the top and the bottom half of the image are two garments."""

    name = "halves"

    def detect(self, images):
        return [
            [
                Detection((0, 0, im.width, im.height // 2), "top", 0.9),
                Detection((0, im.height // 2, im.width, im.height), "bottom", 0.8),
            ]
            for im in images
        ]


class OutfitRegionsDetector:
    """A street-photo detector for generated posts (indexer/streetset.py): each region of the figure is a garment.

    Like ``ssd-street``'s upper/lower split of a person box, it knows where a
    garment is worn, not whether one is: a post without a bag still has a bag
    region, and the pair miner drops it (no named product of that category).
    """

    name = "outfit-regions"

    def __init__(self, context=None) -> None:
        del context

    def detect(self, images):
        from indexer.streetset import REGIONS

        return [
            [
                Detection(
                    (round(x0 * im.width), round(y0 * im.height), round(x1 * im.width), round(y1 * im.height)),
                    label,
                    0.9,
                )
                for label, (x0, y0, x1, y1) in REGIONS.items()
            ]
            for im in images
        ]


@hookimpl
def lookstream_register_detectors(registry):
    registry.add(OutfitRegionsDetector.name, OutfitRegionsDetector)
