"""Robust merging of a round's coefficients in projected space.

Clients of a round share the seed, so client i's update is V^T gamma_i with the same V:
coordinate k of every gamma_i multiplies the same basis v_k. Robust statistics that
act coordinate by coordinate therefore act on K numbers per client instead of d, and
rebuilding the merged coefficients gives the robust update in weight space.

Every function takes ``rows``: float64 (n, K), one client per row, already in one layout
(block l's bases at the same offsets in every row, zero-padded), and returns float64
(K,). Results depend on the set of rows, not their order (sorts are stable on values).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "median", "trimmed_mean")


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the middle value (the mean of the two middle values for even n)."""
    ordered = rows.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(rows: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Per coordinate, the mean after dropping the floor(trim_fraction * n) smallest and
    largest values (Yin et al., 2018). Needs n > 2 * floor(trim_fraction * n)."""
    ordered = rows.sort(dim=0).values
    n = ordered.shape[0]
    t = int(trim_fraction * n)
    kept = ordered[t:n - t]
    return kept.sum(dim=0) / kept.shape[0]
