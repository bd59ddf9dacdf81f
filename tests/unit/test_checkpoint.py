import io

import numpy as np
import pytest

from indexer.config import ShardSettings
from indexer.store import backends
from indexer.store.checkpoint import load_latest, write_checkpoint
from indexer.store.columns import MISSING, compile_filter
from indexer.store.records import Delete
from indexer.store.shards import ShardSet
from tests.support.shards import DIM, fill, unit_vectors, upsert

POLICY = ShardSettings(seal_min_rows=200, growing_max_rows=150, hnsw_max_rows=1_000, hnsw_m=16, rebuild_min_dead=10_000)
GENERATION = {"encoder": "test", "version": "1", "dim": DIM}


def search_ids(shards, data, collection="products"):
    return [[(h.id, round(h.score, 4), h.attrs) for h in shards.search(v, 3, collection)] for v in data]


@pytest.fixture
def populated():
    shards = ShardSet(DIM, POLICY)
    data = unit_vectors(330)
    fill(shards, data[:300])
    shards.wait_for_rebuilds(timeout=60)
    fill(shards, data[300:], start=300, category="shoe")  # a second shard, still flat
    shards.apply([Delete("products", f"p{i}", 0) for i in range(0, 40)])  # dead rows in the sealed segment
    shards.apply([upsert("look-1", data[:3], collection="posts", attrs={"brand": "acme", "price": 9.5})])
    return shards, data


def test_round_trip_restores_every_record_and_result(tmp_path, populated):
    shards, data = populated
    assert any(s["sealed"] == "hnsw" for s in shards.sizes())
    checkpoint = write_checkpoint(tmp_path, shards.view, {"t/0": 17}, {"indexed": 331}, GENERATION)
    checkpoint_loaded, restored = load_latest(tmp_path, GENERATION, POLICY)
    assert checkpoint_loaded.offsets == {"t/0": 17} and checkpoint_loaded.counters == {"indexed": 331}
    assert checkpoint_loaded.seq == checkpoint.seq == shards.view.seq
    assert restored.records("products") == shards.records("products") == 290
    assert restored.records("posts") == 1
    assert restored.sizes() == shards.sizes()
    assert search_ids(restored, data[::7]) == search_ids(shards, data[::7])
    assert search_ids(restored, data[:1], "posts") == search_ids(shards, data[:1], "posts")

    # The restored set keeps working: updates and deletes of restored records.
    restored.apply([Delete("products", "p100", 0), upsert("p101", [data[0]])])
    assert restored.records("products") == 289
    assert restored.search(data[0], 1, "products")[0].id == "p101"
    assert all(h.id != "p100" for h in restored.search(data[100], 3, "products"))


def test_writes_after_the_view_are_not_in_the_checkpoint(tmp_path, populated):
    shards, data = populated
    view = shards.view
    shards.apply([Delete("products", "p200", 0), upsert("p999", [data[5]])])  # after the snapshot
    write_checkpoint(tmp_path, view, {}, {}, GENERATION)
    _, restored = load_latest(tmp_path, GENERATION, POLICY)
    assert restored.search(data[200], 1, "products")[0].id == "p200"
    assert all(h.id != "p999" for h in restored.search(data[5], 3, "products"))


def test_incomplete_and_foreign_checkpoints_are_ignored_and_old_ones_pruned(tmp_path, populated):
    shards, _ = populated
    first = write_checkpoint(tmp_path, shards.view, {"t/0": 1}, {}, GENERATION)
    write_checkpoint(tmp_path, shards.view, {"t/0": 2}, {}, {**GENERATION, "version": "2"})
    (tmp_path / ".tmp-ckpt-999999999999-1").mkdir()  # a crash mid-write
    checkpoint, _ = load_latest(tmp_path, GENERATION, POLICY)
    assert checkpoint.path == first.path and checkpoint.offsets == {"t/0": 1}
    for _ in range(3):
        write_checkpoint(tmp_path, shards.view, {"t/0": 3}, {}, GENERATION)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("ckpt-")]) == 2
    assert load_latest(tmp_path, {**GENERATION, "encoder": "other"}, POLICY) is None


