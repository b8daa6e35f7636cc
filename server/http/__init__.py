"""The HTTP server: app factory and routes, settings, codec, schemas, errors, batcher, model manager, merge jobs,
metrics.

Imports ``server.runtime`` and ``model_store``; reaches ``merging`` only through ``merging.pipeline``
(admin merge jobs)."""
