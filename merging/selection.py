"""Label-free selection's rules (SPEC section 9), pure: which grid of parameters a method is swept over, and
which candidate a target agreement picks from measured records.

The loop that merges and measures the candidates is :func:`merging.pipeline.select_and_publish` (it takes
the measurement as a hook: measuring needs the serving Engine, :mod:`server.runtime.selection`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from merging.method_index import get_method, parse_params
from model_store.schema import CandidateRecord, SelectionRecord

__all__ = [
    "DEFAULT_GRID",
    "MAX_CANDIDATES",
    "CandidateRecord",
    "SelectionError",
    "SelectionRecord",
    "choose",
    "format_selection",
    "selection_grid",
]

#: The parameters a grid may sweep, and the values swept when the caller names none (for the methods that
#: have the parameter): TSV-C's rank fraction, the factors' stored width, and the backbone router's depth.
DEFAULT_GRID: dict[str, tuple[Any, ...]] = {
    "f": (0.02, 0.03, 0.045, 0.06, 0.1),
    "bits": (32, 8, 4),
    "router_k": (1, 2, 3),
}


#: The most candidates a grid may have (each is a merge and a measurement).
MAX_CANDIDATES = 64


class SelectionError(ValueError):
    """No candidate of the grid reaches the target agreement (or the grid itself is invalid)."""


def _sweeps(method: str, params: Mapping[str, Any], axis: str) -> bool:
    """Whether ``axis`` is swept by default for ``method`` with ``params``: the method has it (and a router
    depth only for the backbone router)."""
    fields = get_method(method).params.model_fields
    if axis not in fields:
        return False
    router = params.get("router", fields["router"].default if "router" in fields else None)
    return axis != "router_k" or router != "gate"


def selection_grid(
    method: str, params: Mapping[str, Any], grid: Mapping[str, Sequence[Any]] | None = None
) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """The grid's axes and its candidates (parameter overrides), largest ``f`` first.

    ``grid`` names axes and values (others of :data:`DEFAULT_GRID` the method has keep their defaults); every
    candidate is validated here, before any work. :class:`SelectionError` for an axis the method lacks, an
    empty axis, a bad value, more than :data:`MAX_CANDIDATES` candidates, or a grid of one method without any
    axis to sweep.
    """
    name = get_method(method).name
    fields = get_method(name).params.model_fields
    axes: dict[str, list[Any]] = {a: list(v) for a, v in DEFAULT_GRID.items() if _sweeps(name, params, a)}
    for axis, values in (grid or {}).items():
        if axis not in fields:
            raise SelectionError(
                f"grid axis '{axis}' is not a parameter of '{name}' (its parameters: {', '.join(fields) or 'none'})"
            )
        if not values:
            raise SelectionError(f"grid axis '{axis}' has no values")
        if not all(isinstance(v, bool | int | float | str) for v in values):
            raise SelectionError(f"grid axis '{axis}': values must be numbers, booleans or strings")
        axes[axis] = list(dict.fromkeys(values))
    if not axes:
        raise SelectionError(
            f"'{name}' has none of the parameters a grid sweeps by default ({', '.join(DEFAULT_GRID)}); name some with "
            "grid axes"
        )
    size = math.prod(len(v) for v in axes.values())
    if size > MAX_CANDIDATES:
        raise SelectionError(f"the grid has {size} candidates; at most {MAX_CANDIDATES} (each is a merge)")
    keys = list(axes)
    candidates = [dict(zip(keys, values)) for values in itertools.product(*axes.values())]
    for c in candidates:
        try:
            parse_params(name, {**params, **c})
        except ValueError as e:
            raise SelectionError(f"grid candidate {c}: {e}") from e
    candidates.sort(key=lambda c: -float(c.get("f") or 0.0))  # the largest f first: its SVDs serve the others
    return axes, candidates


def rank(record: CandidateRecord) -> tuple[int, float]:
    """Fewer stored bytes first; among equal sizes the higher worst-task agreement."""
    return record.stored_bytes, -record.min_agreement


def choose(records: Sequence[CandidateRecord], target: float) -> CandidateRecord:
    """The candidate with the fewest stored bytes that meets ``target`` on every task (ties: the higher worst-task
    agreement, then grid order); :class:`SelectionError` naming the best agreement reached when none does."""
    meeting = [r for r in records if r.meets_target]
    if meeting:
        return min(meeting, key=rank)
    if not records:
        raise SelectionError("the grid has no candidates")
    best = max(records, key=lambda r: (r.min_agreement, -r.stored_bytes))
    raise SelectionError(
        f"no candidate of the grid reaches agreement {target} on every task's held-out calibration images; the best "
        f"reached {best.min_agreement:.4f} (task '{best.worst_task}') with {best.params} "
        f"({best.x_one_model:.3f}x one model); widen the grid or lower the target"
    )


def format_selection(selection: SelectionRecord) -> str:
    """Markdown table of a selection: per candidate its parameters, x one model, worst-task agreement, chosen."""
    lines = [
        f"| candidate | x one model | min {selection.measure} agreement (task) | meets {selection.target_agreement} |",
        "|---|---|---|---|",
    ]
    for r in sorted(selection.candidates, key=lambda r: r.stored_bytes):
        name = ", ".join(f"{k}={v}" for k, v in r.params.items())
        mark = " **chosen**" if r.params == selection.chosen else ""
        lines.append(
            f"| {name}{mark} | {r.x_one_model:.3f} | {100 * r.min_agreement:.2f}% ({r.worst_task}) "
            f"| {'yes' if r.meets_target else 'no'} |"
        )
    return "\n".join(lines)
