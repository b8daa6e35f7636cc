"""Shared type aliases of the merging library."""

from __future__ import annotations

from collections.abc import Mapping

import torch

StateDict = dict[str, torch.Tensor]
#: Any read-only name -> tensor mapping; lazy mappings make the merges streaming.
Tensors = Mapping[str, torch.Tensor]
