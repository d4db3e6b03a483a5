"""Federated algorithms on one interface (``base.Algorithm``): Ferret and its baselines."""

from __future__ import annotations

from .base import Algorithm, ClientMessage, LocalConfig
from .fedavg import FedAvg
from .fedit import FedIT
from .fedkseed import FedKSeed
from .ferret import Ferret

__all__ = ["Algorithm", "ClientMessage", "FedAvg", "FedIT", "FedKSeed", "Ferret", "LocalConfig", "build_algorithm"]


def build_algorithm(cfg, model) -> Algorithm:
    """The algorithm named by ``cfg.algorithm`` (a ``RunConfig``), bound to ``model``."""
    local = LocalConfig(lr=cfg.lr, optimizer=cfg.optimizer)
    if cfg.algorithm == "ferret":
        return Ferret(model, local, budget=cfg.budget, server_lr=cfg.server_lr, server_lr_decay=cfg.server_lr_decay,
                      distribution=cfg.distribution, allocation=cfg.allocation, scale=cfg.scale,
                      coefficient_dtype=cfg.coefficient_dtype, backend=cfg.backend, seed=cfg.seed)
    if cfg.algorithm == "fedavg":
        return FedAvg(local)
    if cfg.algorithm == "fedkseed":
        return FedKSeed(num_candidates=cfg.kseed_candidates, eps=cfg.kseed_eps, lr=cfg.kseed_lr, seed=cfg.seed,
                        distribution=cfg.distribution, backend=cfg.backend)
    if cfg.algorithm == "fedit":
        return FedIT(local, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    raise ValueError(f"unknown algorithm {cfg.algorithm!r}")
