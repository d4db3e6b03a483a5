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

On top of them, the drop-in federated API (docs/api.md): ``FerretPlan`` (blocks,
budget, fingerprint), ``ClientRound`` / ``ClientUpdate`` (compress a local update),
``Aggregator`` / ``GlobalUpdate`` (merge, apply, replay), ``wire`` (safetensors bytes)
and ``FerretCallback`` (Hugging Face Trainer).
"""

from . import wire
from .client import ClientRound, ClientUpdate
from .functional import (
    basis,
    perturb_,
    perturb_blocks_,
    project,
    project_blocks,
    reconstruct_,
    reconstruct_blocks_,
)
from .plan import FerretPlan, round_seed
from .rng import CONTRACT_VERSION, DISTRIBUTIONS, VARIANCE
from .server import Aggregator, GlobalUpdate
from .wire import decode_client_update, decode_global_update, encode_client_update, encode_global_update

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ClientRound",
    "ClientUpdate",
    "FerretCallback",
    "FerretPlan",
    "GlobalUpdate",
    "decode_client_update",
    "decode_global_update",
    "encode_client_update",
    "encode_global_update",
    "round_seed",
    "wire",
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


def __getattr__(name):
    # FerretCallback subclasses transformers.TrainerCallback: import it only when asked,
    # so ferret_kernels itself never needs transformers.
    if name == "FerretCallback":
        from .hooks import FerretCallback

        return FerretCallback
    raise AttributeError(f"module 'ferret_kernels' has no attribute {name!r}")