def test_empty_set_round_trips(tmp_path):
    write_checkpoint(tmp_path, ShardSet(DIM).view, {}, {}, GENERATION)
    _, restored = load_latest(tmp_path, GENERATION, POLICY)
    assert restored.sizes() == [] and restored.search(np.ones(DIM, np.float32), 3, "products") == []


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "remove", "bad-manifest"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, populated, damage):
    shards, data = populated
    older = write_checkpoint(tmp_path, shards.view, {"t/0": 5}, {}, GENERATION)
    shards.apply([upsert("p-new", [data[1]])])
    newest = write_checkpoint(tmp_path, shards.view, {"t/0": 6}, {}, GENERATION)
    victim = max((p for p in newest.path.iterdir() if p.suffix == ".faiss"), key=lambda p: p.stat().st_size)
    if damage == "flip-a-byte":
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "remove":
        victim.unlink()
    else:
        (newest.path / "manifest.json").write_text("{not json")
    skipped: list[str] = []
    checkpoint, restored = load_latest(tmp_path, GENERATION, POLICY, skipped=skipped)
    assert checkpoint.path == older.path and checkpoint.offsets == {"t/0": 5}
    assert len(skipped) == 1 and skipped[0].startswith(newest.path.name)
    assert restored.records("products") == 290  # without p-new: Kafka replays it from offset 5


@pytest.mark.parametrize(
    ("written_on", "read_on"), [("torch-cuda", "torch-cuda"), ("torch-cuda", "cpu"), ("cpu", "torch-cuda")]
)
def test_a_checkpoint_written_on_one_backend_loads_on_any(tmp_path, torch_backend, written_on, read_on):
    """The files hold CPU arrays and FAISS indexes whatever the backend, so either backend reads them."""
    backend = {"cpu": backends.by_name("cpu"), "torch-cuda": torch_backend}
    data = unit_vectors(300)
    shards = ShardSet(DIM, POLICY, backend[written_on])
    fill(shards, data)
    shards.wait_for_rebuilds(timeout=60)
    assert shards.sizes()[0]["sealed"] == ("hnsw" if written_on == "cpu" else "flat")
    write_checkpoint(tmp_path, shards.view, {}, {}, GENERATION)
    _, restored = load_latest(tmp_path, GENERATION, POLICY, backend[read_on])
    assert restored.backend is backend[read_on] and restored.records("products") == 300
    state = restored.view.shards[("products", "top")]
    assert {s.backend for s in state.segments} == {backend[read_on]}
    if read_on == "torch-cuda":
        assert all(s.mirror is not None for s in state.segments)
    assert [restored.search(v, 1, "products")[0].id for v in data[:50]] == [f"p{i}" for i in range(50)]
    ids = [[h.id for h in found] for found in (shards.search(v, 5, "products") for v in data[::7])]
    assert [[h.id for h in restored.search(v, 5, "products")] for v in data[::7]] == ids


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        (ShardSettings(seal_min_rows=100, hnsw_max_rows=1_000, hnsw_ef_search=40), "hnsw"),
        (ShardSettings(seal_min_rows=100, hnsw_max_rows=100, ivf_nprobe_fraction=0.5, ivf_target_recall=1), "ivf"),
    ],
)
def test_a_restored_index_is_searched_with_the_parameters_it_was_built_with(tmp_path, settings, kind):
    """FAISS does not serialise search parameters: a load sets the same ones a build does."""
    shards = ShardSet(DIM, settings)
    fill(shards, unit_vectors(400), batch=400)
    shards.wait_for_rebuilds(timeout=60)
    (built,) = shards.view.shards[("products", "top")].sealed
    write_checkpoint(tmp_path, shards.view, {}, {}, GENERATION)
    _, restored = load_latest(tmp_path, GENERATION, settings)
    (loaded,) = restored.view.shards[("products", "top")].sealed
    assert built.kind == loaded.kind == kind
    if kind == "hnsw":
        assert built.search_params.efSearch == loaded.search_params.efSearch == 40
    else:
        assert built.search_params.nprobe == loaded.search_params.nprobe == built.index.nlist // 2


