"""Inference on a published bundle: bundle reader, Engine with one strategy per bundle kind, gated ViT,
weight cache, CUDA graphs, process worker.

Imports only ``model_store`` (never ``merging``: serving does not load training code)."""
