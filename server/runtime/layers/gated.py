"""Gated layers: each holds its N expert copies ``(N, ...)`` and mixes them per image (SPEC section 3).

Drop-in replacements for timm's ``nn.Linear`` / ``nn.LayerNorm`` / ``LayerScale`` / patch-embedding
``nn.Conv2d``, reading the current :class:`~server.runtime.layers.routing.Routing`. Linear layers mix
weights per image into one reused scratch buffer and use a batched matmul (``mode="mix"``, the
default: fewer FLOPs) or run every expert and mix outputs (``mode="experts"``); both are exact.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from server.runtime.layers.routing import Group, Routing, Slot

LinearMode = Literal["mix", "experts"]


class GatedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing, mode: LinearMode = "mix"):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, out, in)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None  # (N, out)
        self.routing, self.mode = routing, mode
        self.slots: dict[str, Slot] = {}
        self._views: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._views_key: tuple[int, torch.dtype] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.expert is not None:
            return F.linear(x, self.weight[r.expert], None if self.bias is None else self.bias[r.expert])
        assert r.p is not None
        if r.groups is not None:
            return self._grouped(x, r.p, r.groups)
        return self._mixed(x, r.p)

    def _grouped(self, x: torch.Tensor, p: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
        """Contiguous image groups: a one-expert group is a plain dense layer, others mix."""
        out_f, in_f = self.weight.shape[1:]
        y = x.new_empty(*x.shape[:-1], out_f)
        x2, y2 = x.reshape(-1, in_f), y.view(-1, out_f)
        per_image = x2.shape[0] // x.shape[0]  # tokens per image
        for rows, expert in groups:
            if expert is None:
                y[rows] = self._mixed(x[rows], p[rows])
                continue
            tokens = slice(rows.start * per_image, rows.stop * per_image)
            w_t, b = self._expert(expert)
            if b is None:
                torch.mm(x2[tokens], w_t, out=y2[tokens])
            else:
                torch.addmm(b, x2[tokens], w_t, out=y2[tokens])
        return y

    def _expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expert ``i``'s ``(W_i^T, b_i)`` as views, cached while the weights stay put (``.to()`` moves them)."""
        key = (self.weight.data_ptr(), self.weight.dtype)
        if self._views_key != key:
            self._views = [
                (w.t(), None if self.bias is None else self.bias[j]) for j, w in enumerate(self.weight.detach())
            ]
            self._views_key = key
        return self._views[i]

    def _mixed(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Image b uses ``sum_i p[b, i] (W_i x + b_i)``."""
        squeeze = x.ndim == 2
        if squeeze:
            x = x.unsqueeze(1)
        if self.mode == "experts":
            terms = []
            for i in self.routing.experts(self.weight.shape[0]):  # a zero weight adds exact zeros: no sync
                w = p[:, i].view(-1, 1, 1)
                terms.append(w * F.linear(x, self.weight[i], None if self.bias is None else self.bias[i]))
            y = functools.reduce(operator.add, terms)  # left to right, as a running sum
        else:
            n, out_f, in_f = self.weight.shape
            batch = p.shape[0]
            buf = self.routing.scratch(batch * out_f * in_f, x)
            flat = self.weight.reshape(n, -1)
            w = (torch.mm(p, flat, out=buf.view(batch, -1)) if buf is not None else p @ flat).view(batch, out_f, in_f)
            y = torch.bmm(x, w.transpose(1, 2))
            if self.bias is not None:  # in place: baddbmm would first copy the bias over the whole output
                bias = self.routing.mix(self.bias, self.slots.get("bias")) if p is self.routing.p else p @ self.bias
                y = y.add_(bias.unsqueeze(1)) if buf is not None else y + bias.unsqueeze(1)
        return y.squeeze(1) if squeeze else y


class GatedLayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float, routing: Routing):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, D)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.eps, self.routing = eps, routing
        self.slots: dict[str, Slot] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, (x.shape[-1],), None, None, self.eps)
        w, b = (
            self.routing.mix(self.weight, self.slots.get("weight")),
            self.routing.mix(self.bias, self.slots.get("bias")),
        )
        if self.routing.expert is None:
            shape = (w.shape[0],) + (1,) * (x.ndim - 2) + (w.shape[-1],)
            w, b = w.view(shape), b.view(shape)
        # in place when autograd is off: no second fresh activation-sized buffer (page faults)
        return torch.addcmul(b, y, w) if torch.is_grad_enabled() else torch.addcmul(b, y, w, out=y)


class GatedLayerScale(nn.Module):
    def __init__(self, gamma: torch.Tensor, routing: Routing):
        super().__init__()
        self.gamma = nn.Parameter(gamma, requires_grad=False)  # (N, D)
        self.routing = routing
        self.slots: dict[str, Slot] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.routing.mix(self.gamma, self.slots.get("gamma"))
        return x * (g if self.routing.expert is not None else g.unsqueeze(1))


class GatedConv2d(nn.Module):
    """Patch-embedding convolution, mixed per image: non-overlapping patches (timm's
    patch embedding) run as a per-image linear map with mixed weights; any other
    convolution runs every expert and mixes the outputs."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing):
        super().__init__()
        self.stride, self.padding = conv.stride, conv.padding
        self.weight = nn.Parameter(weight, requires_grad=False)  # (N, D, C, k, k)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.routing = routing
        self.slots: dict[str, Slot] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing
        if r.expert is not None:
            return self._conv(x, r.expert)
        hard = r.hard_groups()
        if hard is not None:  # one expert per (contiguous) group: a plain convolution per group
            return torch.cat([self._conv(x[rows], e) for rows, e in hard])
        assert r.p is not None
        n, d = self.weight.shape[:2]
        kernel = tuple(self.weight.shape[-2:])
        if tuple(self.stride) == kernel and tuple(self.padding) == (0, 0):
            # non-overlapping patches: a per-image linear map of each patch, mixed weights + bmm
            patches = F.unfold(x, kernel, stride=kernel)  # (B, C*k*k, L)
            w = r.mix(self.weight.reshape(n, d, -1), self.slots.get("weight"))  # (B, D, C*k*k)
            y = torch.bmm(w, patches)
            if self.bias is not None:
                y = y.add_(r.mix(self.bias, self.slots.get("bias")).unsqueeze(-1))
            return y.view(x.shape[0], d, x.shape[-2] // kernel[0], x.shape[-1] // kernel[1])
        y = F.conv2d(
            x, self.weight.flatten(0, 1), None if self.bias is None else self.bias.flatten(), self.stride, self.padding
        )
        y = y.view(y.shape[0], n, d, *y.shape[2:])
        return torch.einsum("bn,bnd...->bd...", r.p, y)

    def _conv(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Expert ``expert``'s convolution."""
        bias = None if self.bias is None else self.bias[expert]
        return F.conv2d(x, self.weight[expert], bias, self.stride, self.padding)