def test_attributes_indexed_after_a_checkpoint_are_filled_from_the_records_when_it_is_restored(tmp_path):
    before = ShardSettings(seal_min_rows=100, hnsw_max_rows=1_000, keyword_attributes=("brand",), numeric_attributes=())
    shards = ShardSet(DIM, before)
    data = unit_vectors(200)
    shards.apply(
        [upsert(f"p{i}", [v], attrs={"brand": "b", "colour": ("red", "blue")[i % 2]}) for i, v in enumerate(data)]
    )
    shards.wait_for_rebuilds(timeout=60)
    write_checkpoint(tmp_path, shards.view, {}, {}, GENERATION)
    shards.close()

    after = before.model_copy(update={"keyword_attributes": ("brand", "colour")})
    _, restored = load_latest(tmp_path, GENERATION, after)
    red = compile_filter(restored.codes, {"colour": ["RED"]}, {})
    hits = restored.search(data[1], 100, "products", where=red)
    assert len(hits) == 100 and all(h.attrs["colour"] == "red" for h in hits)
    restored.close()


SIZES = [["S", "M"], ["m", "L", "M"], "M", [], ["XL"], ("l", "s")]
LISTS = ShardSettings(seal_min_rows=100, growing_max_rows=60, hnsw_max_rows=1_000, keyword_attributes=("size",))


def with_sizes(data, start=0, sizes=SIZES):
    return [upsert(f"p{start + i}", [v], attrs={"size": sizes[i % len(sizes)]}) for i, v in enumerate(data)]


def filtered(shards, query, *values):
    where = compile_filter(shards.codes, {"size": list(values)}, {})
    return sorted(h.id for h in shards.search(query, 1_000, "products", where=where))


def test_list_valued_attributes_filter_the_same_after_a_restore(tmp_path):
    shards = ShardSet(DIM, LISTS)
    data = unit_vectors(230)
    for start in range(0, 200, 50):
        shards.apply(with_sizes(data[start : start + 50], start))
    shards.wait_for_rebuilds(timeout=60)
    shards.apply(with_sizes(data[200:], 200, [["XS", "M"], "xs"]))  # new combinations, in the growing segment
    assert shards.view.shards[("products", "top")].sealed is not None
    before = {v: filtered(shards, data[0], v) for v in ("M", "s", "L", "xl", "XS")}
    assert len(before["M"]) == 4 * 26 + 15  # i % 6 in (0, 1, 2) of each batch of 50, and each ["XS", "M"]
    write_checkpoint(tmp_path, shards.view, {}, {}, GENERATION)

    _, restored = load_latest(tmp_path, GENERATION, LISTS)
    assert restored.codes.keywords["size"].words == shards.codes.keywords["size"].words
    assert {v: filtered(restored, data[0], v) for v in before} == before
    restored.apply(with_sizes(data[:1], 500, [["XL", "xs"]]))  # a combination after the restore gets a new code
    assert filtered(restored, data[0], "XS") == sorted([*before["XS"], "p500"])
    assert filtered(restored, data[0], "xl") == sorted([*before["xl"], "p500"])
    shards.close()
    restored.close()


