"""Block grouping and per-block budget allocation (the first pieces of the block plan).

Grouping follows the paper's reference code: walk the parameters in order and close a
block before a tensor that would take it past 0.9 x the median tensor size, so a block
is about one weight matrix and the small tensors around it (194 blocks for a 24-layer
LLaMA). Allocation splits an exact budget K over blocks, at least one basis each.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# The reference code's threshold: a block closes before it would pass this fraction of
# the median tensor size.
MEDIAN_FRACTION = 0.9

ALLOCATIONS = ("norm", "sqrt_norm", "size", "uniform")


def paper_blocks(numels: Sequence[int]) -> list[list[int]]:
    """Indices of the tensors in each block, grouping as the paper's code does."""
    if not numels:
        raise ValueError("numels is empty: the model has no trainable parameters")
    limit = MEDIAN_FRACTION * float(torch.tensor([float(n) for n in numels]).median())
    blocks, current, size = [], [], 0
    for i, n in enumerate(numels):
        if current and size + n > limit:
            blocks.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    blocks.append(current)
    return blocks


def allocate(budget: int, weights: Sequence[float]) -> list[int]:
    """Split ``budget`` into one count per block, each >= 1, summing to ``budget``.

    Counts are 1 + the largest-remainder rounding of (budget - L) * w_l / sum(w); with
    all-zero weights the split is uniform. Deterministic: ties go to the lower index.
    """
    L = len(weights)
    if L == 0:
        raise ValueError("weights is empty: nothing to allocate over")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < L:
        raise ValueError(f"budget must be an int >= the number of blocks ({L}); got {budget}")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError("weights must be finite and >= 0 (a NaN update norm means the local step diverged)")
    total = sum(w)
    if total == 0:
        w, total = [1.0] * L, float(L)
    spare = budget - L
    shares = [spare * x / total for x in w]
    counts = [math.floor(s) for s in shares]
    left = spare - sum(counts)
    order = sorted(range(L), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return [1 + c for c in counts]


def allocation_weights(method: str, norms: Sequence[float], sizes: Sequence[int]) -> list[float]:
    """Per-block weights for ``allocate``: the paper's default is ``norm``."""
    if method == "norm":
        return list(norms)
    if method == "sqrt_norm":
        return [math.sqrt(n) for n in norms]
    if method == "size":
        return [float(s) for s in sizes]
    if method == "uniform":
        return [1.0] * len(sizes)
    raise ValueError(f"allocation must be one of {ALLOCATIONS}; got {method!r}")
