"""Create lookstream's topics on a cluster if they are missing."""

from __future__ import annotations

import logging

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from indexer.config import KafkaSettings

log = logging.getLogger(__name__)


def ensure_topics(kafka: KafkaSettings) -> None:
    topics = kafka.topics
    wanted = [topics.products, topics.posts, topics.dead_letter]
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, client_id="lookstream-admin")
    try:
        existing = set(admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        for name in missing:
            try:
                admin.create_topics([NewTopic(name, num_partitions=kafka.partitions, replication_factor=1)])
                log.info("created topic %s with %d partitions", name, kafka.partitions)
            except TopicAlreadyExistsError:
                pass  # another node created it first
    finally:
        admin.close()