def as_written_before_lists(directory, values: int) -> None:
    """Rewrite a checkpoint as format 2, the version before list values were coded, wrote it.

    Only the first ``values`` words came from single values (every row with a
    list was MISSING, so no other word existed): the rest go, and so do their codes.
    Format 2 held one sealed segment a shard at most, named without a number.
    """
    import json

    import crc32c
    import msgpack

    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format"] = 2
    for entry in manifest["shards"]:
        assert len(entry["sealed"]) <= 1
        if entry["sealed"]:
            entry["sealed"] = entry["sealed"][0]
        else:
            del entry["sealed"]
    for path in directory.glob("*.sealed.0.*"):
        old, new = path.name, path.name.replace(".sealed.0.", ".sealed.")
        path.rename(directory / new)
        manifest["files"][new] = manifest["files"].pop(old)
    codes = msgpack.unpackb((directory / "codes.msgpack").read_bytes())
    words = codes["keywords"]["size"]
    values = words[:values]
    assert all(isinstance(w, str) for w in values)
    codes["keywords"]["size"] = values
    files = {"codes.msgpack": msgpack.packb(codes)}
    for path in directory.glob("*.npz"):
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        arrays["kw.size"] = np.where(arrays["kw.size"] >= len(values), MISSING, arrays["kw.size"]).astype(np.int32)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        files[path.name] = buffer.getvalue()
    for name, content in files.items():
        (directory / name).write_bytes(content)
        manifest["files"][name] = [len(content), crc32c.crc32c(content)]
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_from_before_lists_codes_its_list_rows_when_restored(tmp_path):
    shards = ShardSet(DIM, LISTS)
    data = unit_vectors(150)
    shards.apply(with_sizes(data[:50], 0, ["M", "S"]))
    shards.apply(with_sizes(data[50:100], 50))
    shards.wait_for_rebuilds(timeout=60)
    shards.apply(with_sizes(data[100:], 100))  # growing rows too
    expected = filtered(shards, data[0], "M")
    assert len(expected) == 25 + 2 * 26  # half the first 50; i % 6 in (0, 1, 2) of 50, twice
    checkpoint = write_checkpoint(tmp_path, shards.view, {}, {}, GENERATION)
    shards.close()
    as_written_before_lists(checkpoint.path, values=2)  # "m", "s" of the first batch

    _, restored = load_latest(tmp_path, GENERATION, LISTS)
    assert filtered(restored, data[0], "M") == expected
    assert filtered(restored, data[0], "XL") == sorted(f"p{s + i}" for s in (50, 100) for i in range(50) if i % 6 == 4)
    restored.close()


