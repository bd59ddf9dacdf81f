"""Settings for a lookstream node, validated once at start.

Every knob lives here so that the CLI, the tests and a TOML file configure the
same object. Kafka client settings stay configurable because production points
at a real cluster, not at the local broker used in development.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

LOCAL_BROKER_PORT = 19092


class Topics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    products: str = "lookstream.products"
    posts: str = "lookstream.posts"
    dead_letter: str = "lookstream.dead-letter"


class KafkaSettings(BaseModel):
    """Client settings; defaults are portable between Tansu and real Kafka."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = f"127.0.0.1:{LOCAL_BROKER_PORT}"
    group_id: str = "lookstream-indexer"
    topics: Topics = Topics()
    partitions: int = Field(3, ge=1, description="partitions of topics this node creates")
    # 6000 is the lowest session timeout real Kafka accepts; a group join takes
    # about half of it (DESIGN.md, "Local broker").
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    # kafka-python 3.x drops a join that completes while no poll() waits; polls of
    # a second were clean where 100 ms polls made rebalances take a minute.
    poll_timeout_ms: int = Field(1000, ge=100)
    max_poll_records: int = Field(64, ge=1)
    #: How long the broker may hold a fetch while no record is there. The local broker holds it that long
    #: even when records arrive meanwhile, so this bounds the wait a new event can add before it is read:
    #: kafka-python's default of 500 ms made a node's freshness p99 at half load 417 ms (docs/architecture.md).
    fetch_max_wait_ms: int = Field(100, ge=0)
    max_message_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Topics this node creates: replication factor, and the dead-letter topic's largest message.
    replication_factor: int = Field(1, ge=1)
    # None: the largest event plus room for the reason headers (max_message_bytes + 64 KiB), so that
    # raising max_message_bytes never leaves a dead letter too large for its topic.
    dead_letter_max_message_bytes: int | None = Field(None, ge=1024)

    @property
    def produce_request_bytes(self) -> int:
        """The largest produce request: one event plus its headers (a dead letter's reasons among them)."""
        return self.max_message_bytes + 64 * 1024

    # The idempotent producer lost acknowledged messages across Tansu restarts;
    # upserts absorb the rare duplicate a non-idempotent producer may write.
    enable_idempotence: bool = False


