"""FedIT: FedAvg over LoRA adapters (peft); the base weights stay frozen.

Clients train only the adapters and upload them; the server averages adapter weights
(by sample count) and sends the average back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    Algorithm,
    ClientMessage,
    LocalConfig,
    Timer,
    decode_tensors,
    encode_tensors,
    local_sgd,
    weighted_mean_payload,
)

DEFAULT_TARGETS = ("q_proj", "v_proj")


class FedIT(Algorithm):
    name = "fedit"

    def __init__(self, local: LocalConfig, rank: int = 8, alpha: int = 16, dropout: float = 0.05,
                 target_modules: Sequence[str] = DEFAULT_TARGETS):
        self.local, self.rank, self.alpha, self.dropout = local, rank, alpha, dropout
        self.target_modules = list(target_modules)

    def prepare(self, model):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=self.target_modules, task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def _adapters(self, model) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def client_update(self, model, steps, round_index, client_id) -> ClientMessage:
        timer = Timer()
        adapters = self._adapters(model)
        start = {n: p.detach().clone() for n, p in adapters.items()}
        with timer("local"):
            loss = local_sgd(model, list(adapters.values()), steps, self.local)
        with timer("compress"):
            payload = encode_tensors({n: p.detach() for n, p in adapters.items()},
                                     {"algorithm": self.name, "round": str(round_index)})
        with torch.no_grad():
            for n, p in adapters.items():
                p.copy_(start[n])
        samples = sum(len(b["input_ids"]) for micro in steps for b in micro)
        return ClientMessage(payload, samples, loss, timer.seconds)

    def aggregate(self, messages: Sequence[ClientMessage], round_index: int) -> bytes:
        return weighted_mean_payload(messages, [m.num_samples for m in messages], self.name, round_index)

    def apply_(self, model, payload: bytes, round_index: int) -> None:
        mean, _ = decode_tensors(payload, {"algorithm": self.name, "round": str(round_index), "kind": "global"})
        adapters = self._adapters(model)
        if set(mean) != set(adapters):
            raise ValueError("global adapters do not match the model's LoRA parameters")
        with torch.no_grad():
            for name, p in adapters.items():
                p.copy_(mean[name].to(p.device, p.dtype))
