"""The ``lookstream`` command: run a node (or one scale-out role), a local broker, publish folders, list plugins."""

from __future__ import annotations

import logging
import signal
import threading
import urllib.request
from pathlib import Path

import click

from indexer import interpreter
from indexer.config import LOCAL_BROKER_PORT, Settings
from plugins.models import PHOTOS

log = logging.getLogger("lookstream")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file (every setting is in indexer/config.py; see README, Configuration).",
)

port_option = click.option("--port", type=int, help="HTTP port of the query API (default 8080).")
host_option = click.option("--host", help="HTTP interface (default 127.0.0.1).")
cluster_option = click.option("--bootstrap-servers", help="HOST:PORT of the Kafka cluster (default: the config's).")


def data_dir_option(help: str = "The node's data directory."):
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help=help)


def _settings(config_path: Path | None, **overrides: object) -> Settings:
    try:
        return Settings.load(config_path, **overrides)
    except Exception as e:  # pydantic ValidationError, TOML errors: show them plainly
        raise click.ClickException(f"invalid settings: {e}") from e


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """lookstream: streaming visual search for fashion commerce."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "faiss"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


@main.command()
@config_option
@port_option
@host_option
@data_dir_option("Where the node keeps its files.")
@click.option(
    "--broker-port",
    type=int,
    default=LOCAL_BROKER_PORT,
    show_default=True,
    help="Port of the local broker started when no --bootstrap-servers is given.",
)
@click.option("--bootstrap-servers", help="HOST:PORT of a Kafka cluster; no local broker is started.")
def up(config_path, port, host, data_dir, broker_port, bootstrap_servers) -> None:
    """Run a node: local broker (unless --bootstrap-servers), topics, consumers and the API."""
    from aiohttp import web

    from indexer.kafka.broker import BrokerError, LocalBroker
    from indexer.kafka.topics import ensure_topics
    from indexer.node import build_node
    from indexer.web.app import create_app
    from plugins.models import ModelNotAvailable
    from plugins.registry import UnknownModel

    overrides = {
        "api.port": port,
        "api.host": host,
        "data_dir": data_dir,
        "kafka.bootstrap_servers": bootstrap_servers or f"127.0.0.1:{broker_port}",
    }
    settings = _settings(config_path, **overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    broker = None
    if bootstrap_servers is None:
        broker = LocalBroker(broker_port, log_path=settings.data_dir / "broker.log")
        try:
            broker.start()
        except BrokerError as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"local broker on {broker.bootstrap_servers} (in memory: its events end with it)")
    try:
        ensure_topics(settings.kafka)
        try:
            node = build_node(settings)
        except (ModelNotAvailable, UnknownModel, ValueError) as e:
            raise click.ClickException(str(e)) from e
        url = f"http://{settings.api.host}:{settings.api.port}"
        interpreter.serve_from_this_process(settings.api.switch_interval_ms)
        web.run_app(
            create_app(node, reload_settings=lambda: _settings(config_path, **overrides)),
            host=settings.api.host,
            port=settings.api.port,
            print=lambda _: click.echo(f"lookstream API on {url}  (Ctrl-C to stop)"),
        )
        if node.fatal is not None:  # the app stopped itself: ingestion cannot recover here
            raise click.ClickException(f"ingestion stopped: {node.fatal}")
    finally:
        if broker is not None:
            click.echo("stopping the local broker")
            broker.stop()


def _partition_list(value: str | None) -> tuple[int, ...] | None:
    """ "0,2-5" -> (0, 2, 3, 4, 5); None stays None (every partition)."""
    if value is None:
        return None
    partitions: set[int] = set()
    try:
        for part in value.split(","):
            low, dash, high = part.strip().partition("-")
            partitions.update(range(int(low), int(high if dash else low) + 1))
    except ValueError as e:
        raise click.BadParameter(f"expected partitions like 0,2-5, got {value!r}") from e
    if not partitions or min(partitions) < 0:
        raise click.BadParameter(f"expected partitions like 0,2-5, got {value!r}")
    return tuple(sorted(partitions))


def _load_or_fail(settings: Settings, selection):
    from indexer import generations
    from plugins.models import ModelNotAvailable
    from plugins.registry import UnknownModel

    try:
        return generations.load(settings, selection)
    except (ModelNotAvailable, UnknownModel, ValueError) as e:
        raise click.ClickException(str(e)) from e


def _records_topic_configs(settings: Settings) -> dict[str, str]:
    """Compacted (the newest record per key is all a replica needs; deletes are records, so they stay)."""
    return {"cleanup.policy": "compact", "max.message.bytes": str(settings.kafka.produce_request_bytes)}


@main.command()
@config_option
@cluster_option
@data_dir_option("Where model files are cached.")
def encode(config_path, bootstrap_servers, data_dir) -> None:
    """Encoder role: events in, records out (one consumer group; run any number of these)."""
    from consumers.encoding import EncodingConsumer, encoder_group
    from indexer.generations import Generation
    from indexer.kafka.topics import ensure_topic, ensure_topics

    settings = _settings(config_path, **{"kafka.bootstrap_servers": bootstrap_servers, "data_dir": data_dir})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings.kafka)
    generation = Generation.create(settings, _load_or_fail(settings, settings.models))
    topic = generation.records_topic(settings)
    ensure_topic(settings.kafka, topic, settings.cluster.records_partitions, _records_topic_configs(settings))
    kafka = settings.kafka.model_copy(update={"group_id": encoder_group(settings.kafka.group_id, generation.id)})
    consumer = EncodingConsumer(
        kafka, settings.cluster, generation.pipeline, generation.stats, generation.id, topic, settings.ingest
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    click.echo(
        f"lookstream encode: generation {generation.id}, group {kafka.group_id}, "
        f"Kafka {kafka.bootstrap_servers} -> {topic}  (Ctrl-C to stop)"
    )
    consumer.start()
    try:
        while not done.wait(10) and consumer.running:
            counts = generation.stats.snapshot()
            log.info("encoded %d, deleted %d, rejected %d", counts["indexed"], counts["deleted"], counts["rejected"])
    finally:
        consumer.stop()
        generation.close()
    if consumer.health.gave_up:
        raise click.ClickException(f"encoding stopped: {consumer.health.gave_up}")


@main.command()
@config_option
@cluster_option
@port_option
@host_option
@data_dir_option("Where the node keeps its files.")
@click.option("--partitions", help="Records-topic partitions to serve, e.g. 0,2-5 (default: all).")
@click.option("--advertise-url", help="The URL routers reach this node at (default http://HOST:PORT).")
def serve(config_path, bootstrap_servers, port, host, data_dir, partitions, advertise_url) -> None:
    """Serve-replica role: records in, the whole HTTP API out; announces itself to routers."""
    from aiohttp import web

    from indexer.generations import Replica
    from indexer.kafka import membership
    from indexer.kafka.topics import ensure_topic
    from indexer.node import build_node
    from indexer.web.app import create_app
    from plugins.models import ModelNotAvailable
    from plugins.registry import UnknownModel

    served = _partition_list(partitions)
    overrides = {
        "kafka.bootstrap_servers": bootstrap_servers,
        "api.port": port,
        "api.host": host,
        "data_dir": data_dir,
        "cluster.advertise_url": advertise_url,
    }
    settings = _settings(config_path, **overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_topic(settings.kafka, settings.cluster.membership_topic, 1, membership.TOPIC_CONFIGS)
    try:
        node = build_node(settings, replica=Replica(served))
    except (ModelNotAvailable, UnknownModel, ValueError) as e:
        raise click.ClickException(str(e)) from e
    for generation in node.generations():
        topic = generation.records_topic(settings)
        ensure_topic(settings.kafka, topic, settings.cluster.records_partitions, _records_topic_configs(settings))
    url = settings.cluster.advertise_url or f"http://{settings.api.host}:{settings.api.port}"
    which = "all partitions" if served is None else f"partitions {','.join(map(str, served))}"
    interpreter.serve_from_this_process(settings.api.switch_interval_ms)
    web.run_app(
        create_app(node, reload_settings=lambda: _settings(config_path, **overrides), announce_url=url),
        host=settings.api.host,
        port=settings.api.port,
        print=lambda _: click.echo(
            f"lookstream serve: generation {node.active.id}, {which} of "
            f"{node.active.records_topic(settings)}, API on {url}  (Ctrl-C to stop)"
        ),
    )
    if node.fatal is not None:
        raise click.ClickException(f"ingestion stopped: {node.fatal}")


@main.command()
@config_option
@cluster_option
@port_option
@host_option
def route(config_path, bootstrap_servers, port, host) -> None:
    """Router role: the HTTP API, each query fanned out to one ready replica per partition set."""
    from aiohttp import web

    from indexer.generations import Generation
    from indexer.kafka import membership
    from indexer.kafka.topics import ensure_topic
    from indexer.web.router import Router, create_router_app

    overrides = {"kafka.bootstrap_servers": bootstrap_servers, "api.port": port, "api.host": host}
    settings = _settings(config_path, **overrides)
    if settings.cluster.discover:
        ensure_topic(settings.kafka, settings.cluster.membership_topic, 1, membership.TOPIC_CONFIGS)
    generation = Generation.create(settings, _load_or_fail(settings, settings.models))
    router = Router(settings, generation)
    url = f"http://{settings.api.host}:{settings.api.port}"
    found = "the membership topic" if settings.cluster.discover else ""
    if settings.cluster.replicas:
        found += (" and " if found else "") + f"{len(settings.cluster.replicas)} listed replicas"
    interpreter.serve_from_this_process(settings.api.switch_interval_ms)
    web.run_app(
        create_router_app(router, reload_settings=lambda: _settings(config_path, **overrides)),
        host=settings.api.host,
        port=settings.api.port,
        print=lambda _: click.echo(
            f"lookstream route: generation {generation.id}, replicas from {found}, API on {url}  (Ctrl-C to stop)"
        ),
    )


@main.command()
@click.option("--port", type=int, default=LOCAL_BROKER_PORT, show_default=True)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("lookstream-data"),
    show_default=True,
    help="Where broker.log goes.",
)
def broker(port: int, data_dir: Path) -> None:
    """Run the local Kafka-protocol broker alone, until Ctrl-C or SIGTERM."""
    from indexer.kafka.broker import BrokerError, LocalBroker

    data_dir.mkdir(parents=True, exist_ok=True)
    local = LocalBroker(port, log_path=data_dir / "broker.log")
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        local.start()
    except BrokerError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"local broker on {local.bootstrap_servers}  (Ctrl-C to stop)")
    try:
        done.wait()
    finally:
        local.stop()


@main.group()
def produce() -> None:
    """Publish a folder of images as events."""


def _produce(kind: str, path: Path, config_path: Path | None, bootstrap_servers: str | None, progress: bool) -> None:
    from kafka.errors import KafkaError

    from producers.folders import post_events, product_events
    from producers.publisher import make_producer, publish

    settings = _settings(config_path, **{"kafka.bootstrap_servers": bootstrap_servers})
    kafka = settings.kafka
    events, topic = (product_events, kafka.topics.products) if kind == "products" else (post_events, kafka.topics.posts)
    try:
        producer = make_producer(kafka)
    except KafkaError as e:
        raise click.ClickException(f"cannot reach Kafka at {kafka.bootstrap_servers}: {e}") from e
    try:
        summary = publish(events(path, kafka.max_message_bytes, settings.images.max_pixels), topic, producer, progress)
    except KafkaError as e:
        raise click.ClickException(f"publishing to {topic} failed: {e}") from e
    finally:
        producer.close(timeout=10)
    for line in summary.lines():
        click.echo(line)


def _produce_command(kind: str, layout: str):
    @produce.command(name=kind, help=f"Publish {layout} to the {kind} topic.")
    @click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @config_option
    @click.option("--bootstrap-servers", help="HOST:PORT of Kafka (default: the local broker).")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    def command(path, config_path, bootstrap_servers, no_progress):
        _produce(kind, path, config_path, bootstrap_servers, not no_progress)

    return command


_produce_command("products", "PATH/<category>/<product_id>.<jpg|png|webp> (or <product_id>/<image>)")
_produce_command("posts", "PATH/<post_id>.<jpg|png|webp>")


@main.command()
@config_option
def plugins(config_path) -> None:
    """List installed plugins and the model names each provides."""
    from plugins.manager import build_plugin_manager, provided_names

    settings = _settings(config_path)
    pm = build_plugin_manager(settings.disabled_plugins)
    table = provided_names(pm)
    packages = {pm.get_name(p): f" ({dist.project_name} {dist.version})" for p, dist in pm.list_plugin_distinfo()}
    selected = {
        "detector": settings.models.detector,
        "encoder": settings.models.encoder,
        "classifier": settings.models.classifier,
        "reranker": settings.models.reranker,
    }
    for plugin, roles in sorted(table.items()):
        click.echo(plugin + packages.get(plugin, " (built in)"))
        for role, names in roles.items():
            marked = [f"{n} (selected)" if selected[role] == n else n for n in names]
            click.echo(f"  {role}s: {', '.join(marked)}")


@main.group()
def models() -> None:
    """Manage model files for machines without hub access at run time."""


@models.command()
@click.argument("hub_id")
@click.option("--revision", help="Branch, tag or commit of the hub repository.")
def fetch(hub_id: str, revision: str | None) -> None:
    """Download a hub model into the local cache, where name_or_path = HUB_ID then finds it offline.

    Run this where the Hugging Face hub is reachable. For machines where it is
    not, copy that cache (HF_HOME) over, or save the model to a directory and
    set name_or_path to the directory.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        path = snapshot_download(hub_id, revision=revision)
    except (HfHubHTTPError, OSError) as e:
        raise click.ClickException(f"could not fetch {hub_id!r}: {e}") from e
    click.echo(f"{hub_id} is in {path}")


