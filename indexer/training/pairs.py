"""Street-to-shop pairs mined from the stream: garments detected in posts, and the products the posts name.

A post event may name the products it shows (``attrs.products``: a list of
product ids). While a node indexes, the :class:`PairMiner` sees each analysed
event (the pipeline's ``observer``):

* a product: its id and category are recorded (its thumbnail is already kept
  by the node, ``data_dir/thumbnails``, and is the positive of its pairs);
* a post naming products: each detected garment is cropped from the decoded
  image and stored as a JPEG (the anchor), with its category, and the post's
  named products are recorded beside it.

Everything goes into ``data_dir/pairs/``: ``anchors/<digest>.jpg`` and an
append-only ``manifest.jsonl`` (one line per product or post version, and
per delete). A post re-sent with the same ``ts`` (a replay, a new generation)
is skipped, so the dataset is de-duplicated. A newer version of a post
replaces the older one, and a delete (``post.delete``, ``product.delete``)
ends a record: the crops of the version it replaces are removed from disk
(a user who deletes a post takes its photo out of the training data too), and
a version older than one already recorded is not stored. Files no current
version names (a crash between the manifest and the removal) are removed when
a miner opens the dataset. Past ``pairs.max_anchors`` crops, posts are
counted and not stored.

Pairs are resolved when read (:func:`resolve`), since a post may arrive before
the products it names: a garment of category C pairs with the one named
product of category C. Where the post names several products of C, or shows
several garments of C, which goes with which is ambiguous and the garment is
dropped; a garment whose category no named product has is dropped too. The
category is the classifier's, or the detector's label where the classifier
could not place the crop (``uncategorized``), or for a product the category
its event carries.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.config import PairSettings
from indexer.events import Event
from indexer.images import Decoded
from indexer.store.records import Upsert
from plugins.builtin.classifiers import normalise_category
from plugins.models import UNCATEGORIZED

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


def item_category(category: str, fallback: object) -> str:
    """The classifier's category, else the fallback (a detector label, the event's category)."""
    if category != UNCATEGORIZED:
        return category
    return normalise_category(fallback) if fallback else UNCATEGORIZED


def named_products(attrs: dict[str, Any]) -> list[str]:
    """The product ids a post names in ``attrs.products`` (strings; anything else is ignored)."""
    named = attrs.get("products")
    if not isinstance(named, list):
        return []
    return list(dict.fromkeys(p for p in named if isinstance(p, str) and p))


class PairMiner:
    """Writes the pairs dataset as events are analysed or deleted; safe to share between generations (threads)."""

    def __init__(self, root: Path, settings: PairSettings) -> None:
        self.root = root
        self.settings = settings
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str, int, bool]] = set()  # (type, id, ts, deleted) already in the manifest
        self._newest: dict[tuple[str, str], int] = {}  # (type, id) -> ts of its last line
        self._files: dict[str, list[str]] = {}  # post id -> the crops of its current version
        self.anchors = 0
        self.dropped_full = 0
        (root / "anchors").mkdir(parents=True, exist_ok=True)
        for line in read_manifest(root):
            self._record(line)
        named = {name for files in self._files.values() for name in files}
        for path in (root / "anchors").iterdir():
            if path.name not in named:  # superseded or deleted, left by a crash before its removal
                path.unlink(missing_ok=True)

    def observe(self, event: Event, decoded: Decoded, upsert: Upsert) -> None:
        """Record a product's category, or a naming post's garment crops (called by the pipeline)."""
        if event.collection == "products":
            self._product(event, upsert)
        elif named_products(event.attrs):
            self._post(event, decoded, upsert)

    def deleted(self, event: Event) -> None:
        """A product or post was deleted: its pairs end, and a post's crops are removed (called by the pipeline)."""
        kind = "product" if event.collection == "products" else "post"
        with self._lock:
            if (kind, event.id) not in self._newest:
                return  # never mined: nothing to end
        self._append({"type": kind, "id": event.id, "ts": event.ts, "deleted": True})

    def _product(self, event: Event, upsert: Upsert) -> None:
        if not upsert.items:
            return
        category = item_category(upsert.items[0].category, event.attrs.get("category"))
        if category != UNCATEGORIZED:
            self._append({"type": "product", "id": event.id, "ts": event.ts, "category": category})

    def _post(self, event: Event, decoded: Decoded, upsert: Upsert) -> None:
        with self._lock:
            if not self._current(("post", event.id, event.ts, False)):
                return
            if self.anchors + len(upsert.items) > self.settings.max_anchors:
                self.dropped_full += 1
                if self.dropped_full == 1:
                    log.warning(
                        "pairs dataset is full (pairs.max_anchors %d): posts are no longer stored",
                        self.settings.max_anchors,
                    )
                return
        image = decoded.image
        sx, sy = image.width / decoded.original_size[0], image.height / decoded.original_size[1]
        anchors = []
        for n, item in enumerate(upsert.items):
            x0, y0, x1, y1 = item.box
            box = (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
            crop = image.crop((max(0, box[0]), max(0, box[1]), min(image.width, box[2]), min(image.height, box[3])))
            if crop.width < 8 or crop.height < 8:
                continue
            crop.thumbnail((self.settings.crop_max_side, self.settings.crop_max_side))
            name = hashlib.sha256(f"{event.id}\0{event.ts}\0{n}".encode()).hexdigest()[:24] + ".jpg"
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=90)
            _write_atomic(self.root / "anchors" / name, buffer.getvalue())
            category = item_category(item.category, item.label)
            anchors.append({"file": name, "category": category, "box": list(item.box)})
        line = {"type": "post", "id": event.id, "ts": event.ts, "products": named_products(event.attrs)}
        self._append({**line, "anchors": anchors})

    def _current(self, key: tuple[str, str, int, bool]) -> bool:
        """Whether a line with this key would be new and not older than the record's last line."""
        kind, record_id, ts, _ = key
        return key not in self._seen and ts >= self._newest.get((kind, record_id), ts)

    def _append(self, line: dict[str, Any]) -> None:
        with self._lock:
            if not self._current(_key(line)):
                return
            with open(self.root / MANIFEST, "a") as f:
                f.write(json.dumps(line, separators=(",", ":")) + "\n")
            replaced = self._record(line)
        for name in replaced:
            (self.root / "anchors" / name).unlink(missing_ok=True)

    def _record(self, line: dict[str, Any]) -> list[str]:
        """Take a manifest line into the miner's state; the crop files of the post version it replaces."""
        key = _key(line)
        kind, record_id, ts, deleted = key
        self._seen.add(key)
        if ts < self._newest.get((kind, record_id), ts):
            return []  # an older version, written before versions were ordered: never current
        self._newest[(kind, record_id)] = ts
        if kind != "post":
            return []
        replaced = self._files.pop(record_id, [])
        if not deleted:
            self._files[record_id] = [a["file"] for a in line["anchors"]]
        self.anchors += len(self._files.get(record_id, ())) - len(replaced)
        return replaced


