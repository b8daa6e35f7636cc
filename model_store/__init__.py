"""On-disk formats: offline datasets, source zoos, merged bundles, importers."""