@main.command(name="evaluate")
@config_option
@click.option(
    "--set",
    "set_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A labelled set (gallery/, queries.jsonl); default: build the offline set.",
)
@click.option("--encoder", "encoders", multiple=True, help="Encoder to evaluate (repeatable; default: the config's).")
@click.option(
    "--photos",
    type=click.IntRange(1, 15),
    default=15,
    show_default=True,
    help="Photos the offline set is cut from (4 products each, 5 queries per product).",
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the results as JSON.")
def evaluate_command(config_path, set_dir, encoders, photos, output) -> None:
    """Recall@K (1, 5, 10, 20) and mAP of the configured models on a labelled query set."""
    import dataclasses
    import json
    import tempfile

    from indexer.evalset import build_offline_set
    from indexer.evaluation import evaluate, markdown_table
    from indexer.node import build_node
    from plugins.models import ModelNotAvailable
    from plugins.registry import UnknownModel

    settings = _settings(config_path)
    with tempfile.TemporaryDirectory(prefix="lookstream-eval-") as tmp:
        root = set_dir or build_offline_set(Path(tmp), photos=photos)
        reports = []
        for encoder in encoders or (settings.models.encoder,):
            run = settings.model_copy(update={"models": settings.models.model_copy(update={"encoder": encoder})})
            try:
                node = build_node(run, durable=False)
            except (ModelNotAvailable, UnknownModel, ValueError) as e:
                raise click.ClickException(str(e)) from e
            reports.append(evaluate(node, root))
            node.close()
    click.echo(markdown_table(reports))
    for report in reports:
        kinds = ", ".join(f"{kind} {value:.2f}" for kind, value in report.by_kind.items())
        click.echo(f"{report.encoder}: Recall@1 by query kind: {kinds}")
    if output:
        output.write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=2) + "\n")


