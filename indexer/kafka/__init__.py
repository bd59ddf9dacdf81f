"""Kafka plumbing of a node: the local broker of the embedded default, and topic creation."""
