from indexer.events import Event
from producers.folders import Skipped, post_events, product_events
from tests.support.imagegen import encoded, product_image

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 10_000_000}


def test_product_layouts_and_skips(tmp_path):
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "p1.jpg").write_bytes(encoded(product_image(1)))
    (tmp_path / "top" / "notes.txt").write_text("hi")
    (tmp_path / "top" / "broken.png").write_bytes(b"nope")
    (tmp_path / "shoes" / "p2").mkdir(parents=True)
    (tmp_path / "shoes" / "p2" / "a.webp").write_bytes(encoded(product_image(2), "WEBP"))
    (tmp_path / "shoes" / "p2" / "b.jpg").write_bytes(encoded(product_image(3)))
    (tmp_path / "shoes" / "empty").mkdir()
    (tmp_path / "stray.jpg").write_bytes(encoded(product_image(4)))
    (tmp_path / "bag").mkdir()
    (tmp_path / "bag" / "huge.jpg").write_bytes(encoded(product_image(5)) + b"\0" * 1_000_000)

    out = list(product_events(tmp_path, **LIMITS))
    events = {e.id: e for e in out if isinstance(e, Event)}
    skipped = {s.path.name: s.reason for s in out if isinstance(s, Skipped)}
    assert set(events) == {"p1", "p2"}
    assert events["p1"].attrs["category"] == "top" and events["p2"].attrs == {"category": "shoes", "source": "a.webp"}
    assert events["p2"].type == "product.upsert" and events["p2"].image.startswith(b"RIFF")
    assert skipped.keys() == {"notes.txt", "broken.png", "b.jpg", "empty", "stray.jpg", "huge.jpg"}
    assert "not a JPEG" in skipped["broken.png"] and "message limit" in skipped["huge.jpg"]


def test_posts_folder(tmp_path):
    (tmp_path / "post-1.png").write_bytes(encoded(product_image(1), "PNG"))
    (tmp_path / "sub").mkdir()
    out = list(post_events(tmp_path, **LIMITS))
    assert [(e.type, e.id) for e in out if isinstance(e, Event)] == [("post.upsert", "post-1")]
    assert [s.path.name for s in out if isinstance(s, Skipped)] == ["sub"]


def test_a_post_names_its_products_in_a_json_file_beside_it(tmp_path):
    (tmp_path / "look.jpg").write_bytes(encoded(product_image(1)))
    (tmp_path / "look.json").write_text('{"products": ["p1", "p2"]}')
    (tmp_path / "bad.jpg").write_bytes(encoded(product_image(2)))
    (tmp_path / "bad.json").write_text("[1]")
    out = list(post_events(tmp_path, **LIMITS))
    events = {e.id: e for e in out if isinstance(e, Event)}
    assert events["look"].attrs == {"source": "look.jpg", "products": ["p1", "p2"]}
    assert [(s.path.name, s.reason) for s in out if isinstance(s, Skipped)] == [("bad.json", "not a JSON object")]