@main.command(name="search")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="The node's API.")
@click.option("-k", "--k", "k", type=int, default=10, show_default=True)
@click.option("--collection", type=click.Choice(["products", "posts", "both"]), default="products", show_default=True)
@click.option("--category", help="Only this category.")
@click.option(
    "--photo",
    type=click.Choice(PHOTOS),
    default="product",
    show_default=True,
    help="What the image is: a catalog thumbnail or a photo like a post (its detector, a fine-tuned encoder's mix).",
)
def search_command(image: Path, url: str, k: int, collection: str, category: str | None, photo: str) -> None:
    """Search a running node with a photo; print the hits per detected item and for the whole image."""
    import mimetypes
    import urllib.error
    import urllib.parse
    import urllib.request

    params = {"k": k, "collection": collection, "photo": photo, **({"category": category} if category else {})}
    content_type = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    request = urllib.request.Request(
        f"{url.rstrip('/')}/search?{urllib.parse.urlencode(params)}",
        data=image.read_bytes(),
        headers={"Content-Type": content_type},
    )
    body = _request_json(request, url, timeout=60)
    groups = [
        (f"item {i + 1}: {item['label'] or item['category']} {item['box']}", item["hits"])
        for i, item in enumerate(body["items"])
    ]
    groups.append(("whole image", body["hits"]))
    for title, hits in groups:
        click.echo(title)
        click.echo(f"  {'#':>3}  {'score':>6}  {'id':<24} {'collection':<9} {'category':<14} title")
        for rank, hit in enumerate(hits, 1):
            attrs = hit["attrs"]
            label = attrs.get("title") or attrs.get("brand") or attrs.get("source") or ""
            click.echo(
                f"  {rank:>3}  {hit['score']:>6.3f}  {hit['id']:<24.24} {hit['collection']:<9} "
                f"{hit['category']:<14.14} {label}"
            )
        if not hits:
            click.echo("  (no hits)")
    timings = ", ".join(f"{stage} {ms:.0f}" for stage, ms in body["timings_ms"].items())
    click.echo(f"timings (ms): {timings}")


