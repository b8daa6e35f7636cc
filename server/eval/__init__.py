"""Accuracy of bundles through the serving Engine (task given and routed), joint accuracy, the accuracy benchmark.

Imports ``server.runtime``, ``merging`` and ``model_store``."""
