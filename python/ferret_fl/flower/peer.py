"""What the server and every node build the same way: the model and its weight digest."""

from __future__ import annotations

import torch

from ..algorithms import prepare_model
from ..config import RunConfig
from ..models import load_causal_lm


def build_model(cfg: RunConfig, device: str | None = None) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer): ``cfg.model``'s initial weights, prepared for ``cfg.algorithm``,
    on ``device`` (default ``cfg.device``); the same bits in every process."""
    model, tokenizer = load_causal_lm(cfg.model, cfg.dtype, device or cfg.device, seed=cfg.seed)
    return prepare_model(cfg, model), tokenizer


def weights_digest(model: torch.nn.Module) -> str:
    """``ferret_kernels`` digest (xxh3-128) of every parameter in model order: what a node
    proves its weights with, and what the server records after each round."""
    from ferret_kernels.digest import tensors_digest

    return tensors_digest([p.detach() for _, p in model.named_parameters()])