def _key(line: dict[str, Any]) -> tuple[str, str, int, bool]:
    return line["type"], line["id"], line["ts"], bool(line.get("deleted"))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_manifest(root: Path) -> list[dict[str, Any]]:
    """Every complete line of the manifest (a line cut short by a crash is skipped)."""
    lines = []
    with contextlib.suppress(FileNotFoundError), open(root / MANIFEST) as f:
        for text in f:
            try:
                lines.append(json.loads(text))
            except ValueError:
                continue
    return lines


@dataclass(frozen=True)
class Pair:
    anchor: Path  # the garment crop from the post
    product_id: str  # whose thumbnail is the positive
    category: str
    post_id: str


@dataclass(frozen=True)
class Dataset:
    pairs: list[Pair]
    products: dict[str, str]  # product id -> category, every product seen
    dropped: Counter  # reason -> garments not paired
    posts: int


def resolve(root: Path) -> Dataset:
    """The pairs of the dataset at ``root``: the newest version of each record, garments matched by category."""
    products: dict[str, tuple[int, str]] = {}
    posts: dict[str, dict[str, Any]] = {}
    for line in read_manifest(root):  # a record's last line wins (a later line wins a tie), a delete too
        if line["type"] == "product":
            if line["id"] not in products or products[line["id"]][0] <= line["ts"]:
                products[line["id"]] = (line["ts"], None if line.get("deleted") else line["category"])
        elif line["type"] == "post" and (line["id"] not in posts or posts[line["id"]]["ts"] <= line["ts"]):
            posts[line["id"]] = line
    posts = {pid: post for pid, post in posts.items() if not post.get("deleted")}
    categories = {pid: category for pid, (_, category) in products.items() if category is not None}
    pairs: list[Pair] = []
    dropped: Counter = Counter()
    for post_id, post in sorted(posts.items()):
        named_by_category: dict[str, list[str]] = {}
        unknown = 0
        for pid in post["products"]:
            if pid in categories:
                named_by_category.setdefault(categories[pid], []).append(pid)
            else:
                unknown += 1
        shown = Counter(a["category"] for a in post["anchors"])
        for anchor in post["anchors"]:
            category = anchor["category"]
            candidates = named_by_category.get(category, [])
            if len(candidates) > 1 or (candidates and shown[category] > 1):
                dropped["ambiguous"] += 1
            elif not candidates:
                dropped["unknown-product" if unknown else "no-named-product-of-category"] += 1
            else:
                pairs.append(Pair(root / "anchors" / anchor["file"], candidates[0], category, post_id))
    return Dataset(pairs, categories, dropped, len(posts))


def counts(dataset: Dataset) -> dict[str, dict[str, int]]:
    """Per category: pairs, distinct products in pairs, and posts they come from."""
    table: dict[str, dict[str, Any]] = {}
    for pair in dataset.pairs:
        row = table.setdefault(pair.category, {"pairs": 0, "products": set(), "posts": set()})
        row["pairs"] += 1
        row["products"].add(pair.product_id)
        row["posts"].add(pair.post_id)
    return {
        c: {"pairs": r["pairs"], "products": len(r["products"]), "posts": len(r["posts"])}
        for c, r in sorted(table.items())
    }


_miners: dict[Path, PairMiner] = {}
_miners_lock = threading.Lock()


def miner(root: Path, settings: PairSettings) -> PairMiner:
    """The one miner of a dataset in this process, shared by the generations that index into it."""
    with _miners_lock:
        key = root.resolve()
        if key not in _miners:
            _miners[key] = PairMiner(root, settings)
        return _miners[key]
