"""CUDA graphs of modules with fixed weights, one per batch-size bucket (the engine's GPU fast path)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Batch-size buckets for CUDA graphs (a batch is padded up to the next one). Fine-grained:
#: padding a ViT-B group of 9 to 16 cost more than the graph saved (measured on an H100).
GRAPH_BUCKETS = (
    *range(1, 9),
    *range(10, 17, 2),
    *range(20, 33, 4),
    *range(40, 65, 8),
    *range(80, 129, 16),
    *range(160, 257, 32),
)


class GraphRunner:
    """Replays CUDA graphs of a module with FIXED weights, one per batch-size bucket.

    A tiny model's forward on a GPU is bound by Python and kernel-launch overhead; a
    graph replays all kernels with one call. Rows are independent in a ViT and in an
    eval-mode CNN, so padding a batch to its bucket does not change the real rows.
    The returned tensor is a view of the graph's static output: consume it before the
    next call (the engine copies it at once).
    """

    def __init__(self, module: nn.Module, pool: Any):
        self.module, self.pool = module, pool
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        bucket = next((b for b in GRAPH_BUCKETS if b >= n), None)
        if bucket is None:
            return self.module(x)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket, x)
        static_in, static_out, graph = self.graphs[bucket]
        static_in[:n].copy_(x)
        graph.replay()
        return static_out[:n]

    def _capture(self, bucket: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]:
        static_in = torch.zeros((bucket, *x.shape[1:]), device=x.device, dtype=x.dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.module(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.module(static_in)
        return static_in, static_out, graph
