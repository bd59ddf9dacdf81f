"""The store: records filed into live FAISS shards, their checkpoints and thumbnails.

It knows nothing of models or Kafka: it takes :mod:`indexer.store.records`
operations and answers nearest-neighbour searches (docs/architecture.md).
"""