class ModelSettings(BaseModel):
    """Which plugin provides each model role, by the name the plugin registers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: str = "whole-image"
    encoder: str = "efficientnet-lite0"
    classifier: str = "event-attrs"
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda'")
    cpu_threads: int | None = Field(None, ge=1, description="torch (and ONNX Runtime) intra-op threads on CPU")
    #: How the built-in networks run: "auto" takes ONNX Runtime on a CPU and PyTorch on a GPU (docs/models.md).
    #: Both give the same vectors (cosine >= 0.99999), so changing it keeps the model generation.
    runtime: Literal["auto", "onnxruntime", "torch"] = "auto"
    batch_size: int = Field(32, ge=1)
    #: Per-model options by model name, e.g. ``[models.options.fashion-swin] name_or_path = "..."``.
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: A detector per collection where it differs from ``detector``, e.g. ``[models.detectors] posts =
    #: "ssd-street"``: catalog thumbnails want the whole image, street photos a garment or person detector.
    detectors: dict[Literal["products", "posts"], str] = Field(default_factory=dict)
    #: A re-ranker that re-scores the nearest hits of each query item (None: off; docs/plugins.md).
    #: It changes answers, not shards, so it is not part of the model generation: it applies from the next start.
    reranker: str | None = None

    def detector_for(self, collection: str) -> str:
        return self.detectors.get(collection, self.detector)


class ApiSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_request_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_k: int = Field(100, ge=1)
    default_k: int = Field(10, ge=1)
    #: /search/vector runs on the event loop while recent searches took less than this (ms):
    #: below it the hop to a worker thread costs more than the search. 0: always a worker thread.
    inline_search_ms: float = Field(1.0, ge=0)
    #: /readyz answers 503 while any partition is more than this many messages behind
    ready_max_lag: int = Field(1000, ge=0)
    #: Bearer token for /admin/* (snapshot, rebuild, swap); unset disables them. Never logged or shown.
    admin_token: SecretStr | None = None
    #: How long a thread holding the GIL keeps it once a query's thread wants it back (CPython: 5 ms).
    #: A query takes the GIL back after each FAISS call; shorter keeps queries quick while ingest runs
    #: (indexer/interpreter.py). Set by `lookstream up`, `serve` and `route` for their process.
    switch_interval_ms: float = Field(0.5, gt=0, le=100)


class ImageSettings(BaseModel):
    """How images are read and decoded; the limits that keep one event from exhausting a node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Refused above this many pixels, read from the header before anything is decoded.
    max_pixels: int = Field(40_000_000, ge=1)
    # Images are downscaled while decoding (JPEG draft mode) or right after it to at most this
    # many pixels on the longer side: more than any built-in model looks at (DETR's 1333).
    # Boxes are reported in the original image's pixels.
    decode_max_side: int = Field(1600, ge=64)
    # Decoded pixels one batch holds at once; a batch is decoded and analysed in chunks within it.
    max_batch_pixels: int = Field(50_000_000, ge=1)
    # An image read from an image_uri (file or http) larger than this is refused.
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # Directories a `file://` image_uri may point into; only regular files are read. Empty refuses every file URI.
    file_roots: tuple[Path, ...] = ()
    # Hosts an `http(s)://` image_uri may be fetched from: "host" allows ports 80 and 443 only,
    # "host:port" that port. Empty refuses every http(s) URI.
    http_hosts: tuple[str, ...] = ()
    # One deadline for a whole fetch (connect, headers and body), per attempt.
    http_timeout_s: float = Field(5.0, gt=0)
    # Attempts per fetch; timeouts, 5xx answers and reset connections are retried with backoff.
    http_attempts: int = Field(3, ge=1)
    # Fetches of one batch in flight at once.
    http_concurrency: int = Field(16, ge=1)
    # Allow http_hosts that resolve to loopback, private, link-local or other non-public addresses.
    http_allow_private_addresses: bool = False


