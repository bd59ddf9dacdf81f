"""Learning from the stream, measured: mine pairs from generated posts, fine-tune, and search held-out products.

\b
    python -m benchmarks.street_training --output benchmarks/results/street-training.json

1. Builds the street-to-shop set (indexer/streetset.py): a training split and
   a held-out split with disjoint products.
2. Indexes the training split's products and posts through the live pipeline
   with the pair miner attached, exactly as a durable node does (posts are
   detected by the outfit-regions test detector, products as whole images).
3. Runs the trainer for the head only, then with the base's last blocks;
   each with self pairs (``--self-pairs``) and without, and with self pairs
   and the base's own features kept beside the head (``--base-weight``).
4. Indexes the held-out catalog into a fresh node per encoder and searches
   it with every held-out post (``photo=street``): for each product a post
   names, the hits of the detected garment of its category give Recall@1/5/10
   and mAP (1/rank within the first 20 hits). The same with the re-rank hook on.
5. Runs ``lookstream evaluate``'s offline set (flip, colour, JPEG, scale,
   street composites) for each encoder and re-ranker as the command does
   (whole images; the composites searched as street photos, the rest as
   product photos), to check that re-finding a product
   under photographic change did not get worse. 60 queries of a kind move in
   steps of 0.017, so with ``--offline-seeds N`` it also pools Recall@1 per
   kind over the sets built with seeds 0..N-1 (other crops of the same
   photos, other changes): a steadier figure beside the official one.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click

from indexer.config import Settings
from indexer.evalset import build_offline_set
from indexer.evaluation import evaluate
from indexer.node import Node
from indexer.pipeline import Rejected
from indexer.search import Where, search_image
from indexer.store.thumbnails import store_thumbnails
from indexer.streetset import build_street_set, read_posts, split_events
from indexer.training import pairs
from indexer.training.trainer import TrainOptions, train
from plugins.manager import build_plugin_manager, load_models, resolve_runtime
from plugins.models import ModelContext
from tests.support.detectors import OutfitRegionsDetector

K = 20


def models_for(encoder: str, options: dict, reranker: str | None = None):
    context = ModelContext("cpu", runtime=resolve_runtime("auto", "cpu"))
    models = load_models(
        build_plugin_manager(), "whole-image", encoder, "event-attrs", context, options, None, reranker
    )
    return dataclasses.replace(models, detectors={"posts": OutfitRegionsDetector()})


def index(node: Node, events, batch: int = 64) -> int:
    count = 0
    for start in range(0, len(events), batch):
        outcomes = node.active.pipeline.process(events[start : start + batch])
        applied = [o for o in outcomes if not isinstance(o, Rejected)]
        node.active.shards.apply(applied)
        store_thumbnails(node.thumbnails, applied)
        count += len(applied)
    return count


def street_search(node: Node, split: Path, rerank: bool = False) -> dict[str, float]:
    """Recall@1/5/10 and mAP of held-out posts' garments among the held-out catalog."""
    generation = node.active
    ranks = []
    started = time.perf_counter()
    for line in read_posts(split):
        data = (split / line["image"]).read_bytes()
        result = search_image(
            generation.pipeline, generation.shards, node.settings.images, data, K, Where(("products",)), "street"
        )
        by_label = {item.label: item for item in result.items}
        for pid in line["products"]:
            category = next(p.parent.name for p in (split / "catalog").glob(f"*/{pid}.jpg"))
            ids = [h.id for h in by_label[category].hits]
            ranks.append(ids.index(pid) + 1 if pid in ids else None)
    n = max(len(ranks), 1)
    return {
        **{f"recall@{k}": sum(1 for r in ranks if r is not None and r <= k) / n for k in (1, 5, 10)},
        "map": sum(1 / r for r in ranks if r is not None) / n,
        "queries": len(ranks),
        "ms_per_post": 1000 * (time.perf_counter() - started) / max(len(read_posts(split)), 1),
    }


