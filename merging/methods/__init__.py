"""Pure merge methods over state dicts (task vectors, averaging, TIES, DARE, EMR, RegMean, Fisher, similarity).

Imports only ``merging.types`` and ``model_store``; the catalog module registers them."""
