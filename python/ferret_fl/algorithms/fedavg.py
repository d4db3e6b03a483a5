"""FedAvg over the trainable parameters: clients upload their whole update, the server averages.

The baseline Ferret is measured against: the same local SGD, but d numbers up and down
per client and round. The downlink is the weighted mean update (float32, by number of
examples or equal: ``weighting``) and the server step ``fedavg_server_lr``; every peer
applies w <- w - server_lr * mean. FedIT reuses both roles over LoRA adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    ClientMessage,
    ClientRole,
    ServerRole,
    Timer,
    client_weights,
    decode_tensors,
    decode_upload,
    derived_seed,
    encode_tensors,
    local_sgd,
    seeded_torch,
    trainable,
    upload_metadata,
)


def _global_expected(name: str, round_index: int) -> dict[str, str]:
    return {"algorithm": name, "round": str(round_index), "kind": "global"}


def replay_mean_update(name: str, model: torch.nn.Module, downlink: bytes, round_index: int) -> None:
    """w <- w - server_lr * mean over the trainable parameters, from a FedAvg-style downlink."""
    delta, metadata = decode_tensors(downlink, _global_expected(name, round_index))
    try:
        server_lr = float(metadata.get("server_lr", ""))
    except ValueError:
        raise ValueError(f"{name} downlink has no valid server_lr: the message is corrupted") from None
    named = dict(trainable(model))
    if set(delta) != set(named):
        raise ValueError(f"{name} downlink does not name the model's trainable parameters")
    for n, p in named.items():
        if delta[n].shape != p.shape:
            raise ValueError(f"{name} downlink tensor {n} has shape {tuple(delta[n].shape)}, the model's is "
                             f"{tuple(p.shape)}")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_((p.float() - server_lr * delta[n].to(p.device)).to(p.dtype))


class FedAvgClient(ClientRole):
    name = "fedavg"

    def train(self, model, steps, announcement, *, client_id, num_samples) -> ClientMessage:
        timer = Timer()
        named = trainable(model)
        start = {n: p.detach().clone() for n, p in named}
        device = named[0][1].device
        with timer("local"), seeded_torch(derived_seed(self.cfg.seed, f"local/{announcement.round}/{client_id}"),
                                          device):
            loss = local_sgd(model, [p for _, p in named], steps, optimizer=self.cfg.optimizer, lr=announcement.lr,
                             max_grad_norm=self.cfg.max_grad_norm)
        with timer("compress"):
            delta = {n: start[n] - p.detach() for n, p in named}
            payload = encode_tensors(delta, upload_metadata(self.name, announcement.round, num_samples))
        with torch.no_grad():
            for n, p in named:
                p.copy_(start[n])
        return ClientMessage(payload, num_samples, loss, timer.seconds)

    def apply_(self, model, downlink, round_index) -> None:
        replay_mean_update(self.name, model, downlink, round_index)


class FedAvgServer(ServerRole):
    name = "fedavg"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.server_lr = cfg.fedavg_server_lr
        self.shapes = {n: tuple(p.shape) for n, p in trainable(model)}

    def aggregate(self, round_index: int, uploads: Sequence[bytes], *, client_ids=None, skip_refused=False) -> bytes:
        """Float32 weighted mean, tensor by tensor, of the uploads (in the order given)."""
        self.check_round(round_index)
        decoded = self.admit_each(round_index, uploads, client_ids, skip_refused,
                                  lambda _, payload: self._decode(round_index, payload))
        weights = client_weights([s for _, s in decoded], self.cfg.weighting)
        mean = {n: torch.zeros(s, dtype=torch.float32) for n, s in self.shapes.items()}
        for (tensors, _), w in zip(decoded, weights, strict=True):
            for n, t in tensors.items():
                mean[n].add_(t.float(), alpha=w)
        downlink = encode_tensors(mean, {**_global_expected(self.name, round_index), "server_lr": repr(self.server_lr)})
        self._round += 1
        return downlink

    def _decode(self, round_index: int, payload: bytes) -> tuple[dict[str, torch.Tensor], int]:
        tensors, samples = decode_upload(payload, self.name, round_index)
        if set(tensors) != set(self.shapes):
            raise ValueError(f"round {round_index}: an upload does not name the model's trainable parameters")
        for n, t in tensors.items():
            if tuple(t.shape) != self.shapes[n]:
                raise ValueError(f"round {round_index}: upload tensor {n} has shape {tuple(t.shape)}, expected "
                                 f"{self.shapes[n]}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"round {round_index}: upload tensor {n} is not finite (the client diverged)")
        return tensors, samples

    def apply_(self, model, downlink, round_index) -> None:
        replay_mean_update(self.name, model, downlink, round_index)
