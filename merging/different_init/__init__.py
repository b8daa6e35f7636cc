"""Merging models that share no pretrained base: permutation matching, MuDSC, FS-Merge, distillation.

Imports ``merging.methods``/``merging.gating`` and ``model_store``."""
