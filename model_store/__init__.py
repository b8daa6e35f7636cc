"""Formats and what feeds them: zoo and bundle schemas and stores, networks, data sources, importers, zoo builds.

The bottom layer: imports nothing from ``merging`` or ``server``."""
