"""Seeded sampling helpers shared by the loaders: per-name random streams and the
Dirichlet label split used for non-IID client partitions.
"""

from __future__ import annotations

import hashlib

import numpy as np


def named_rng(seed: int, name: str) -> np.random.Generator:
    """A numpy Generator determined by (seed, name) alone.

    Each task gets its own stream so adding or removing one task (or reordering a task list)
    leaves every other task's sample unchanged. ``hash(str)`` is salted per process, so the
    name is digested with SHA-256 instead.
    """
    digest = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


def dirichlet_label_split(
    labels,
    num_clients: int,
    alpha: float,
    min_samples: int,
    rng: np.random.Generator,
    max_attempts: int = 10_000,
) -> list[np.ndarray]:
    """Split sample indices over clients with per-label Dirichlet(alpha) proportions.

    The NIID-Bench / FedKSeed / Ferret scheme: for every label, draw client proportions from
    Dirichlet(alpha * 1_N), zero them for clients that already hold at least n/N samples (keeps
    sizes balanced), renormalise and cut that label's shuffled indices at the cumulative
    proportions. The whole draw is repeated until every client holds >= ``min_samples``.

    labels: int array-like, shape [n]; any integer values (they are only compared for equality).
    Returns num_clients int64 arrays of indices into ``labels``; together they partition
    range(n), each shuffled. Raises ValueError when n < num_clients * min_samples and
    RuntimeError when ``max_attempts`` draws all fail the minimum.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1; got {num_clients}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    if n < num_clients * min_samples:
        raise ValueError(f"{n} samples cannot give {num_clients} clients {min_samples} each")
    per_label = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    for _ in range(max_attempts):
        batches: list[list[int]] = [[] for _ in range(num_clients)]
        for indices in per_label:
            indices = rng.permutation(indices)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            below_fair_share = np.array([len(b) < n / num_clients for b in batches])
            proportions = proportions * below_fair_share
            if proportions.sum() <= 0:
                # Small alpha can underflow every eligible proportion to 0.0.
                proportions = below_fair_share.astype(float)
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(indices)).astype(int)[:-1]
            for batch, part in zip(batches, np.split(indices, cuts), strict=True):
                batch.extend(part.tolist())
        if min(len(b) for b in batches) >= min_samples:
            return [rng.permutation(np.asarray(b, dtype=np.int64)) for b in batches]
    raise RuntimeError(
        f"no Dirichlet(alpha={alpha}) split of {n} samples gave all {num_clients} clients "
        f">= {min_samples} samples in {max_attempts} attempts; lower num_clients or min_samples, or raise alpha"
    )
