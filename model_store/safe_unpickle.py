"""A restricted unpickler that can only rebuild numpy arrays.

Used for animal-mnist's gzip pickles: plain `pickle.load` would execute any
callable the file names; this one refuses everything but array reconstruction.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` allows only numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        import numpy as np

        if name == "_reconstruct":
            return np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct  # type: ignore[attr-defined]
        return getattr(np, name)


def load_numpy_pickle(data: bytes) -> Any:
    """Unpickle `data`, allowing only numpy arrays and dtypes."""
    return NumpyOnlyUnpickler(io.BytesIO(data)).load()
