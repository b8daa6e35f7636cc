"""Per-image routing state shared by the gated and low-rank layers of :class:`~server.runtime.gated_vit.GatedViT`.

:class:`Routing` holds the current pass's per-image weights ``p`` (or one expert, or sorted image
groups) and the scratch buffer the gated linear layers mix their weights into.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

#: ``(rows, expert)``: a contiguous run of images; ``expert`` when the run uses one expert only
Group = tuple[slice, int | None]
#: ``(offset, numel)`` of one stacked tensor in :attr:`GatedViT.small_stack`
Slot = tuple[int, int]


class Routing:
    """Routing of the current (sub)batch: per-image weights ``p`` (B, N) or one expert for all.

    Also owns the scratch buffer the gated linear layers mix their per-image weights into:
    layers run one after another, so one buffer (grown to the largest ``B x out x in``)
    serves them all. A fresh ``B x`` (gated parameters) allocation per layer and batch
    cost page faults and cache misses -- up to half of the exact strategy's time.
    """

    def __init__(self) -> None:
        self.p: torch.Tensor | None = None
        self.expert: int | None = None
        #: sparse routing: the batch is sorted so that each group is a contiguous run of images
        self.groups: list[Group] | None = None
        #: ``p @`` the small-tensor table of the current pass (``B x S``)
        self.table: torch.Tensor | None = None
        #: hard routing (every group one expert): each image's expert ``(B,)``; small tensors are
        #: gathered with it (an index, not a ``B x S`` matmul over every small tensor)
        self.index: torch.Tensor | None = None
        #: soft routing: the experts with a nonzero weight for some image of the pass, found ONCE per pass
        #: (one host sync before the layer loop, none inside it); ``None``: every expert
        self.active: list[int] | None = None
        self._scratch: torch.Tensor | None = None

    def scratch(self, numel: int, like: torch.Tensor) -> torch.Tensor | None:
        """A reusable flat buffer of ``numel`` elements (dtype/device of ``like``); ``None`` under autograd."""
        if torch.is_grad_enabled():
            return None
        buf, inference = self._scratch, torch.is_inference_mode_enabled()
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
            or buf.is_inference() != inference
        ):
            buf = self._scratch = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    def experts(self, n: int) -> Sequence[int]:
        """The experts a soft-routed layer must run: :attr:`active`, or all ``n`` when it is not set."""
        return range(n) if self.active is None else self.active

    def hard_groups(self) -> list[tuple[slice, int]] | None:
        """The groups of the current pass when every one runs a single expert, else ``None``."""
        if self.groups is None or any(e is None for _, e in self.groups):
            return None
        return cast(list[tuple[slice, int]], self.groups)

    @property
    def scratch_bytes(self) -> int:
        """Bytes held by the scratch buffer."""
        buf = self._scratch
        return 0 if buf is None else buf.numel() * buf.element_size()

    def release(self) -> None:
        """Drop the scratch buffer (it is re-created on the next exact pass)."""
        self._scratch = None

    def mix(self, stack: torch.Tensor, slot: Slot | None = None) -> torch.Tensor:
        """``(N, *s)`` -> ``(B, *s)`` per-image mixture, or ``(*s)`` for a single expert.

        ``slot``: where ``stack`` sits in the table of small tensors that
        :class:`GatedViT` mixes once per pass (one matmul instead of one per tensor).
        """
        if self.expert is not None:
            return stack[self.expert]
        if self.index is not None:
            return stack.index_select(0, self.index)
        assert self.p is not None, "routing not set"
        if slot is not None and self.table is not None:
            return self.table[:, slot[0] : slot[0] + slot[1]].view(self.p.shape[0], *stack.shape[1:])
        n = stack.shape[0]
        return (self.p @ stack.reshape(n, -1)).reshape(self.p.shape[0], *stack.shape[1:])
