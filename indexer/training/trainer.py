"""Fine-tune the encoder on mined street-to-shop pairs (``lookstream train``).

The recipe is the seed's (fashion-image-feature-extractor): the base encoder
with a linear projection head (128-d by default), trained with a symmetric
in-batch-negative contrastive loss (InfoNCE in both directions, street -> shop
and shop -> street) whose temperature is learned, as CLIP's is. Optionally the
base's last blocks train too (``trained_blocks``). By default the base's own
features stay in the embedding beside the head's (``base_weight``), and the
loss sees their sum: the head learns what the base misses, and the base keeps
telling near copies apart (docs/models.md, "Training").

Made to run on a CPU:

* The part of the network that does not train is run once per image *view*
  and its output cached (``data_dir/training/cache``): every image gets
  ``views`` augmented views up front (street-side augmentation for garment
  crops, lighter shop-side for thumbnails, indexer/training/augment.py), and
  each epoch draws one of them. Head-only training then costs a matrix product
  per batch; with the last blocks unfrozen, the 7x7 feature maps go through
  only those blocks. The frozen part runs in ONNX Runtime where it is installed.
  The base's own features beside the head (the frozen copy of those blocks)
  are computed once per view before the first epoch.
* Self pairs (``self_pairs``, a share of each epoch's pairs): a ``photo``
  view of a training thumbnail (tighter frame, lost resolution, heavy JPEG,
  colour, mirror) with a ``shop`` view of the same thumbnail, in the same
  in-batch-negative batches as the street pairs, so that the model is also
  asked to re-find one image under photographic change, which street crops
  against thumbnails never ask. Their ``photo`` views are cached like the
  others, under a key of their own. docs/models.md has what they change.
* Products are split into training and held-out by a hash of their id, so a
  held-out product never appears in training, whichever run or seed. Held-out
  Recall@1/5/10 and mAP are measured after every epoch (garment crops of held-out
  posts searched among every held-out product's thumbnail) and for the base
  encoder before training.
* Deterministic for a seed (views, batches, initialisation); an interrupted
  run resumes from its last finished epoch (``data_dir/training/runs/<digest>``)
  when run again with the same data and options.

The result is a versioned model directory (``data_dir/trained/<base>-ft-vNNN``):
weights and config (plugins/builtin/finetuned.py reads them), ``manifest.json``
(what it was trained on and how) and ``metrics.json`` (per epoch and final).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from indexer.store.thumbnails import ThumbnailStore
from indexer.training import augment
from indexer.training.pairs import Dataset, resolve
from plugins.builtin import finetuned
from plugins.builtin.preprocess import resize

log = logging.getLogger(__name__)

INPUT_SIZE = (224, 224)
KS = (1, 5, 10)


@dataclass(frozen=True)
class TrainOptions:
    base: str = "efficientnet-lite0"
    dim: int = 128
    #: The base's last blocks that train with the head (0: the head only).
    trained_blocks: int = 0
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    block_lr: float = 3e-4
    #: Augmented views computed per image (the first is the image itself).
    views: int = 4
    #: Share of products held out (by a hash of the id).
    heldout: float = 0.2
    seed: int = 0
    #: Use at most this many training pairs (None: all).
    max_pairs: int | None = None
    #: Initial temperature of the loss (learned from there).
    temperature: float = 0.07
    #: Share of each epoch's pairs that are self pairs (a ``photo`` view and a ``shop`` view of one
    #: training thumbnail), drawn beside all the street pairs: 0.5 adds as many self pairs as street pairs.
    self_pairs: float = 0.0
    #: Share of the base encoder's own cosine kept in the embedding (0: the head alone, the seed's
    #: recipe); plugins/builtin/finetuned.py ``build_network``, docs/models.md for what it changes.
    base_weight: float = 0.5


@dataclass
class Split:
    anchors: list[Path]  # garment crops
    positives: list[str]  # product id of each anchor
    gallery: list[str]  # product ids (thumbnails)


def is_heldout(product_id: str, share: float) -> bool:
    return int(hashlib.sha256(product_id.encode()).hexdigest()[:8], 16) / 2**32 < share


def split(dataset: Dataset, thumbnails: ThumbnailStore, options: TrainOptions) -> tuple[Split, Split]:
    """Training and held-out pairs; pairs whose thumbnail is gone (a deleted product) are left out."""
    have = {pid for pid in dataset.products if thumbnails.get("products", pid) is not None}
    train, held = Split([], [], []), Split([], [], [])
    for pair in dataset.pairs:
        if pair.product_id in have and pair.anchor.exists():
            side = held if is_heldout(pair.product_id, options.heldout) else train
            side.anchors.append(pair.anchor)
            side.positives.append(pair.product_id)
    if options.max_pairs is not None and len(train.anchors) > options.max_pairs:
        keep = sorted(np.random.default_rng(options.seed).permutation(len(train.anchors))[: options.max_pairs])
        train = Split([train.anchors[i] for i in keep], [train.positives[i] for i in keep], [])
    train.gallery = sorted(set(train.positives))
    held.gallery = sorted(pid for pid in have if is_heldout(pid, options.heldout))
    return train, held


def retrieval_metrics(queries: np.ndarray, gallery: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Recall@K and mAP (one relevant item per query: 1/rank) of cosine search over ``gallery``."""
    if len(queries) == 0:
        return {**{f"recall@{k}": 0.0 for k in KS}, "map": 0.0}
    scores = queries @ gallery.T
    mine = scores[np.arange(len(queries)), relevant]
    ranks = 1 + (scores > mine[:, None]).sum(axis=1)
    return {**{f"recall@{k}": float((ranks <= k).mean()) for k in KS}, "map": float((1.0 / ranks).mean())}