@click.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("street-training-work"))
@click.option("--products", default=1500, show_default=True)
@click.option("--heldout", default=300, show_default=True)
@click.option("--epochs", default=15, show_default=True, help="Epochs of the head-only run.")
@click.option("--unfreeze", default=1, show_default=True, help="Base blocks trained in the second run.")
@click.option("--block-epochs", default=10, show_default=True, help="Epochs of the second run.")
@click.option(
    "--self-pairs", default=0.5, show_default=True, help="Share of self pairs in both runs (`lookstream train`)."
)
@click.option(
    "--base-weight",
    "base_weights",
    multiple=True,
    type=float,
    default=(0.5,),
    show_default=True,
    help="Base weight (`lookstream train --base-weight`) of one more run of each kind, with self pairs; repeatable.",
)
@click.option(
    "--offline-seeds", default=1, show_default=True, help="Offline sets (seeds 0..N-1) pooled per query kind."
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path))
def main(
    work: Path,
    products: int,
    heldout: int,
    epochs: int,
    unfreeze: int,
    block_epochs: int,
    self_pairs: float,
    base_weights: tuple[float, ...],
    offline_seeds: int,
    output: Path | None,
) -> None:
    results: dict = {
        "products": products,
        "heldout_products": heldout,
        "self_pairs": self_pairs,
        "base_weights": list(base_weights),
    }
    started = time.perf_counter()
    if not (work / "set" / "heldout" / "posts.jsonl").exists():
        build_street_set(work / "set", products=products, heldout=heldout)
    results["build_s"] = round(time.perf_counter() - started, 1)

    data_dir = work / "data"
    settings = Settings.model_validate({"data_dir": str(data_dir)})
    if not (data_dir / "pairs" / "manifest.jsonl").exists():
        node = Node.create(settings, models_for("efficientnet-lite0", {}))
        node.active.pipeline.observer = pairs.PairMiner(data_dir / "pairs", settings.pairs)
        product_events, post_events = split_events(work / "set" / "train")
        started = time.perf_counter()
        index(node, product_events)
        index(node, post_events)
        results["mine_s"] = round(time.perf_counter() - started, 1)
        node.close()
    dataset = pairs.resolve(data_dir / "pairs")
    results["pairs"] = pairs.counts(dataset)
    results["dropped"] = dict(dataset.dropped)
    click.echo(f"pairs: {results['pairs']}, dropped {results['dropped']}")

    encoders = {"efficientnet-lite0 (base)": ("efficientnet-lite0", {}, None)}
    runs = []
    for name, blocks, n in (("head only", 0, epochs), (f"last {unfreeze} blocks", unfreeze, block_epochs)):
        # With self pairs first, so that its metrics count all the caching a run from scratch does;
        # the same run without them then finds every view it needs cached, and gives the comparison.
        if self_pairs:
            runs.append((f"{name}, self pairs {self_pairs}", blocks, n, self_pairs, 0.0))
        runs.append((name, blocks, n, 0.0, 0.0))
        for weight in base_weights:
            runs.append((f"{name}, self pairs {self_pairs}, base weight {weight}", blocks, n, self_pairs, weight))
    for name, blocks, n, share, weight in runs:
        train_options = TrainOptions(trained_blocks=blocks, epochs=n, self_pairs=share, base_weight=weight)
        result = train(data_dir, train_options, echo=click.echo, progress=False)
        results[f"train {name}"] = result.metrics
        encoders[f"fine-tuned, {name}"] = ("finetuned", {"finetuned": {"path": str(result.path)}}, None)
    # Re-ranked: the last blocks' runs with the base's features kept (one per weight).
    best = [f"fine-tuned, {name}" for name, blocks, _, _, weight in runs if blocks and weight]
    for name in best or [f"fine-tuned, {runs[-1][0]}"]:
        encoders[f"{name}, multi-crop re-rank"] = (*encoders[name][:2], "multi-crop")
    encoders["efficientnet-lite0 (base), multi-crop re-rank"] = ("efficientnet-lite0", {}, "multi-crop")

    offline = build_offline_set(work / "offline")
    more_offline = [build_offline_set(work / f"offline-seed{seed}", seed=seed) for seed in range(1, offline_seeds)]
    table = {}
    for name, (encoder, options, reranker) in encoders.items():
        models = models_for(encoder, options, reranker)
        node = Node.create(Settings.model_validate({"data_dir": str(work / "eval" / name)}), models)
        products_heldout, _ = split_events(work / "set" / "heldout")
        index(node, products_heldout)
        row = {"street": street_search(node, work / "set" / "heldout")}
        # The offline set as `lookstream evaluate` runs it: whole images for both photo kinds (the
        # generated posts' detector knows nothing of its composites). The re-ranker works on whole
        # images too: each query is the one item the whole-image detector finds.
        models = dataclasses.replace(models, detectors={})
        report = evaluate(Node.create(Settings(), models), offline)
        row["offline"] = {"recall@1": report.recall[1], "map": report.mean_average_precision, **report.by_kind}
        if more_offline:
            kinds = [report.by_kind, *(evaluate(Node.create(Settings(), models), o).by_kind for o in more_offline)]
            row["offline_pooled"] = {
                "sets": len(kinds),
                **{k: sum(r[k] for r in kinds) / len(kinds) for k in kinds[0]},
            }
        table[name] = row
        click.echo(f"{name}: {json.dumps(row)}")
        node.close()
    results["table"] = table
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
