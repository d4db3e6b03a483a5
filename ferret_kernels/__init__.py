"""ferret-kernels: seeded random projections for federated full-parameter tuning (Ferret).

The public ops regenerate the K x d random basis V from a seed on the fly (counter-based
Philox, docs/rng.md) instead of storing it:

- ``project(x, seed, K)``                      gamma = V x
- ``reconstruct_(out, gamma, seed, alpha)``    out += alpha V^T gamma
- ``perturb_(out, seed, k, alpha)``            out += alpha v_k
- ``perturb_blocks_``                          the same for direction k of every block
- ``project_blocks`` / ``reconstruct_blocks_`` the same over L ragged blocks, one launch
- ``basis(seed, K, d)``                        V itself, for tests

Each takes ``backend="auto" | "triton" | "cpu" | "torch"``.
"""

from .functional import (
    basis,
    perturb_,
    perturb_blocks_,
    project,
    project_blocks,
    reconstruct_,
    reconstruct_blocks_,
)
from .rng import CONTRACT_VERSION, DISTRIBUTIONS, VARIANCE

__version__ = "0.1.0"

__all__ = [
    "CONTRACT_VERSION",
    "DISTRIBUTIONS",
    "VARIANCE",
    "basis",
    "perturb_",
    "perturb_blocks_",
    "project",
    "project_blocks",
    "reconstruct_",
    "reconstruct_blocks_",
]
