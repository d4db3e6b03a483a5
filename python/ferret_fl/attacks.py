"""Byzantine clients for experiments: a Ferret upload rewritten as an attacker would.

An attacker trains honestly, then replaces its coefficients and re-encodes the message
with a valid digest (the digest is unkeyed: anyone can recompute it), so the server sees a
well-formed upload and only its bounds and robust rules stand between the attacker and
the model:

- ``scaled``: the honest coefficients times -100 (a large step against the descent).
- ``random``: Gaussian coefficients with 100 times the honest vector's norm (a large
  step in no particular direction).
- ``sign_flip``: the honest coefficients negated (an ascent step of honest size).

Which clients attack in a round is seeded by the run seed and the round: exactly
``round(byzantine_fraction * m)`` of the round's m clients, so every row of an experiment
faces the same number of attackers each round.
"""

from __future__ import annotations

import dataclasses

import torch

from ferret_kernels import FerretPlan, wire

from .config import ATTACKS
from .data import named_rng

SCALE = -100.0
RANDOM_NORM_FACTOR = 100.0


def attackers(seed: int, round_index: int, clients: list[int], fraction: float) -> set[int]:
    """The clients of ``clients`` that attack in round ``round_index`` (seeded)."""
    n = round(fraction * len(clients))
    if n == 0:
        return set()
    rng = named_rng(seed, f"byzantine/{round_index}")
    return {clients[int(i)] for i in rng.choice(len(clients), size=n, replace=False)}


def corrupt(payload: bytes, plan: FerretPlan, attack: str, *, round_index: int, seed: int, client_id: int,
            dtype: str = "float32") -> bytes:
    """``payload`` (an encoded ClientUpdate of round ``round_index``) rewritten by ``attack``,
    re-encoded with coefficient dtype ``dtype`` (the run's) and a fresh digest."""
    update = wire.decode_client_update(payload, plan, round=round_index)
    gamma = update.coefficients.double()
    if attack == "scaled":
        forged = gamma * SCALE
    elif attack == "sign_flip":
        forged = -gamma
    elif attack == "random":
        generator = torch.Generator().manual_seed(int(named_rng(seed, f"attack/{round_index}/{client_id}")
                                                      .integers(2**62)))
        noise = torch.randn(gamma.shape, generator=generator, dtype=torch.float64)
        forged = noise * (RANDOM_NORM_FACTOR * gamma.norm() / noise.norm())
    else:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}; got {attack!r}")
    forged_update = dataclasses.replace(update, coefficients=forged.float())
    return wire.encode_client_update(forged_update, dtype=dtype)

