import msgpack
import pytest

from indexer.events import Event, InvalidEvent, decode_event, encode_event


def envelope(**fields):
    body = {"v": 1, "type": "product.upsert", "id": "p1", "ts": 1700000000000, "image": b"img", "attrs": {}}
    body.update(fields)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...}, use_bin_type=True)


def test_round_trip_keeps_unknown_fields():
    event = Event("post.upsert", "post-9", 123, image=b"x", attrs={"brand": "acme"}, extra={"lang": "fr"})
    assert decode_event(encode_event(event)) == event


def test_delete_needs_no_image():
    event = decode_event(envelope(type="product.delete", image=...))
    assert event.is_delete and event.collection == "products"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty message"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (envelope(v=2), "unknown envelope version"),
        (envelope(v=...), "unknown envelope version"),
        (envelope(type="product.move"), "unknown type"),
        (envelope(id=...), "missing field 'id'"),
        (envelope(id=42), "field 'id' must be str"),
        (envelope(id=""), "id must be"),
        (envelope(id="a\nb"), "id must be"),
        (envelope(id="x" * 300), "id must be"),
        (envelope(ts="yesterday"), "field 'ts' must be int"),
        (envelope(ts=-5), "non-negative"),
        (envelope(attrs=[1]), "attrs must be a map"),
        (envelope(attrs={1: "x"}), "not msgpack: int is not allowed for map key"),
        (envelope(attrs={b"k": "x"}), "keys must be strings, got bytes at attrs"),
        (envelope(attrs={"a": {b"x": 2}}), "keys must be strings, got bytes at attrs.a"),
        (envelope(attrs={"blob": b"\x00"}), "must be a JSON value, got bytes"),
        (envelope(attrs={"price": float("nan")}), "not a finite number"),
        (envelope(attrs={"n": 2**60}), "too large for JSON"),
        (envelope(attrs={f"k{i}": i for i in range(65)}), "at most 64"),
        (envelope(attrs={"a": [[[[[[["deep"]]]]]]]}), "nested deeper"),
        (envelope(attrs={"title": "x" * 20_000}), "bytes as JSON"),
        (envelope(image="text"), "image must be bytes"),
        (envelope(image=..., image_uri=7), "image_uri must be a string"),
        (envelope(image=...), "needs 'image' or 'image_uri'"),
    ],
)
def test_invalid_events_say_why(payload, reason):
    with pytest.raises(InvalidEvent, match=reason):
        decode_event(payload)
