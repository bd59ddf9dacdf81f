"""The HTTP API: the app factory, its routes and handlers, the OpenAPI document and metrics."""
