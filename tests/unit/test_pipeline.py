import pytest

from indexer.events import Event
from indexer.images import UriPolicy
from indexer.pipeline import Delete, Pipeline, Rejected, Upsert, crop
from tests.imagegen import encoded, product_image


@pytest.fixture
def pipeline(default_models, tmp_path):
    return Pipeline(default_models, batch_size=2, max_pixels=10_000_000, uris=UriPolicy((tmp_path,)))


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
    assert "not a JPEG" in outcomes[1].reason and "outside" in outcomes[4].reason
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
