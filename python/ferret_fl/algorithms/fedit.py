"""FedIT: FedAvg over LoRA adapters (peft); the base weights stay frozen.

``prepare_model`` wraps the model with LoRA adapters (initialised from the run seed, so
the server and every node start from the same adapters); then clients train only the
adapters and FedAvg's roles do the rest: uploads are adapter updates, the server averages
them (``weighting``) and every peer applies the mean.
"""

from __future__ import annotations

from .base import derived_seed, seeded_torch
from .fedavg import FedAvgClient, FedAvgServer

TARGET_MODULES = ("q_proj", "v_proj")
# The FedIT paper's LoRA dropout.
LORA_DROPOUT = 0.05


class FedITClient(FedAvgClient):
    name = "fedit"

    @classmethod
    def prepare_model(cls, cfg, model):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=LORA_DROPOUT,
                            target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
        device = next(model.parameters()).device
        with seeded_torch(derived_seed(cfg.seed, "lora-init"), device):
            return get_peft_model(model, config)


class FedITServer(FedAvgServer):
    name = "fedit"