class IngestSettings(BaseModel):
    """How the consumer handles failures that are not one event's fault (docs/reliability.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A batch the models fail on is tried this many times before it is split in halves
    # to find the event that fails (which is then dead-lettered).
    model_attempts: int = Field(2, ge=1)
    # Backoff between retries of a failed batch or a restarted consumer loop: doubles up to the cap.
    retry_backoff_s: float = Field(1.0, gt=0)
    retry_backoff_max_s: float = Field(30.0, gt=0)
    # /readyz answers 503 after this many consecutive failures of the consumer loop or of a batch.
    unready_after_failures: int = Field(3, ge=1)
    # `lookstream up` exits non-zero when the consumer loop has failed for this long without a
    # successful poll in between (a supervisor then restarts it).
    give_up_after_s: float = Field(300.0, gt=0)
    # /readyz answers 503 when nothing was applied for this long while messages are waiting.
    stall_after_s: float = Field(120.0, gt=0)


class ShardSettings(BaseModel):
    """When shards are sealed into ANN indexes, which index, how it is searched, and how shards are kept.

    The store takes this object itself (``ShardSet``, checkpoints, backends), so
    each default is stated here once and every knob is reachable from a TOML
    file (docs/architecture.md, "Shards").
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Below this many live rows a shard is not sealed: exact search over it is fast enough.
    seal_min_rows: int = Field(10_000, ge=1)
    # The growing segment (searched exactly) is sealed into a segment of its own once it holds this many rows.
    growing_max_rows: int = Field(20_000, ge=1)
    # Sealed segments of one size tier (below merge_factor x growing_max_rows rows, then each factor
    # more) are merged into one once there are this many: fewer segments to search, and each row
    # rebuilt about log(rows / growing_max_rows) times over its life.
    merge_factor: int = Field(4, ge=2)
    # While a shard holds this many sealed segments and a merge of them runs, the consumer holds back
    # too (as Elasticsearch throttles indexing when merges fall behind): a query searches every
    # segment, so their number bounds its latency during a bulk load (0: never wait).
    max_sealed_segments: int = Field(6, ge=0)
    # After this many seconds without writes, a shard's sealed segments are merged into one (0: never).
    merge_when_idle_s: float = Field(30.0, ge=0)
    # A sealed segment is rebuilt on its own once this share of its rows is deleted (reclaiming them)...
    rebuild_dead_fraction: float = Field(0.2, gt=0, le=1)
    # ...and at least this many: a few deletes in a small shard are not worth a rebuild.
    rebuild_min_dead: int = Field(1024, ge=1)
    # HNSW up to this many rows, IVF-Flat above, where HNSW's build time and memory grow too large.
    hnsw_max_rows: int = Field(200_000, ge=1)
    # HNSW links per node: more gives better recall for more memory and a slower build.
    hnsw_m: int = Field(32, ge=2)
    # HNSW candidates kept while a row is inserted: more gives a better graph and a slower build.
    hnsw_ef_construction: int = Field(64, ge=1)
    # HNSW candidates kept while searching: more gives better recall and slower queries.
    hnsw_ef_search: int = Field(128, ge=1)
    # The most IVF lists searched per query, as a share of the lists (never fewer than 8).
    ivf_nprobe_fraction: float = Field(1 / 16, gt=0, le=1)
    # Each IVF build probes the fewest lists (up to ivf_nprobe_fraction of them) whose recall@10 on a
    # sample of its own rows reaches this; a share of the lists costs more the larger the segment while
    # the recall it buys does not (indexer/store/backends.py tuned_nprobe). 1: always the share.
    ivf_target_recall: float = Field(0.98, gt=0, le=1)
    # While a shard's flush runs, new rows wait in its growing segment, searched exactly. Once one
    # holds this many times growing_max_rows, the consumer stops fetching until the flush is in, so
    # that a bulk load slows ingest rather than every query (0: never wait).
    growing_hold_factor: float = Field(2.0, ge=0)
    # A checkpoint is written at most this often, and only when something changed.
    checkpoint_interval_s: float = Field(10.0, gt=0)
    #: "auto": exact search on the GPU with torch where one is visible, FAISS on the CPU otherwise
    #: (indexer/store/backends.py)
    backend: Literal["auto", "cpu", "torch-cuda"] = "auto"
    # How a sealed index stores each vector, per collection (others: float32): "float16" halves the
    # memory of the vectors, "sq8" quarters it (8-bit scalar quantisation). "+pq" adds 4-bit PQ codes
    # to IVF segments (dim / 4 bytes a row at 128-d, dim / 8 at 1280-d): a search scans those, then
    # re-ranks the best on the stored vectors: 2-5 times as fast at about the same recall; see
    # docs/benchmarks.md.
    vectors: dict[
        Literal["products", "posts"], Literal["float32", "float32+pq", "float16", "float16+pq", "sq8", "sq8+pq"]
    ] = {}
    # Attributes indexed for filters inside the search: keyword ones match one of some values
    # (case-folded; true/false for booleans; a list by any of its values), numeric ones a range.
    # Each costs 4 (keyword) or 8 (numeric) bytes a row. Filters on other attributes are refused
    # with a 400.
    keyword_attributes: tuple[str, ...] = ("brand", "colour", "size", "gender", "in_stock")
    numeric_attributes: tuple[str, ...] = ("price",)
    # A filtered search scores the matching rows of a sealed segment exactly when there are at most
    # this many, and searches the index with a selector of them otherwise (docs/architecture.md,
    # "Row metadata and filters").
    filter_exact_max_rows: int = Field(2_000, ge=0)
    # Above that, an IVF segment's matching rows are still scored exactly while that costs less than
    # scanning the lists its search would probe, one row read back from IVF-Flat costing as much as this
    # many rows scanned (measured at 1M x 128, one thread: 0.7 us against 14 ns a row scanned past the
    # selector, more where it matches; float16 and sq8 rows cost 3.4 and 3.1 times as much to read back,
    # float32+pq rows 0.2, and longer rows more: indexer/store/backends.py read_back_cost; 0: never).
    filter_exact_row_cost: float = Field(50.0, ge=0)

    @model_validator(mode="after")
    def _attributes_once(self) -> ShardSettings:
        both = set(self.keyword_attributes) & set(self.numeric_attributes)
        if both:
            raise ValueError(f"attributes {sorted(both)} are both keyword and numeric")
        return self

    def codec(self, collection: str) -> str:
        """How the sealed indexes of this collection store vectors."""
        return self.vectors.get(collection, "float32")


