"""lookstream's core: config, events, images, pipeline, shards, the HTTP app and the CLI."""
