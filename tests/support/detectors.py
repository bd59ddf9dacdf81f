"""Small detectors for tests: plugins in tests are small objects, registered or passed in directly."""

from __future__ import annotations

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
