"""Run configuration: one dataclass, loaded from YAML and overridden by flags.

Defaults follow the paper's Natural Instructions setup for Ferret (configs/ holds each of
the paper's setups). Unknown keys are refused, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ALGORITHMS = ("ferret", "fedavg", "fedkseed", "fedit")


@dataclass
class RunConfig:
    algorithm: str = "ferret"
    # model: "smollm2-135m" (embedded), a hub id, a local directory, a .gguf path, or a
    # LLaMA shape with random weights ("llama-3b-shape", "llama-1.3b-shape", "llama-tiny-shape").
    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    # data: "synthetic", "dolly" (hub), "dolly:<file.jsonl>", "ni:<directory>"
    data: str = "synthetic"
    num_clients: int = 200
    dirichlet_alpha: float = 0.5
    min_client_samples: int = 10
    clients_per_round: float = 0.05
    rounds: int = 12
    local_steps: int = 10
    batch_size: int = 1
    grad_accum: int = 4
    max_length: int = 1024
    lr: float = 1e-4
    optimizer: str = "sgd"
    seed: int = 42
    # Ferret
    server_lr: float = 10.0
    server_lr_decay: float = 1.0
    budget: int = 7800
    distribution: str = "gaussian"
    allocation: str = "norm"
    scale: str = "unbiased"
    coefficient_dtype: str = "float32"
    backend: str = "auto"
    # FedKSeed
    kseed_candidates: int = 4096
    kseed_eps: float = 5e-4
    kseed_lr: float = 3e-7
    # FedIT
    lora_rank: int = 8
    lora_alpha: int = 16
    # evaluation
    eval_every: int = 0
    eval_samples: int = 64
    eval_loss_samples: int = 64
    max_new_tokens: int = 128
    eval_batch_size: int = 8
    output_dir: str = "runs/latest"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> RunConfig:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}; got {self.algorithm!r}")
        for name in ("rounds", "local_steps", "batch_size", "grad_accum", "max_length", "budget"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 < self.clients_per_round:
            raise ValueError(f"clients_per_round must be > 0 (a fraction <= 1 or a count); got {self.clients_per_round}")
        if self.lr <= 0 or self.server_lr <= 0:
            raise ValueError("lr and server_lr must be > 0")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def coerce(name: str, value: Any) -> Any:
    """``value`` converted to the type of field ``name`` (flags arrive as strings)."""
    if name not in FIELDS:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(FIELDS))}")
    default = FIELDS[name].default
    if isinstance(default, bool):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    values: dict[str, Any] = {}
    if path:
        import yaml

        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of settings")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return RunConfig(**{k: coerce(k, v) for k, v in values.items()}).validate()


def as_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