class FeatureCache:
    """The frozen part's output for every view of every image, computed once and kept on disk.

    A file's name covers the runtime and its thread count besides the caller's
    key: ONNX Runtime's results move in the last bits with the number of threads
    that summed them, and a run is deterministic only on the same features.
    """

    def __init__(self, root: Path, network, threads: int | None, progress: bool) -> None:
        from plugins.builtin import onnx_runtime

        self.root = root
        self.network = network
        self.threads = threads or os.cpu_count() or 1
        self.runtime = "onnxruntime" if onnx_runtime.available() else "torch"
        self.progress = progress
        self._stem: Callable[[np.ndarray], np.ndarray] | None = None
        self.seconds = 0.0
        self.images = 0

    def stem(self) -> Callable[[np.ndarray], np.ndarray]:
        if self._stem is None:
            import torch

            from plugins.builtin import onnx_runtime
            from plugins.models import ModelContext

            network = self.network

            class Stem(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.network = network

                def forward(self, pixels):
                    return self.network.stem(pixels)

            context = ModelContext("cpu", self.threads, runtime=self.runtime, cache_dir=self.root)
            self._stem = onnx_runtime.runner(
                Stem().eval(), (1, *INPUT_SIZE, 3), f"train-stem-cut{network.cut}", context, input_dtype="uint8"
            )
        return self._stem

    def features(self, name: str, images: list[Callable[[], Image.Image]], key: str) -> np.ndarray:
        """float16 array (len(images), ...) of the stem's output, from the cache when ``key`` matches."""
        path = self.root / f"{name}-{_digest(key, self.runtime, self.threads)[:16]}.npy"
        if path.exists():
            return np.load(path)
        from tqdm import tqdm

        started = time.perf_counter()
        out: list[np.ndarray] = []
        batch = 32
        for start in tqdm(range(0, len(images), batch), desc=f"caching {name}", disable=not self.progress, leave=False):
            pixels = resize([make() for make in images[start : start + batch]], INPUT_SIZE)
            out.append(np.asarray(self.stem()(pixels), dtype=np.float16))
        array = np.concatenate(out) if out else np.empty((0,), np.float16)
        self.seconds += time.perf_counter() - started
        self.images += len(images)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, path)
        return array


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def next_version(root: Path, base: str) -> Path:
    taken = [int(p.name.rsplit("-v", 1)[1]) for p in root.glob(f"{base}-ft-v*") if p.name.rsplit("-v", 1)[1].isdigit()]
    return root / f"{base}-ft-v{max(taken, default=0) + 1:03d}"


