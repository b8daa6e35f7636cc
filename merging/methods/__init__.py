"""Pure merge methods over state dicts (task vectors, averaging, TIES, DARE, EMR, RegMean, Fisher, TSV, similarity).

The method modules import only ``merging.types`` and ``model_store``; ``shared_base_methods`` (which also
imports ``merging.registry``) registers them."""
