"""The records topic's format: what an encoder writes is what a replica applies."""

import msgpack
import numpy as np
import pytest

from consumers.records_topic import InvalidRecord, Source, decode_record, encode_record, record_key, topic_name
from indexer.store.records import Delete, Item, Upsert


def upsert(dim: int = 8) -> Upsert:
    rng = np.random.default_rng(0)
    items = []
    for i, category in enumerate(("top", "bag")):
        vector = rng.normal(size=dim).astype(np.float32)
        items.append(Item(category, vector / np.linalg.norm(vector), (i, 0, 10 + i, 20), "label", 0.5 + i / 10))
    return Upsert("posts", "look-1", 1234, {"brand": "Acme", "price": 12.5}, tuple(items), b"\xff\xd8jpeg")


def test_an_upsert_survives_the_round_trip_exactly_in_float32():
    op = upsert()
    decoded, source = decode_record(encode_record(op, Source("posts-t", 2, 41), "gen-a"))
    assert source == Source("posts-t", 2, 41) and source.name == "posts-t/2"
    assert (decoded.collection, decoded.record_id, decoded.ts, decoded.attrs, decoded.thumbnail) == (
        "posts", "look-1", 1234, {"brand": "Acme", "price": 12.5}, b"\xff\xd8jpeg",
    )  # fmt: skip
    for got, sent in zip(decoded.items, op.items, strict=True):
        assert (got.category, got.box, got.label, got.score) == (sent.category, sent.box, sent.label, sent.score)
        assert got.vector.dtype == np.float32 and np.array_equal(got.vector, sent.vector)


def test_float16_vectors_are_half_the_bytes_and_close():
    op = upsert(dim=1280)
    full, half = encode_record(op, Source("t", 0, 0), "g"), encode_record(op, Source("t", 0, 0), "g", "float16")
    assert len(full) - len(half) == 2 * 1280 * 2
    decoded, _ = decode_record(half)
    assert np.abs(decoded.items[0].vector - op.items[0].vector).max() < 1e-3


def test_a_delete_is_a_record_too():
    decoded, source = decode_record(encode_record(Delete("products", "p1", 7), Source("products-t", 0, 3), "g"))
    assert decoded == Delete("products", "p1", 7) and source.offset == 3


def test_keys_and_topics_are_named_by_collection_id_and_generation():
    assert record_key("products", "p/1") == b"products/p/1"
    assert topic_name("lookstream.records", "efficientnet-lite0-abc") == "lookstream.records.efficientnet-lite0-abc"


def test_unknown_fields_are_ignored_and_unknown_versions_refused():
    body = msgpack.unpackb(encode_record(Delete("products", "p1", 7), Source("t", 0, 3), "g"))
    assert decode_record(msgpack.packb({**body, "new": 1}))[0] == Delete("products", "p1", 7)
    with pytest.raises(InvalidRecord, match="unknown record version"):
        decode_record(msgpack.packb({**body, "v": 2}))
    for bad in (b"", b"\xc1", msgpack.packb([1]), msgpack.packb({**body, "op": "move"}), msgpack.packb({"v": 1})):
        with pytest.raises(InvalidRecord):
            decode_record(bad)
