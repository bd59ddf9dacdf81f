"""A detector for clean catalog thumbnails: the whole image is the one item."""

from __future__ import annotations

from PIL import Image

from plugins import hookimpl
from plugins.models import Detection, ModelContext


class WholeImageDetector:
    name = "whole-image"

    def __init__(self, context: ModelContext) -> None:
        del context  # no model to place

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        return [[Detection(box=(0, 0, im.width, im.height), label=None, score=1.0)] for im in images]


@hookimpl
def lookstream_register_detectors(registry):
    registry.add(WholeImageDetector.name, WholeImageDetector)