@main.command(name="pairs")
@config_option
@data_dir_option()
def pairs_command(config_path, data_dir) -> None:
    """Street-to-shop pairs mined from posts that name their products: counts per category."""
    from indexer.training.pairs import counts, resolve

    settings = _settings(config_path, data_dir=data_dir)
    dataset = resolve(settings.data_dir / "pairs")
    table = counts(dataset)
    click.echo(f"{'category':<14} {'pairs':>7} {'products':>9} {'posts':>7}")
    for category, row in table.items():
        click.echo(f"{category:<14} {row['pairs']:>7} {row['products']:>9} {row['posts']:>7}")
    total = sum(r["pairs"] for r in table.values())
    click.echo(f"{'total':<14} {total:>7} {len({p.product_id for p in dataset.pairs}):>9} {dataset.posts:>7}")
    if dataset.dropped:
        click.echo("garments not paired: " + ", ".join(f"{k} {v}" for k, v in sorted(dataset.dropped.items())))


@main.command(name="train")
@config_option
@data_dir_option()
@click.option("--dim", type=click.IntRange(8, 4096), default=128, show_default=True, help="Projection head size.")
@click.option("--unfreeze", type=click.IntRange(0, 16), default=0, show_default=True, help="Last base blocks to train.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(2), default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Learning rate of the head.")
@click.option("--block-lr", type=float, default=3e-4, show_default=True, help="Learning rate of unfrozen blocks.")
@click.option("--views", type=click.IntRange(1), default=4, show_default=True, help="Augmented views cached per image.")
@click.option("--heldout", type=click.FloatRange(0, 0.9), default=0.2, show_default=True, help="Share of products.")
@click.option("--max-pairs", type=click.IntRange(2), help="Train on at most this many pairs.")
@click.option(
    "--self-pairs",
    type=click.FloatRange(0, 0.9),
    default=0.0,
    show_default=True,
    help="Share of each epoch's pairs that pair a thumbnail with a JPEG'd, rescaled, recoloured view of itself "
    "(0.5: as many as street pairs), beside the street pairs (docs/models.md).",
)
@click.option(
    "--base-weight",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.5,
    show_default=True,
    help="Share of the base encoder's own cosine kept in the embedding beside the head's: each vector carries "
    "the base's pooled features too (1,280 numbers more), so near copies are told apart as well as the base "
    "did; 0: the head alone (docs/models.md).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Model directory (default: versioned).")
