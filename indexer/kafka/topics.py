"""Create lookstream's topics on a cluster if they are missing."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from indexer.config import KafkaSettings

log = logging.getLogger(__name__)


def ensure_topics(kafka: KafkaSettings) -> None:
    """Create the product, post and dead-letter topics where missing (existing ones are left as they are).

    The dead-letter topic takes messages up to ``kafka.dead_letter_max_message_bytes``
    (by default the largest event plus 64 KiB):
    a dead letter is the event as it came plus the reason headers.
    """
    topics = kafka.topics
    wanted = [topics.products, topics.posts, topics.dead_letter]
    dead_letter_bytes = kafka.dead_letter_max_message_bytes or kafka.produce_request_bytes
    configs = {topics.dead_letter: {"max.message.bytes": str(dead_letter_bytes)}}
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, client_id="lookstream-admin")
    try:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        for name in missing:
            try:
                topic = NewTopic(
                    name,
                    num_partitions=kafka.partitions,
                    replication_factor=kafka.replication_factor,
                    topic_configs=configs.get(name, {}),
                )
                admin.create_topics([topic])
                log.info("created topic %s with %d partitions", name, kafka.partitions)
            except TopicAlreadyExistsError:
                pass  # another node created it first
    finally:
        admin.close()


def ensure_topic(kafka: KafkaSettings, name: str, partitions: int, configs: dict[str, str] | None = None) -> None:
    """Create one topic (a records topic, the membership topic) if it is missing; an existing one is kept."""
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, client_id="lookstream-admin")
    try:
        if name in set(admin.list_topics()):
            return
        topic = NewTopic(name, partitions, kafka.replication_factor, topic_configs=configs or {})
        try:
            admin.create_topics([topic])
            log.info("created topic %s with %d partitions", name, partitions)
        except TopicAlreadyExistsError:
            pass  # another node created it first
    finally:
        admin.close()
