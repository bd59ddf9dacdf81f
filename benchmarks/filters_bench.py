"""Many records on one node: insert, build, memory, queries, filtered queries and restart, per vector codec.

    python -m benchmarks.filters_bench --sizes 1000000x128 --output benchmarks/results/filters.json
    python -m benchmarks.filters_bench --sizes 10000000x128 --codecs float32 --keep-checkpoints DIR --output ...
    python -m benchmarks.filters_bench --sizes 10000000x128 --codecs float32 --requery DIR --output ...

A run replaces only the result of its own size and codec in the output file.
At 10M x 128 a codec takes 35-40 minutes on 2 cores, most of it the final IVF
build; ``--requery`` measures the queries again on the checkpoint a run kept.

Vectors have a low intrinsic dimension, as real embeddings do: a random
two-layer map of a 24-d Gaussian, normalised; queries come from the same
distribution and are not indexed rows (tight clusters, or queries that are
rows, make every index look perfect). Each record has a ``price`` uniform in
[0, 1) and a ``brand`` of 20; a filter ``price <= s`` selects a share ``s``.

For each codec (``shards.vectors``: float32, float16, sq8), with the default
ShardSettings otherwise, in a fresh process:

* insert rate through ``ShardSet.apply`` (batches of 2,000 one-item records),
  and the time until every rebuild has settled;
* resident memory per record (RSS growth over the empty process) and the
  store's own metadata bytes per row (``sizes()``);
* unfiltered and filtered queries (selectivity 50%, 5%, 0.5%, 0.05%): p50/p99
  and recall@10 against exact (filtered) search over the same vectors, and the
  fewest hits any query returned;
* the same sealed FAISS index searched directly, with the same parameters and
  the same selector: what FAISS alone costs, next to the whole store;
* restart: writing a checkpoint, then ``load_latest`` until searchable.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from benchmarks.shards_bench import percentiles, rss_mb, settle
from indexer.config import ShardSettings
from indexer.store.backends import CODECS
from indexer.store.columns import compile_filter
from indexer.store.records import Item, Upsert
from indexer.store.shards import ShardSet

SELECTIVITIES = (0.5, 0.05, 0.005, 0.0005)
BRANDS = 20
GENERATION = {"encoder": "bench", "dim": 0}


def embeddings(n: int, dim: int, seed: int, intrinsic: int = 24) -> np.ndarray:
    """Normalised images of a 24-d Gaussian under one fixed random nonlinear map (the same for every seed)."""
    maps = np.random.default_rng(12345)
    w1 = maps.standard_normal((intrinsic, 256), dtype=np.float32) / np.sqrt(intrinsic)
    w2 = maps.standard_normal((256, dim), dtype=np.float32) / 16
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 200_000):
        z = rng.standard_normal((min(200_000, n - i), intrinsic), dtype=np.float32)
        block = np.tanh(z @ w1) @ w2
        out[i : i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def attributes(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.random(n), rng.integers(BRANDS, size=n)


def workload(n: int, dim: int, queries_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows, the queries, and each row's price and brand: the same for every run of a size."""
    return embeddings(n, dim, seed=1), embeddings(queries_n, dim, seed=2), *attributes(n)


def insert(
    shards: ShardSet, vectors: np.ndarray, prices: np.ndarray, brands: np.ndarray, batch: int = 2000, start: int = 0
) -> None:
    """Records ``p<start + j>`` for the rows j of these arrays, ``batch`` to an applied batch."""
    for i in range(0, len(vectors), batch):
        shards.apply(
            [
                Upsert(
                    "products",
                    f"p{start + j}",
                    0,
                    {"price": float(prices[j]), "brand": f"b{brands[j]}"},
                    (Item("top", vectors[j], (0, 0, 1, 1), None, 1.0),),
                )
                for j in range(i, min(i + batch, len(vectors)))
            ]
        )


def exact_top(base: np.ndarray, queries: np.ndarray, rows: np.ndarray | None, k: int = 10) -> list[set[int]]:
    subset = base if rows is None else base[rows]
    _, found = faiss.knn(queries, subset, min(k, len(subset)), metric=faiss.METRIC_INNER_PRODUCT)
    ids = found if rows is None else rows[found]
    return [set(row.tolist()) for row in ids]


