"""FedKSeed (Qin et al., ICML 2024): zeroth-order steps along K candidate seeded directions.

Direction z_k (k < K) is basis k of every block of the model under the announced seed
(the run seed, the same every round), so a step is two ``perturb_blocks_`` launches and
two forward passes:

    g = (L(w + eps z_k) - L(w - eps z_k)) / (2 eps),   w <- w - lr g z_k

Clients upload the K accumulated scalars G_k (sum of the g's they took along z_k); the
server averages them (``weighting``) and every peer replays w <- w - lr sum_k G_k z_k over
the directions that were used, lr travelling with the downlink. The server also keeps
the running total of the scalars, the state a new client needs to rebuild the weights
from w_0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

import ferret_kernels as fk

from .base import (
    Announcement,
    ClientMessage,
    ClientRole,
    ServerRole,
    Timer,
    client_weights,
    decode_tensors,
    decode_upload,
    encode_tensors,
    load_round,
    micro_batch_loss,
    trainable,
    upload_metadata,
)


def _step_along(model, seed: int, k: int, alpha: float, cfg) -> None:
    params = [p for _, p in trainable(model)]
    fk.perturb_blocks_(params, [p.numel() for p in params], seed, k, alpha, distribution=cfg.distribution,
                       backend=cfg.backend)


def _check_scalars(scalars: torch.Tensor, K: int, what: str) -> None:
    if scalars.shape != (K,) or not bool(torch.isfinite(scalars).all()):
        raise ValueError(f"{what} must be {K} finite numbers (kseed_candidates); got shape {tuple(scalars.shape)}")


class FedKSeedClient(ClientRole):
    name = "fedkseed"

    @torch.no_grad()
    def train(self, model, steps, announcement, *, client_id, num_samples) -> ClientMessage:
        cfg, K, eps, lr, seed = self.cfg, self.cfg.kseed_candidates, self.cfg.kseed_eps, announcement.lr, announcement.seed
        timer = Timer()
        params = [p for _, p in trainable(model)]
        start = [p.detach().clone() for p in params]
        picker = random.Random(f"fedkseed/{seed}/{announcement.round}/{client_id}")
        scalars = torch.zeros(K, dtype=torch.float64)
        losses = []
        model.eval()
        with timer("local"):
            for micro_batches in steps:
                k = picker.randrange(K)
                _step_along(model, seed, k, eps, cfg)
                plus = sum(float(micro_batch_loss(model, b)) for b in micro_batches) / len(micro_batches)
                _step_along(model, seed, k, -2 * eps, cfg)
                minus = sum(float(micro_batch_loss(model, b)) for b in micro_batches) / len(micro_batches)
                g = (plus - minus) / (2 * eps)
                _step_along(model, seed, k, eps - lr * g, cfg)
                scalars[k] += g
                losses.append((plus + minus) / 2)
        with timer("compress"):
            payload = encode_tensors({"scalars": scalars.float()},
                                     upload_metadata(self.name, announcement.round, num_samples))
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
        return ClientMessage(payload, num_samples, sum(losses) / max(len(losses), 1), timer.seconds)

    @torch.no_grad()
    def apply_(self, model, downlink, round_index) -> None:
        t, metadata = decode_tensors(downlink, {"algorithm": self.name, "round": str(round_index), "kind": "global"})
        scalars = t.get("scalars")
        if scalars is None:
            raise ValueError("fedkseed downlink has no 'scalars' tensor")
        _check_scalars(scalars, self.cfg.kseed_candidates, "fedkseed downlink scalars")
        try:
            lr, seed = float(metadata["lr"]), int(metadata["seed"])
        except (KeyError, ValueError):
            raise ValueError("fedkseed downlink lacks a valid lr or seed: the message is corrupted") from None
        for k in torch.nonzero(scalars).flatten().tolist():
            _step_along(model, seed, k, -lr * float(scalars[k]), self.cfg)


class FedKSeedServer(ServerRole):
    name = "fedkseed"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.accumulated = torch.zeros(cfg.kseed_candidates, dtype=torch.float64)
        self._replay = FedKSeedClient(cfg, model)

    def announce(self, round_index: int) -> Announcement:
        self.check_round(round_index)
        return Announcement(round_index, self.cfg.seed, self.cfg.kseed_lr)

    def aggregate(self, round_index: int, uploads: Sequence[bytes], *, client_ids=None, skip_refused=False) -> bytes:
        self.check_round(round_index)
        decoded = self.admit_each(round_index, uploads, client_ids, skip_refused,
                                  lambda _, payload: self._decode(round_index, payload))
        weights = client_weights([s for _, s in decoded], self.cfg.weighting)
        mean = torch.zeros(self.cfg.kseed_candidates, dtype=torch.float64)
        for (scalars, _), w in zip(decoded, weights, strict=True):
            mean += scalars.double() * w
        wired = mean.float()
        downlink = encode_tensors({"scalars": wired}, {"algorithm": self.name, "round": str(round_index),
                                                       "kind": "global", "lr": repr(float(self.cfg.kseed_lr)),
                                                       "seed": str(self.cfg.seed)})
        self.accumulated += wired.double()
        self._round += 1
        return downlink

    def _decode(self, round_index: int, payload: bytes) -> tuple[torch.Tensor, int]:
        t, samples = decode_upload(payload, self.name, round_index)
        scalars = t.get("scalars")
        if scalars is None:
            raise ValueError(f"round {round_index}: a fedkseed upload has no 'scalars' tensor")
        _check_scalars(scalars, self.cfg.kseed_candidates, "client scalars")
        return scalars, samples

    def apply_(self, model, downlink, round_index) -> None:
        self._replay.apply_(model, downlink, round_index)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "accumulated": self.accumulated.clone()}

    def load_state_dict(self, state) -> None:
        round_index = load_round(state, self.name, {"accumulated"})
        acc = state["accumulated"]
        if acc.dtype != torch.float64 or acc.shape != (self.cfg.kseed_candidates,):
            raise ValueError(f"fedkseed server state['accumulated'] must be float64 of shape "
                             f"({self.cfg.kseed_candidates},)")
        self._round, self.accumulated = round_index, acc.clone()
