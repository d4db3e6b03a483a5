"""FedAvg over full parameters: clients upload their whole update, the server averages.

The baseline Ferret is measured against: the same local SGD, but d numbers up and down
per client and round. Updates are weighted by sample count (or equally).
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


class FedAvg(Algorithm):
    name = "fedavg"

    def __init__(self, local: LocalConfig, server_lr: float = 1.0, weighting: str = "samples"):
        if weighting not in ("samples", "equal"):
            raise ValueError(f"weighting must be 'samples' or 'equal'; got {weighting!r}")
        self.local, self.server_lr, self.weighting = local, server_lr, weighting

    def _names(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def client_update(self, model, steps, round_index, client_id) -> ClientMessage:
        timer = Timer()
        named = self._names(model)
        start = {n: p.detach().clone() for n, p in named}
        with timer("local"):
            loss = local_sgd(model, [p for _, p in named], steps, self.local)
        with timer("compress"):
            delta = {n: start[n] - p.detach() for n, p in named}
            payload = encode_tensors(delta, {"algorithm": self.name, "round": str(round_index)})
        with torch.no_grad():
            for n, p in named:
                p.copy_(start[n])
        samples = sum(len(b["input_ids"]) for micro in steps for b in micro)
        return ClientMessage(payload, samples, loss, timer.seconds)

    def aggregate(self, messages: Sequence[ClientMessage], round_index: int) -> bytes:
        weights = [m.num_samples if self.weighting == "samples" else 1 for m in messages]
        return weighted_mean_payload(messages, weights, self.name, round_index)

    def apply_(self, model, payload: bytes, round_index: int) -> None:
        delta, _ = decode_tensors(payload, {"algorithm": self.name, "round": str(round_index), "kind": "global"})
        named = dict(self._names(model))
        if set(delta) != set(named):
            raise ValueError("global update does not name the model's trainable parameters")
        with torch.no_grad():
            for name, p in named.items():
                updated = p.float() - self.server_lr * delta[name].to(p.device)
                p.copy_(updated.to(p.dtype))
