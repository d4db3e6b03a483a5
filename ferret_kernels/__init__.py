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
budget, fingerprint, weight digest), ``ClientRound`` (compress a local update),
``ClientUpdate`` / ``GlobalUpdate`` / ``MessageError`` (the messages and their one
refusal type, ``messages``), ``Aggregator`` (merge with bounded influence, robust
options and ``DifferentialPrivacy``; apply), ``wire`` (canonical safetensors bytes) and
``ferret_kernels.hooks.FerretCallback`` (Hugging Face Trainer; imports transformers, so
it is not part of ``from ferret_kernels import *``).

Imports run one way: rng, layout, digest <- plan <- messages <- client, server <- wire,
hooks (docs/api.md).
"""

from . import wire
from .client import ClientRound
from .dp import DifferentialPrivacy
from .functional import (
    basis,
    perturb_,
    perturb_blocks_,
    project,
    project_blocks,
    reconstruct_,
    reconstruct_blocks_,
)
from .messages import ClientUpdate, GlobalUpdate, MessageError
from .plan import FerretPlan, round_seed
from .rng import CONTRACT_VERSION, DISTRIBUTIONS, VARIANCE
from .server import Aggregator
from .wire import decode_client_update, decode_global_update, encode_client_update, encode_global_update

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ClientRound",
    "ClientUpdate",
    "DifferentialPrivacy",
    "FerretPlan",
    "GlobalUpdate",
    "MessageError",
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
    # FerretCallback subclasses transformers.TrainerCallback: import it only when asked
    # (it is left out of __all__, so a star import does not load transformers either).
    if name == "FerretCallback":
        from .hooks import FerretCallback

        return FerretCallback
    raise AttributeError(f"module 'ferret_kernels' has no attribute {name!r}")