class Replica(BaseModel):
    """One serve node the router may ask, as listed in ``[[cluster.replicas]]`` (instead of, or besides, membership)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str


class ClusterSettings(BaseModel):
    """The scale-out roles: encoders publish records, serve replicas index them, a router fans queries out.

    docs/deploy.md says how to run them; docs/architecture.md, "Scale-out", why they work so.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Records topics are ``<records_topic_prefix>.<generation id>``: one per model generation.
    records_topic_prefix: str = "lookstream.records"
    #: Partitions of the records topics the encoders create (fixed: a record's key decides its partition).
    records_partitions: int = Field(4, ge=1)
    #: "float32" keeps vectors exact; "float16" halves them (docs/deploy.md, "Records topic").
    vector_dtype: Literal["float32", "float16"] = "float32"
    #: Compression of record batches the encoders produce (Kafka's codecs; None for none).
    compression: Literal["gzip", "snappy", "lz4", "zstd"] | None = "lz4"
    #: Serve nodes announce themselves here; routers read it to find them.
    membership_topic: str = "lookstream.members"
    announce_interval_s: float = Field(2.0, gt=0)
    #: A member not heard from for this long is forgotten.
    member_ttl_s: float = Field(10.0, gt=0)
    #: After a serve replica flips to a new generation it keeps answering from the old one for this long,
    #: so that a router keeps one generation for every partition until all replicas have flipped.
    retire_after_s: float = Field(120.0, ge=0)
    #: The URL a serve node announces (default: http://<api.host>:<api.port>).
    advertise_url: str | None = None
    #: Serve nodes the router asks besides those announced on the membership topic.
    replicas: tuple[Replica, ...] = ()
    #: Whether the router reads the membership topic (off: only ``replicas``).
    discover: bool = True
    #: The router's deadline for one replica's answer; a late one is retried on another replica.
    replica_timeout_s: float = Field(2.0, gt=0)
    #: A replica that failed a query is asked only when no other can answer, for this long.
    bench_s: float = Field(5.0, ge=0)
    #: Without a replica for some partitions: answer with the others' hits and name the missing
    #: partitions (True), or refuse with 503 (False).
    allow_partial: bool = True


class PairSettings(BaseModel):
    """Street-to-shop pairs mined from posts that name their products (indexer/training/pairs.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Mine pairs into ``data_dir/pairs`` while a durable node indexes posts.
    enabled: bool = True
    # Garment crops kept at most; posts past it are counted, not stored (about 10 KB a crop).
    max_anchors: int = Field(100_000, ge=1)
    # Crops are stored as JPEGs at most this many pixels on a side.
    crop_max_side: int = Field(256, ge=32)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Path("lookstream-data")
    kafka: KafkaSettings = KafkaSettings()
    models: ModelSettings = ModelSettings()
    api: ApiSettings = ApiSettings()
    images: ImageSettings = ImageSettings()
    ingest: IngestSettings = IngestSettings()
    shards: ShardSettings = ShardSettings()
    cluster: ClusterSettings = ClusterSettings()
    pairs: PairSettings = PairSettings()
    disabled_plugins: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path | None = None, **overrides: object) -> Settings:
        """Read a TOML file (if given), then apply dotted overrides such as ``kafka.group_id``."""
        data: dict = {}
        if path is not None:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return cls.model_validate(data)
