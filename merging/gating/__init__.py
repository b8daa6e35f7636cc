"""Gated layer mixing: which blocks to gate (plan) and the router CNN that tells the task (training).

Imports ``merging.methods`` and ``model_store``."""