def test_a_format_1_checkpoint_is_converted_rather_than_replayed(tmp_path):
    """Written as the row-list format did: a flat sealed segment and a growing one, metadata a msgpack row each."""
    import io
    import json

    import msgpack

    def npy(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    data = unit_vectors(6)
    row = lambda i, attrs: ["products", "top", f"p{i}", 0, [0, 0, 4, 4], "tee", 0.5, 100 + i, attrs]  # noqa: E731
    directory = tmp_path / "ckpt-000000000007-1"
    directory.mkdir()
    files = {
        "0.sealed.npy": npy(data[:4]),
        "0.sealed.dead.npy": npy(np.array([False, True, False, False])),
        "0.sealed.meta": msgpack.packb([row(i, {"brand": "Acme" if i < 2 else "Zeta"}) for i in range(4)]),
        "0.growing.npy": npy(data[4:]),
        "0.growing.meta": msgpack.packb([row(i, {"brand": "Zeta"}) for i in (4, 5)]),
    }
    for name, content in files.items():
        (directory / name).write_bytes(content)
    manifest = {
        "format": 1, "seq": 7, "offsets": {"t/0": 9}, "counters": {}, "generation": GENERATION,
        "shards": [{"collection": "products", "category": "top", "id": 0, "sealed": "flat"}],
    }  # fmt: skip
    (directory / "manifest.json").write_text(json.dumps(manifest))

    checkpoint, restored = load_latest(tmp_path, GENERATION, POLICY)
    assert checkpoint.offsets == {"t/0": 9} and restored.records("products") == 5  # p1 was deleted
    assert [h.id for h in restored.search(data[5], 1, "products")] == ["p5"]
    zeta = compile_filter(restored.codes, {"brand": ["zeta"]}, {})
    assert {h.id for h in restored.search(data[0], 10, "products", where=zeta)} == {"p2", "p3", "p4", "p5"}
    (meta,) = restored.record("products", "p0")
    assert (meta.label, meta.box, meta.ts, meta.score) == ("tee", (0, 0, 4, 4), 100, 0.5)
    restored.apply([Delete("products", "p3", 0), upsert("p0", [data[1]])])  # the converted rows stay writable
    assert restored.records("products") == 4 and restored.search(data[1], 1, "products")[0].id == "p0"
    restored.close()


def test_several_sealed_segments_round_trip_and_a_format_2_checkpoint_still_loads(tmp_path):
    """Format 3 writes each sealed segment of a shard; format 2 had one at most, named without a number."""
    import json
    import shutil

    settings = POLICY.model_copy(update={"seal_min_rows": 100, "growing_max_rows": 100, "merge_factor": 8})
    shards = ShardSet(DIM, settings)
    data = unit_vectors(450)
    for start in range(0, 450, 100):
        fill(shards, data[start : start + 100], start=start, batch=100)
        shards.wait_for_rebuilds(timeout=60)
    shards.apply([Delete("products", f"p{i}", 0) for i in range(0, 400, 10)])
    assert shards.sizes()[0]["sealed_segments"] == 4
    written = write_checkpoint(tmp_path / "v3", shards.view, {"t/0": 5}, {}, GENERATION)
    _, restored = load_latest(tmp_path / "v3", GENERATION, settings)
    assert [len(s.sealed) for s in restored.view.shards.values()] == [4]
    assert search_ids(restored, data[::9]) == search_ids(shards, data[::9])
    assert restored.records("products") == 410
    restored.close()

    # The same shard as format 2 wrote it: its first sealed segment alone, and the rest of the rows lost
    # to this test (they would be replayed from Kafka).
    old = tmp_path / "v2" / written.path.name
    old.mkdir(parents=True)
    manifest = json.loads((written.path / "manifest.json").read_text())
    for name in manifest["files"].copy():
        if name.startswith("0.sealed.0.") or name.startswith("0.growing") or name == "codes.msgpack":
            target = name.replace("0.sealed.0.", "0.sealed.")
            shutil.copy(written.path / name, old / target)
            manifest["files"][target] = manifest["files"].pop(name)
        else:
            del manifest["files"][name]
    manifest["format"] = 2
    manifest["shards"][0]["sealed"] = manifest["shards"][0]["sealed"][0]
    (old / "manifest.json").write_text(json.dumps(manifest))
    _, restored = load_latest(tmp_path / "v2", GENERATION, settings)
    (state,) = restored.view.shards.values()
    assert len(state.sealed) == 1 and state.sealed[0].count == 100
    assert restored.search(data[55], 1, "products")[0].id == "p55"
    restored.close()
    shards.close()


def test_an_ivf_index_keeps_its_tuned_lists_and_one_written_before_tuning_probes_the_share(tmp_path):
    settings = ShardSettings(seal_min_rows=100, hnsw_max_rows=100, ivf_nprobe_fraction=0.5)
    shards = ShardSet(DIM, settings)
    fill(shards, unit_vectors(400), batch=400)
    shards.wait_for_rebuilds(timeout=60)
    (built,) = shards.view.shards[("products", "top")].sealed
    write_checkpoint(tmp_path / "tuned", shards.view, {}, {}, GENERATION)
    built.index.nprobe = 1  # what FAISS writes for an index whose build set no nprobe
    write_checkpoint(tmp_path / "before", shards.view, {}, {}, GENERATION)
    shards.close()
    ceiling = built.index.nlist // 2
    for name, nprobe in (("tuned", built.search_params.nprobe), ("before", ceiling)):
        _, restored = load_latest(tmp_path / name, GENERATION, settings)
        (loaded,) = restored.view.shards[("products", "top")].sealed
        assert loaded.search_params.nprobe == nprobe <= ceiling
        restored.close()
