import pytest

from indexer.config import ImageSettings
from indexer.events import Event
from indexer.failures import Reason
from indexer.pipeline import Pipeline, Rejected, crop
from indexer.store.records import Delete, Upsert
from tests.support.detectors import HalvesDetector
from tests.support.imagegen import encoded, product_image


@pytest.fixture
def pipeline(default_models, tmp_path):
    pipeline = Pipeline(default_models, ImageSettings(max_pixels=10_000_000, file_roots=(tmp_path,)), batch_size=2)
    yield pipeline
    pipeline.close()


def test_outcomes_line_up_with_events_and_bad_images_are_rejected(pipeline, tmp_path):
    (tmp_path / "a.png").write_bytes(encoded(product_image(3), "PNG"))
    events = [
        Event("product.upsert", "p1", 1, image=encoded(product_image(1)), attrs={"category": "top"}),
        Event("product.upsert", "p2", 2, image=b"broken"),
        Event("product.delete", "p3", 3),
        Event("post.upsert", "s1", 4, image_uri=(tmp_path / "a.png").as_uri()),
        Event("post.upsert", "s2", 5, image_uri="file:///etc/passwd"),
        Event("product.upsert", "p4", 6, image=encoded(product_image(4)), attrs={"category": "Shoes"}),
    ]
    outcomes = pipeline.process(events)
    assert [type(o) for o in outcomes] == [Upsert, Rejected, Delete, Upsert, Rejected, Upsert]
    assert "not a JPEG" in outcomes[1].detail and "outside" in outcomes[4].detail
    assert outcomes[1].kind is Reason.IMAGE_UNDECODABLE and outcomes[4].kind is Reason.IMAGE_URI_REFUSED
    assert outcomes[0].items[0].category == "top" and outcomes[5].items[0].category == "shoes"
    assert outcomes[3].collection == "posts" and outcomes[3].items[0].box == (0, 0, 160, 200)


def test_batching_does_not_change_vectors(pipeline, default_models):
    images = [product_image(i) for i in range(5)]
    batched = pipeline.encode(images)
    one_by_one = [default_models.encoder.encode([im])[0] for im in images]
    for a, b in zip(batched, one_by_one):
        assert abs(float(a @ b) - 1.0) < 1e-4


def test_crop_clips_to_the_image():
    image = product_image(0)
    assert crop(image, (0, 0, image.width, image.height)) is image
    assert crop(image, (-10, -10, 50, 60)).size == (50, 60)
    assert crop(image, (50, 50, 40, 40)) is image  # empty box: the whole image


class CountingEncoder:
    """A small encoder that fails on poisoned images and records every batch it was given."""

    name, version, dim = "counting", "1", 4

    def __init__(self, fail_on=(), transient=False):
        self.fail_on, self.transient, self.batches = set(fail_on), transient, []

    def encode(self, crops):
        import numpy as np

        from plugins.models import RetryableError

        self.batches.append(len(crops))
        colours = [crop.getpixel((0, 0)) for crop in crops]
        if self.transient:
            raise RetryableError("the model server is away")
        if any(c in self.fail_on for c in colours):
            raise IndexError("a bug in the model")
        vectors = np.array([[c[0], c[1], c[2], 1.0] for c in colours], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def solid(colour, size=(32, 32)) -> bytes:
    from PIL import Image

    return encoded(Image.new("RGB", size, colour), "PNG")


def small_pipeline(encoder, **images):
    from plugins.builtin.classifiers import EventAttrsClassifier
    from plugins.builtin.whole_image import WholeImageDetector
    from plugins.manager import Models
    from plugins.models import ModelContext

    context = ModelContext("cpu")
    models = Models(WholeImageDetector(context), encoder, EventAttrsClassifier(context))
    return Pipeline(models, ImageSettings(**images), batch_size=8, model_attempts=2)


def events_of(colours):
    return [Event("product.upsert", f"p{i}", i, image=solid(c)) for i, c in enumerate(colours)]


def test_a_model_failure_is_split_down_to_the_event_that_causes_it():
    colours = [(i * 10, 0, 0) for i in range(8)]
    encoder = CountingEncoder(fail_on={colours[5]})
    outcomes = small_pipeline(encoder).process(events_of(colours))
    assert [type(o) for o in outcomes] == [Upsert] * 5 + [Rejected] + [Upsert] * 2
    assert outcomes[5].kind is Reason.MODEL_FAILED and "IndexError: a bug in the model" in outcomes[5].detail
    # 8 twice, then halves: the good half once, the bad half twice, down to the single event.
    assert encoder.batches[:2] == [8, 8] and encoder.batches.count(1) >= 2 and len(encoder.batches) <= 16


def test_a_failure_that_is_not_the_events_fault_is_raised_not_rejected():
    from plugins.models import RetryableError

    with pytest.raises(RetryableError):
        small_pipeline(CountingEncoder(transient=True)).process(events_of([(1, 1, 1), (2, 2, 2)]))


def test_models_that_fail_on_every_event_are_broken_not_the_events():
    from plugins.models import RetryableError

    colours = [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    with pytest.raises(RetryableError, match="failed on each of 3 images"):
        small_pipeline(CountingEncoder(fail_on=set(colours))).process(events_of(colours))


def test_decoded_pixels_per_chunk_are_capped():
    encoder = CountingEncoder()
    pipeline = small_pipeline(encoder, max_batch_pixels=3 * 32 * 32)
    outcomes = pipeline.process(events_of([(i, i, i) for i in range(7)]))
    assert all(isinstance(o, Upsert) for o in outcomes) and encoder.batches == [3, 3, 1]


def test_images_are_analysed_small_and_boxes_come_back_in_original_pixels():
    encoder = CountingEncoder()
    event = Event("product.upsert", "big", 1, image=solid((9, 9, 9), (3000, 1500)))
    (outcome,) = small_pipeline(encoder, decode_max_side=300).process([event])
    assert outcome.items[0].box == (0, 0, 3000, 1500)


def test_each_collection_is_detected_with_its_own_detector():
    from dataclasses import replace

    pipeline = small_pipeline(CountingEncoder())
    pipeline.models = replace(pipeline.models, detectors={"posts": HalvesDetector()})
    events = [
        Event("product.upsert", "p1", 1, image=solid((10, 10, 10), (40, 60)), attrs={"category": "top"}),
        Event("post.upsert", "s1", 2, image=solid((20, 20, 20), (40, 60))),
        Event("product.upsert", "p2", 3, image=solid((30, 30, 30), (40, 60)), attrs={"category": "shoes"}),
    ]
    product, post, other = pipeline.process(events)
    assert [item.box for item in product.items] == [(0, 0, 40, 60)] and len(other.items) == 1
    assert [(item.label, item.box) for item in post.items] == [("top", (0, 0, 40, 30)), ("bottom", (0, 30, 40, 60))]
