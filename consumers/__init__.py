"""Kafka consumer loops that feed the pipeline and the shards."""