@click.option("--swap", "swap_url", help="Then start the new generation on this node (URL of its API).")
@click.option("--token", envvar="LOOKSTREAM_ADMIN_TOKEN", help="Admin token for --swap (or LOOKSTREAM_ADMIN_TOKEN).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def train_command(
    config_path,
    data_dir,
    dim,
    unfreeze,
    epochs,
    batch_size,
    lr,
    block_lr,
    views,
    heldout,
    max_pairs,
    self_pairs,
    base_weight,
    seed,
    out,
    swap_url,
    token,
    no_progress,
) -> None:
    """Fine-tune the active encoder on the mined pairs; write a versioned model directory (and swap it in)."""
    from indexer.training.trainer import TrainOptions, train

    settings = _settings(config_path, data_dir=data_dir)
    options = TrainOptions(
        base=settings.models.encoder,
        dim=dim,
        trained_blocks=unfreeze,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        block_lr=block_lr,
        views=views,
        heldout=heldout,
        max_pairs=max_pairs,
        self_pairs=self_pairs,
        base_weight=base_weight,
        seed=seed,
    )
    try:
        result = train(
            settings.data_dir,
            options,
            out=out,
            threads=settings.models.cpu_threads,
            progress=not no_progress,
            echo=click.echo,
        )
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"model written to {result.path}")
    if swap_url:
        _swap(swap_url, token, settings, result.path)


def _swap(url: str, token: str | None, settings: Settings, path: Path) -> None:
    """POST /admin/swap with the active options, the new model's path in place of the finetuned encoder's."""
    import json
    import urllib.error
    import urllib.request

    finetuned = {**settings.models.options.get("finetuned", {}), "path": str(path.resolve())}
    options = {**settings.models.options, "finetuned": finetuned}
    request = urllib.request.Request(
        f"{url.rstrip('/')}/admin/swap",
        data=json.dumps({"encoder": "finetuned", "options": options}).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    body = _request_json(request, url, timeout=600, refused="swap refused, ")
    click.echo(f"generation {body.get('generation')} started on {url}: {body.get('state') or body.get('note')}")


def _request_json(request: urllib.request.Request, url: str, timeout: float, refused: str = "") -> dict:
    """The JSON answer to ``request``; an HTTP error or an unreachable ``url`` as a ClickException saying which."""
    import contextlib
    import json
    import urllib.error

    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        with contextlib.suppress(ValueError, AttributeError):  # a JSON error body says what in "error"
            text = json.loads(text).get("error", text)
        raise click.ClickException(f"{refused}{e.code}: {text}") from e
    except urllib.error.URLError as e:
        raise click.ClickException(f"cannot reach {url}: {e.reason}") from e
