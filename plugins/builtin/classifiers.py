"""Classifiers that need no model: the category the event carries, or the detector's label."""

from __future__ import annotations

import re
from typing import Any

from PIL import Image

from plugins import hookimpl
from plugins.models import UNCATEGORIZED, Detection, ModelContext

_SHARD_NAME = re.compile(r"[^a-z0-9_-]+")


def normalise_category(value: object) -> str:
    """Lower-case, with runs of other characters folded to '-': a safe shard name."""
    if not isinstance(value, str):
        return UNCATEGORIZED
    name = _SHARD_NAME.sub("-", value.strip().lower()).strip("-")[:64]
    return name or UNCATEGORIZED


class EventAttrsClassifier:
    """Trusts the catalog: ``attrs["category"]`` of the event, else 'uncategorized'."""

    name = "event-attrs"

    def __init__(self, context: ModelContext) -> None:
        del context

    def classify(self, crops: list[Image.Image], detections: list[Detection], attrs: list[dict[str, Any]]) -> list[str]:
        return [normalise_category(a.get("category")) for a in attrs]


class DetectorLabelClassifier:
    """Uses the label the detector gave each crop (for fashion detectors)."""

    name = "detector-label"

    def __init__(self, context: ModelContext) -> None:
        del context

    def classify(self, crops: list[Image.Image], detections: list[Detection], attrs: list[dict[str, Any]]) -> list[str]:
        return [normalise_category(d.label) for d in detections]


@hookimpl
def lookstream_register_classifiers(registry):
    registry.add(EventAttrsClassifier.name, EventAttrsClassifier)
    registry.add(DetectorLabelClassifier.name, DetectorLabelClassifier)
