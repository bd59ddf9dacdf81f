"""The offline street detector on real photos from scikit-image."""

import pytest
from PIL import Image
from skimage import data

from plugins.builtin.ssd_street import SsdStreetDetector
from plugins.models import ModelContext


@pytest.fixture(scope="module")
def detector():
    return SsdStreetDetector(ModelContext("cpu"))


def test_a_person_becomes_an_upper_and_a_lower_body_item(detector):
    astronaut = Image.fromarray(data.astronaut())  # a portrait: head, shoulders and suit
    found = detector.detect([astronaut])[0]
    assert [d.label for d in found] == ["top", "bottom"]
    top, bottom = (d.box for d in found)
    assert top[1] < bottom[1] < top[3] < bottom[3]  # upper region above lower, overlapping a little
    assert all(0 <= v <= 512 for v in (*top, *bottom)) and found[0].score > 0.5


def test_no_people_no_bags_no_items_and_batches_keep_their_order(detector):
    cat, coffee = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())
    results = detector.detect([cat, Image.fromarray(data.astronaut()), coffee])
    assert results[0] == [] and results[2] == [] and len(results[1]) == 2


def test_threshold_option(detector):
    strict = SsdStreetDetector(ModelContext("cpu", options={"threshold": 0.99}))
    assert strict.detect([Image.fromarray(data.astronaut())]) == [[]]