def timed_queries(search, queries: np.ndarray) -> tuple[list[list[int]], dict]:
    times, results = [], []
    for q in queries:
        started = time.perf_counter()
        results.append(search(q))
        times.append(time.perf_counter() - started)
    return results, percentiles(times)


def recall(found: list[list[int]], exact: list[set[int]]) -> float:
    wanted = sum(len(e) for e in exact)
    return round(sum(len(set(f) & e) for f, e in zip(found, exact)) / max(wanted, 1), 4)


def nprobe_sweep(sealed, queries: np.ndarray, exact: list[set[int]]) -> list[dict]:
    """FAISS alone over the settled IVF segment at other nprobe values: what recall each costs at this size."""
    from indexer.store.backends import ivf_search_params
    from indexer.store.shards import one_openmp_thread

    def record_numbers(rows: np.ndarray) -> list[int]:
        return [int(sealed.columns.blob(r)[0][1:]) for r in rows.tolist() if r >= 0]

    nlist = faiss.extract_index_ivf(sealed.index).nlist
    out = []
    for nprobe in sorted({p for p in (16, 32, 64, 128, 256, 512, nlist // 16) if p <= nlist}):
        params = ivf_search_params(sealed.index, nprobe)
        with one_openmp_thread():
            rows, latency = timed_queries(lambda q, p=params: sealed.index.search(q[None], 10, params=p)[1][0], queries)
        found = [record_numbers(r) for r in rows]
        out.append({"nprobe": nprobe, "nlist": nlist, **latency, "recall_at_10": recall(found, exact)})
        print(out[-1], flush=True)
    return out


def query_figures(shards: ShardSet, base: np.ndarray, queries: np.ndarray, prices: np.ndarray, codec: str) -> dict:
    """Unfiltered and filtered queries over a settled store: latency, recall@10, FAISS alone beside it."""
    from indexer.search import Where, search_vector
    from indexer.store.backends import probed_lists
    from indexer.store.shards import one_openmp_thread

    out: dict = {}
    ids = lambda hits: [int(h.id[1:]) for h in hits]  # noqa: E731
    found, latency = timed_queries(lambda q: ids(shards.search(q, 10, "products")), queries)
    exact = exact_top(base, queries, None)
    out["unfiltered"] = {**latency, "recall_at_10": recall(found, exact)}
    (sealed,) = shards.view.shards[("products", "top")].sealed  # settled: one index
    with one_openmp_thread():
        _, raw_latency = timed_queries(
            lambda q: sealed.index.search(q[None], 10, params=sealed.search_params)[1][0].tolist(), queries
        )
    out["unfiltered"]["faiss_alone"] = raw_latency
    if sealed.kind == "ivf":
        out["unfiltered"]["nprobe"] = probed_lists(sealed.index, shards.settings)  # what the build tuned
        out["unfiltered"]["nprobe_sweep"] = nprobe_sweep(sealed, queries, exact)
    out["filtered"] = []
    index_only = shards.settings.model_copy(update={"filter_exact_row_cost": 0})
    for s in SELECTIVITIES:
        where = Where(("products",), ranges={"price": (0.0, s)})
        matching = np.flatnonzero(prices <= s)
        found, latency = timed_queries(lambda q, w=where: ids(search_vector(shards, q, 10, w)), queries)
        exact = exact_top(base, queries, matching)
        row = {
            "selectivity": s,
            "matching": len(matching),
            **latency,
            "recall_at_10": recall(found, exact),
            "fewest_hits": min(len(f) for f in found),
        }
        # FAISS alone: the same index, the same selector of the same rows, as the store builds them
        # (the store may plan an exact pass instead: FAISS alone always searches the index)
        mask = sealed.live_mask(shards.view.seq) & sealed.columns.match(
            compile_filter(shards.codes, {}, {"price": (0.0, s)}), sealed.count
        )
        count = int(np.count_nonzero(mask))
        with one_openmp_thread():
            _, raw_latency = timed_queries(
                lambda q, m=mask, c=count: shards.backend.knn_selected(sealed, q[None], 10, m, c, index_only),
                queries,
            )
        row["faiss_selector_alone"] = raw_latency
        out["filtered"].append(row)
        print(codec, row, flush=True)
    return out


def measure(n: int, dim: int, codec: str, queries_n: int, queue, keep: Path | None = None) -> None:
    """In a fresh process: everything for one codec; its checkpoint is kept under ``keep`` if given."""
    from indexer.store.checkpoint import load_latest, write_checkpoint
    from indexer.store.shards import release_freed_memory

    base, queries, prices, brands = workload(n, dim, queries_n)
    gc.collect()
    release_freed_memory()
    before = rss_mb()
    settings = ShardSettings(vectors={"products": codec})
    shards = ShardSet(dim, settings)
    started = time.perf_counter()
    insert(shards, base, prices, brands)
    inserted_s = time.perf_counter() - started
    print(f"{n:,} x {dim} {codec}: inserted in {inserted_s:.1f} s, settling", flush=True)
    settle(shards)
    settled_s = time.perf_counter() - started
    print(f"{n:,} x {dim} {codec}: settled at {settled_s:.1f} s", flush=True)
    gc.collect()
    release_freed_memory()
    (size,) = shards.sizes()
    store_mb = rss_mb() - before  # the benchmark's own vectors were resident before
    out = {
        "n": n,
        "dim": dim,
        "codec": codec,
        "index": size["sealed"],
        "insert_per_s": round(n / inserted_s),
        "insert_and_settle_s": round(settled_s, 1),
        "rss_bytes_per_record": round(store_mb * 2**20 / n),
        "vector_bytes_per_record": int(CODECS[codec].vector_bytes(dim)),
        "metadata_bytes_per_row": round(size["metadata_bytes"] / size["vectors"], 1),
    }
    out.update(query_figures(shards, base, queries, prices, codec))
    kept = keep / f"{n}x{dim}-{codec}" if keep else None
    with contextlib.nullcontext(kept) if kept else tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        write_checkpoint(Path(tmp), shards.view, {}, {}, {**GENERATION, "dim": dim})
        out["checkpoint_write_s"] = round(time.perf_counter() - started, 1)
        shards.close()
        shards = None  # the restored copy replaces them
        gc.collect()
        started = time.perf_counter()
        _, restored = load_latest(Path(tmp), {**GENERATION, "dim": dim}, settings)
        restored.search(queries[0], 10, "products")
        out["restart_s"] = round(time.perf_counter() - started, 1)
        out["restored_records"] = restored.records("products")
        restored.close()
    queue.put(out)


def requery(n: int, dim: int, codec: str, queries_n: int, kept: Path, queue) -> None:
    """In a fresh process: restart from a run's kept checkpoint, then its queries again (after a change
    to the query path, the hours of inserts and builds need not be spent again)."""
    from indexer.store.checkpoint import load_latest

    base, queries, prices, _ = workload(n, dim, queries_n)
    settings = ShardSettings(vectors={"products": codec})
    started = time.perf_counter()
    _, shards = load_latest(kept / f"{n}x{dim}-{codec}", {**GENERATION, "dim": dim}, settings)
    shards.search(queries[0], 10, "products")
    out = {"restart_s": round(time.perf_counter() - started, 1), "restored_records": shards.records("products")}
    out.update(tune_untuned(shards, settings))
    out.update(query_figures(shards, base, queries, prices, codec))
    out["queries_from_checkpoint"] = True
    shards.close()
    queue.put(out)


def tune_untuned(shards: ShardSet, settings: ShardSettings) -> dict:
    """Tune the IVF lists probed of a checkpoint written before builds tuned them, as a build now does."""
    from indexer.store.backends import OwnNeighbours, ivf_nprobe, tuned_nprobe
    from indexer.store.segments import RowSource

    (sealed,) = shards.view.shards[("products", "top")].sealed
    if sealed.kind != "ivf" or faiss.extract_index_ivf(sealed.index).nprobe > 1:
        return {}
    started = time.perf_counter()
    rows = RowSource.of_segments([(sealed, np.arange(sealed.count))], sealed.dim)
    ivf = faiss.extract_index_ivf(sealed.index)
    own = OwnNeighbours.of(rows, np.random.default_rng(0))
    ivf.nprobe = tuned_nprobe(sealed.index, own, ivf_nprobe(ivf.nlist, settings), settings.ivf_target_recall)
    sealed.search_params.nprobe = ivf.nprobe  # plain IVF: PQ indexes were always tuned by their build
    return {"nprobe_tuned_after_restart_s": round(time.perf_counter() - started, 1)}


def bulk_load(n: int, dim: int, batch: int = 2000, switch_interval_ms: float | None = None) -> dict:
    """Query latency while n rows arrive as fast as the store takes them, after, and once settled.

    The loader holds back while ``ShardSet.backlogged()`` is true, as the
    consumer does (consumers/indexing.py); one thread queries all the while.
    The process is set up as a serving node's is (indexer/interpreter.py), with
    ``switch_interval_ms`` (default: the node's). Goal (issue: ten million
    records): p99 during and after the load within 2x the settled p99.
    """
    import threading

    from indexer.config import ApiSettings
    from indexer.interpreter import serve_from_this_process
    from indexer.store.shards import one_openmp_thread

    base, queries, prices, brands = workload(n, dim, 200)
    if switch_interval_ms is None:
        switch_interval_ms = ApiSettings().switch_interval_ms
    serve_from_this_process(switch_interval_ms)
    shards = ShardSet(dim, ShardSettings())
    phase = {"name": "during"}
    samples: dict[str, list[float]] = {"during": [], "after": [], "settled": []}
    stop = threading.Event()

    def query_all_the_while() -> None:
        i = 0
        while not stop.is_set():
            q = queries[i % len(queries)]
            started = time.perf_counter()
            with one_openmp_thread():
                shards.search(q, 10, "products")
            samples[phase["name"]].append(time.perf_counter() - started)
            i += 1
            time.sleep(0.002)

    querier = threading.Thread(target=query_all_the_while)
    querier.start()
    started = time.perf_counter()
    held_s = 0.0
    for i in range(0, n, batch):
        while shards.backlogged():
            wait = time.perf_counter()
            shards.maintain()
            time.sleep(0.05)
            held_s += time.perf_counter() - wait
        insert(shards, base[i : i + batch], prices[i : i + batch], brands[i : i + batch], batch=batch, start=i)
        shards.maintain()
    loaded_s = time.perf_counter() - started
    phase["name"] = "after"
    settle(shards)
    settled_s = time.perf_counter() - started
    phase["name"] = "settled"
    time.sleep(10)
    stop.set()
    querier.join()
    shards.close()
    out = {
        "n": n,
        "dim": dim,
        "switch_interval_ms": switch_interval_ms,
        "load_s": round(loaded_s, 1),
        "held_s": round(held_s, 1),
        "settled_s": round(settled_s, 1),
    }
    for name, values in samples.items():
        out[name] = {**(percentiles(values) if values else {}), "queries": len(values)}
    for name in ("during", "after"):
        if "p99_ms" in out[name]:
            out[f"p99_ratio_{name}"] = round(out[name]["p99_ms"] / out["settled"]["p99_ms"], 2)
    return out


def restart_only(n: int, dim: int) -> dict:
    """Restart of an n-row node, its index made directly rather than through the store (hours at 10M here).

    The sealed segment is what a rebuild makes: an IVF-Flat index with the
    default number of lists (its k-means on 65,536 rows), rows ordered by record
    hash, metadata columns as ``ShardSet.apply`` makes them. A checkpoint of it
    is written, then ``load_latest`` is timed up to the first answer: what a
    node of that size reads when it restarts.
    """
    from dataclasses import replace

    from indexer.store.backends import FaissBackend, ivf_nlist, search_params
    from indexer.store.checkpoint import load_latest, write_checkpoint
    from indexer.store.columns import Codes, Columns, FilterSpec, record_hash
    from indexer.store.segments import built_segment, empty_growing

    settings = ShardSettings()
    codes = Codes(FilterSpec(settings.keyword_attributes, settings.numeric_attributes))
    backend = FaissBackend()
    started = time.perf_counter()
    order = np.argsort(np.fromiter((record_hash("products", f"p{j}") for j in range(n)), np.uint64, n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, ivf_nlist(n), faiss.METRIC_INNER_PRODUCT)
    index.train(embeddings(65_536, dim, seed=3))
    prices, brands = attributes(n)
    item = Item("top", np.zeros(dim, np.float32), (0, 0, 1, 1), None, 1.0)
    parts = []
    for i in range(0, n, 500_000):
        block = order[i : i + 500_000]
        index.add(embeddings(len(block), dim, seed=100 + i))
        attrs = ({"price": float(prices[j]), "brand": f"b{brands[j]}"} for j in block.tolist())
        parts.append(Columns.of_items(codes, [("products", f"p{j}", 0, item, 0, a) for j, a in zip(block, attrs)]))
        print(f"{i + len(block):,} rows", flush=True)
    index.make_direct_map()
    columns = Columns.concat(parts, [p.capacity for p in parts])
    del parts
    params = search_params("ivf", index, settings)
    sealed = replace(
        built_segment(np.arange(n, dtype=np.int64), columns, "ivf", backend, index=index, search_params=params),
        by_record=True,
    )
    shards = ShardSet.restore(
        dim, settings, {("products", "top"): (sealed, empty_growing(dim, backend, codes.spec))}, 1, codes
    )
    made_s = time.perf_counter() - started
    out = {
        "n": n,
        "dim": dim,
        "made_s": round(made_s, 1),
        "metadata_bytes_per_row": round(shards.sizes()[0]["metadata_bytes"] / n, 1),
    }
    generation = {**GENERATION, "dim": dim}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        started = time.perf_counter()
        write_checkpoint(Path(tmp), shards.view, {}, {}, generation)
        out["checkpoint_write_s"] = round(time.perf_counter() - started, 1)
        out["checkpoint_gb"] = round(sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e9, 2)
        shards.close()
        shards = sealed = index = columns = None
        gc.collect()
        started = time.perf_counter()
        _, restored = load_latest(Path(tmp), generation, settings)
        restored.search(embeddings(1, dim, seed=2)[0], 10, "products")
        out["restart_s"] = round(time.perf_counter() - started, 1)
        out["restored_records"] = restored.records("products")
        restored.close()
    return out


def kept_runs(output: Path | None) -> list[dict]:
    """The runs already in ``output``: a step at 10M rows takes hours, so other sizes' results stay
    and a run replaces only the one of its own size and codec."""
    if output is None or not output.exists():
        return []
    return json.loads(output.read_text()).get("runs", [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("quick", "full"), default="quick")
    parser.add_argument("--sizes", nargs="+", help="NxDIM, e.g. 10000000x128")
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), default=["float32", "float16", "sq8"])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--restart-only", type=int, metavar="N", help="only the restart of N rows (x 128)")
    parser.add_argument("--bulk-load", type=int, metavar="N", help="only query latency during a load of N rows")
    parser.add_argument("--switch-interval-ms", type=float, help="with --bulk-load (default: the node's)")
    parser.add_argument("--keep-checkpoints", type=Path, metavar="DIR", help="keep each run's checkpoint in here")
    parser.add_argument("--requery", type=Path, metavar="DIR", help="only the queries, on the checkpoints kept here")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.restart_only or args.bulk_load:
        out = (
            restart_only(args.restart_only, 128)
            if args.restart_only
            else bulk_load(args.bulk_load, 128, switch_interval_ms=args.switch_interval_ms)
        )
        print(out)
        if args.output:
            args.output.write_text(json.dumps(out, indent=2) + "\n")
        return
    quick = ["200000x128", "1000000x128"]  # HNSW (up to 200,000 rows), then IVF
    sizes = args.sizes or (quick if args.profile == "quick" else [*quick, "10000000x128", "1000000x1280"])
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "faiss": faiss.__version__,
        },
        "runs": kept_runs(args.output),
    }
    context = multiprocessing.get_context("spawn")
    for size in sizes:
        n, dim = (int(x) for x in size.split("x"))
        for codec in args.codecs:
            queue = context.Queue()
            earlier = [r for r in results["runs"] if (r["n"], r["dim"], r["codec"]) == (n, dim, codec)]
            if args.requery:
                if not earlier:
                    parser.error(f"--requery: no earlier run of {size} {codec} in {args.output}")
                target, arguments = requery, (n, dim, codec, args.queries, args.requery, queue)
            else:
                target, arguments = measure, (n, dim, codec, args.queries, queue, args.keep_checkpoints)
            process = context.Process(target=target, args=arguments)
            process.start()
            run = queue.get()
            if args.requery:  # keeps its insert, build and memory figures; a note on its old queries goes
                run = {**{k: v for k, v in earlier[0].items() if k != "note"}, **run}
            results["runs"] = [r for r in results["runs"] if (r["n"], r["dim"], r["codec"]) != (n, dim, codec)]
            results["runs"].append(run)
            results["runs"].sort(key=lambda r: (r["n"] * r["dim"], r["n"], list(CODECS).index(r["codec"])))
            process.join()
            print(run, flush=True)
            if args.output:
                args.output.parent.mkdir(parents=True, exist_ok=True)
                args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
