"""Array helpers where numpy's general routine is slow for our shapes."""

from __future__ import annotations

import numpy as np


def unique(x: np.ndarray) -> np.ndarray:
    """Sorted distinct values of ``x``, by one sort.

    ``np.unique(x)`` on a plain integer array takes a hash-table path in numpy 2.3+ that is
    far slower than sorting at millions of elements (measured in BENCHMARKS.md, "Data
    preparation"); every id array goes through here instead.
    """
    s = np.sort(np.asarray(x).ravel())
    if len(s) == 0:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
