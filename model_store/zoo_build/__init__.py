"""Building zoos from presets (the demo zoos): presets as data, one build loop, task-model training.

Part of ``model_store``; imports only ``model_store``."""