@dataclass(frozen=True)
class Result:
    path: Path
    metrics: dict[str, Any]


def train(
    data_dir: Path,
    options: TrainOptions,
    *,
    out: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Result:
    """Train on the pairs under ``data_dir``; write and return the model directory."""
    import torch
    from tqdm import tqdm

    started = time.time()
    if threads:
        torch.set_num_threads(threads)
    dataset = resolve(data_dir / "pairs")
    thumbnails = ThumbnailStore(data_dir / "thumbnails")
    train_split, held = split(dataset, thumbnails, options)
    if len(train_split.anchors) < 2:
        raise ValueError(
            f"{len(train_split.anchors)} training pairs under {data_dir / 'pairs'}: publish posts that name "
            "their products in attrs.products (`lookstream pairs` shows what was mined)"
        )
    n_street = len(train_split.anchors)
    n_self = _self_pair_count(n_street, options.self_pairs)
    echo(
        f"{len(train_split.anchors)} training pairs of {len(train_split.gallery)} products; held out: "
        f"{len(held.anchors)} pairs, {len(held.gallery)} products"
        + (f"; {n_self} self pairs per epoch" if n_self else "")
    )
    network = finetuned.build_network(options.base, options.dim, options.trained_blocks, options.base_weight)
    # The head's first weights come from the seed alone. Building the base draws from the same generator,
    # but only the first time a process loads it (it is cached), so seeding before the build was not enough.
    torch.manual_seed(options.seed)
    network.head.reset_parameters()
    cache = FeatureCache(data_dir / "training" / "cache", network, threads, progress)

    def thumb(pid: str) -> bytes:
        return thumbnails.get("products", pid) or b""

    views = options.views
    anchor_bytes = [p.read_bytes() for p in train_split.anchors]
    product_bytes = [thumb(pid) for pid in train_split.gallery]

    def viewed(data: list[bytes], transform, salt: int, plain: bool = True) -> list[Callable[[], Image.Image]]:
        makers = []
        for i, raw in enumerate(data):
            for v in range(views):
                seed = options.seed * 1_000_003 + salt * 7919 + i * 131 + v
                makers.append(
                    (lambda raw=raw: _open(raw))
                    if plain and v == 0
                    else (lambda raw=raw, seed=seed: transform(_open(raw), seed))
                )
        return makers

    base_key = (options.base, network.cut, options.trained_blocks, augment.VERSION)
    key = _digest(base_key, views, options.seed, [hashlib.sha256(b).hexdigest() for b in anchor_bytes])
    anchors = cache.features("anchors", viewed(anchor_bytes, augment.street, 1), key)
    product_digests = [hashlib.sha256(b).hexdigest() for b in product_bytes]
    key = _digest(base_key, views, options.seed, product_digests)
    products = cache.features("products", viewed(product_bytes, augment.shop, 2), key)
    anchors = anchors.reshape(len(anchor_bytes), views, *anchors.shape[1:])
    products = products.reshape(len(product_bytes), views, *products.shape[1:])
    photos = products[:0]
    if n_self:
        # The view kind is in the key. Every view is augmented: its partner, a shop view, may be the plain image.
        photo_key = _digest(base_key, "photo", views, options.seed, product_digests)
        photos = cache.features("photos", viewed(product_bytes, augment.photo, 3, plain=False), photo_key)
        photos = photos.reshape(len(product_bytes), views, *photos.shape[1:])
    held_bytes = [p.read_bytes() for p in held.anchors]
    gallery_bytes = [thumb(pid) for pid in held.gallery]
    held_queries = cache.features(
        "heldout-queries",
        [lambda raw=raw: _open(raw) for raw in held_bytes],
        _digest(base_key, [hashlib.sha256(b).hexdigest() for b in held_bytes]),
    )
    held_gallery = cache.features(
        "heldout-gallery",
        [lambda raw=raw: _open(raw) for raw in gallery_bytes],
        _digest(base_key, [hashlib.sha256(b).hexdigest() for b in gallery_bytes]),
    )
    gallery_index = {pid: i for i, pid in enumerate(held.gallery)}
    held_relevant = np.array([gallery_index[pid] for pid in held.positives], dtype=np.int64)
    product_index = {pid: i for i, pid in enumerate(train_split.gallery)}
    positive_of = np.array([product_index[pid] for pid in train_split.positives], dtype=np.int64)

    def in_batches(function, features: np.ndarray, dim: int) -> np.ndarray:
        """``function`` over cached features, 256 rows at a time, without gradients."""
        with torch.no_grad():
            out = [
                function(torch.from_numpy(features[start : start + 256].astype(np.float32))).numpy()
                for start in range(0, len(features), 256)
            ]
        return np.concatenate(out) if out else np.empty((0, dim), np.float32)

    def embed(features: np.ndarray, head: bool = True) -> np.ndarray:
        if head:
            return in_batches(network.rest, features, network.dim)
        return in_batches(lambda x: torch.nn.functional.normalize(network.pooled(x), dim=1), features, network.dim)

    def base_of_views(features: np.ndarray) -> np.ndarray | None:
        """The base's own features of every view (``base_features``), once, not once an epoch; None without them."""
        if not options.base_weight:
            return None
        dim = finetuned.BASES[options.base]
        flat = in_batches(network.base_features, features.reshape(-1, *features.shape[2:]), dim)
        return flat.reshape(*features.shape[:2], dim)

    def heldout_metrics(head: bool = True) -> dict[str, float]:
        return retrieval_metrics(embed(held_queries, head), embed(held_gallery, head), held_relevant)

    base_metrics = heldout_metrics(head=False)
    echo(f"base encoder, held-out: {_describe(base_metrics)}")

    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / options.temperature)))
    groups = [{"params": [*network.head.parameters(), logit_scale], "lr": options.lr}]
    if options.trained_blocks:
        groups.append({"params": network.trainable()[2:], "lr": options.block_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)

    run_dir = data_dir / "training" / "runs" / _digest(asdict(options), key, len(anchor_bytes))[:16]
    history: list[dict[str, Any]] = []
    first_epoch = 0
    state_path = run_dir / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        logit_scale.data.copy_(state["logit_scale"])
        history, first_epoch = state["history"], state["epoch"]
        echo(f"resuming {run_dir.name} after epoch {first_epoch}")

    # The frozen copy of the trained blocks runs once per view here, not once an epoch (counted as training).
    started_base = time.perf_counter()
    anchor_base, product_base, photo_base = (base_of_views(f) for f in (anchors, products, photos))
    train_seconds = sum(h["seconds"] for h in history) + time.perf_counter() - started_base
    seen = sum(h["images"] for h in history)
    for epoch in range(first_epoch, options.epochs):
        epoch_started = time.perf_counter()
        rng = np.random.default_rng((options.seed, epoch))
        torch.manual_seed(options.seed * 1000 + epoch)
        # Items 0..n-1 are the street pairs, n.. the epoch's self pairs (a product each): one index space,
        # so a batch never holds one product twice, whichever kind of pair brings it.
        items_product = np.concatenate([positive_of, _self_pair_products(rng, len(product_bytes), n_self)])
        batches = _batches(rng.permutation(len(items_product)), items_product, options.batch_size)
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{options.epochs}", disable=not progress, leave=False)
        for batch in bar:
            a_view = rng.integers(0, views, len(batch))
            p_view = rng.integers(0, views, len(batch))
            street = batch < n_street
            xa = _gather(anchors, photos, batch, street, items_product, a_view)
            xp = torch.from_numpy(products[items_product[batch], p_view].astype(np.float32))
            ba = bp = None
            if product_base is not None:
                ba = _gather(anchor_base, photo_base, batch, street, items_product, a_view)
                bp = torch.from_numpy(product_base[items_product[batch], p_view])
            za, zp = network.rest(xa, ba), network.rest(xp, bp)
            logits = logit_scale.exp().clamp(max=100) * za @ zp.T
            target = torch.arange(len(batch))
            loss = (
                torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)
            ) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds = time.perf_counter() - epoch_started
        metrics = heldout_metrics()
        images = 2 * sum(len(b) for b in batches)
        train_seconds += seconds
        seen += images
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)) if losses else 0.0,
                "temperature": (1 / logit_scale.exp().clamp(max=100)).item(),
                "seconds": round(seconds, 2),
                "images": images,
                **{f"heldout_{k}": v for k, v in metrics.items()},
            }
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "state.tmp"
        state = {
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "logit_scale": logit_scale.detach(),
            "history": history,
            "epoch": epoch + 1,
        }
        torch.save(state, tmp)
        os.replace(tmp, state_path)
        echo(
            f"epoch {epoch + 1}/{options.epochs}: loss {history[-1]['loss']:.3f}, "
            f"held-out R@1 {metrics['recall@1']:.3f} ({seconds:.1f} s)"
        )

    final = heldout_metrics()
    path = out or next_version(data_dir / "trained", options.base)
    config = finetuned.save(
        network,
        path,
        {
            "base": options.base,
            "dim": options.dim,
            "trained_blocks": options.trained_blocks,
            "base_weight": options.base_weight,
            "input_size": list(INPUT_SIZE),
        },
    )
    metrics = {
        "base_heldout": base_metrics,
        "heldout": final,
        "epochs": history,
        "train_seconds": round(train_seconds, 1),
        "train_images_per_s": round(seen / train_seconds, 1) if train_seconds else None,
        "cache_seconds": round(cache.seconds, 1),
        "cache_images_per_s": round(cache.images / cache.seconds, 1) if cache.seconds else None,
        "total_seconds": round(time.time() - started, 1),
    }
    manifest = {
        "model": path.name,
        "version": config["version"],
        "options": asdict(options),
        "data": {
            "pairs_dir": "pairs",
            "posts": dataset.posts,
            "train_pairs": len(train_split.anchors),
            "train_products": len(train_split.gallery),
            "heldout_pairs": len(held.anchors),
            "heldout_products": len(held.gallery),
            "dropped": dict(dataset.dropped),
            "digest": key[:16],
        },
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (path / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    echo(f"held-out: {_describe(final)} (base encoder: {_describe(base_metrics)})")
    return Result(path, metrics)


def _gather(street_views, photo_views, batch, street, items_product, view):
    """The batch's anchor-side rows: a street pair's garment crop view, a self pair's photo view."""
    import torch

    out = np.empty((len(batch), *street_views.shape[2:]), np.float32)
    out[street] = street_views[batch[street], view[street]]
    if not street.all():
        out[~street] = photo_views[items_product[batch[~street]], view[~street]]
    return torch.from_numpy(out)


def _describe(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.replace('recall', 'R')} {v:.3f}" for k, v in metrics.items())


def _self_pair_count(street_pairs: int, share: float) -> int:
    """Self pairs per epoch so that they are ``share`` of the epoch's pairs."""
    if not 0 <= share < 1:
        raise ValueError(f"self_pairs is a share of the pairs, from 0 to below 1 (got {share})")
    return round(street_pairs * share / (1 - share))


def _self_pair_products(rng: np.random.Generator, products: int, count: int) -> np.ndarray:
    """``count`` product indices, every product once before any comes again, in random order."""
    if count == 0 or products == 0:
        return np.empty(0, dtype=np.int64)
    rounds = -(-count // products)
    return np.concatenate([rng.permutation(products) for _ in range(rounds)])[:count].astype(np.int64)


def _batches(order: np.ndarray, positive_of: np.ndarray, size: int) -> list[np.ndarray]:
    """Batches in ``order`` where no product appears twice (it would be its own in-batch negative)."""
    batches: list[list[int]] = []
    open_batches: list[tuple[list[int], set[int]]] = []
    for i in order.tolist():
        product = int(positive_of[i])
        for members, products in open_batches:
            if product not in products:
                members.append(i)
                products.add(product)
                if len(members) == size:
                    batches.append(members)
                    open_batches.remove((members, products))
                break
        else:
            open_batches.append(([i], {product}))
    batches.extend(members for members, _ in open_batches if len(members) > 1)
    return [np.array(b, dtype=np.int64) for b in batches]
