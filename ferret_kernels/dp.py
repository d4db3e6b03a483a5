"""Central client-level differential privacy for the Aggregator (docs/privacy.md).

The Gaussian mechanism of DP-FedAvg (McMahan et al., ICLR 2018), in projected space:
each client's coefficient vector is clipped to ``clip_norm`` in the estimated
weight-space norm ||D gamma|| (D_k = sqrt(rho d_l) for a basis of block l, so that
||D gamma|| estimates ||V^T gamma||), the clipped vectors are summed, Gaussian noise of
std ``noise_multiplier * clip_norm`` per coordinate is added in that norm's space (K
coordinates, not d), and the sum is divided by the fixed ``expected_clients``. One
client changes the sum by at most ``clip_norm``, so a round is the sampled Gaussian
mechanism with noise multiplier z; (epsilon, delta) over the rounds so far comes from
the RDP accountant of ``dp-accounting`` (Google's library; an optional dependency:
``pip install 'ferret-kernels[dp]'``).

The layout must not depend on data (client counts K_l chosen by update norm would leak
through the downlink), so under DP every client sends the Aggregator's fixed ``counts``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class DifferentialPrivacy:
    """Settings of central client-level DP.

    noise_multiplier: z; the noise std on the clipped sum is z * clip_norm.
    clip_norm: C, the bound on each client's estimated weight-space update norm.
    expected_clients: the fixed denominator of the mean (clients per round, or q * N).
    delta: the delta epsilon is reported at. sampling_rate: q, the probability that a
    client takes part in a round, with clients sampled independently (Poisson); 1.0
    claims no amplification by sampling. seed: the noise generator's seed; None draws
    one from the operating system (keep it secret: anyone who knows it can remove the
    noise).
    """

    noise_multiplier: float
    clip_norm: float
    expected_clients: int
    delta: float = 1e-5
    sampling_rate: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a positive finite number; got {self.noise_multiplier!r}")
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive finite number; got {self.clip_norm!r}")
        if isinstance(self.expected_clients, bool) or not isinstance(self.expected_clients, int) \
                or self.expected_clients < 1:
            raise ValueError(f"expected_clients must be an int >= 1; got {self.expected_clients!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1); got {self.delta!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling_rate must be in (0, 1]; got {self.sampling_rate!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63); got {self.seed!r}")

    def noise_seed(self) -> int:
        return secrets.randbits(63) if self.seed is None else self.seed


def epsilon(rounds: list[tuple[float, float]], delta: float) -> float:
    """epsilon at ``delta`` after the given rounds, each (sampling_rate, noise_multiplier),
    from dp-accounting's RDP accountant (add-or-remove-one neighbours). 0.0 for none."""
    if not rounds:
        return 0.0
    try:
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as exc:
        raise ImportError("differential privacy accounting needs dp-accounting: pip install "
                          "'ferret-kernels[dp]' (or pip install dp-accounting)") from exc
    accountant = rdp_privacy_accountant.RdpAccountant()
    runs: dict[tuple[float, float], int] = {}
    for q, z in rounds:
        runs[(q, z)] = runs.get((q, z), 0) + 1
    for (q, z), count in sorted(runs.items()):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)
    return float(accountant.get_epsilon(delta))


def require_accountant() -> None:
    """ImportError with the fix now, rather than after the first noisy round."""
    epsilon([(1.0, 1.0)], 0.5)
