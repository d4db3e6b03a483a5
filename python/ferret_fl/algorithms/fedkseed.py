"""FedKSeed (Qin et al., ICML 2024): zeroth-order steps along K candidate seeded directions.

Direction z_k (k < K) is basis k of every block of the model under one fixed seed, so
a step is two ``perturb_blocks_`` launches and two forward passes:

    g = (L(w + eps z_k) - L(w - eps z_k)) / (2 eps),   w <- w - lr g z_k

Clients upload the K accumulated scalars G_k (sum of the g's they took along z_k); the
server averages them and every client replays w <- w - lr sum_k G_k z_k over the
directions that were used. The server also keeps the running total of the scalars, the
state a new client needs to rebuild the weights from w_0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

import ferret_kernels as fk

from .base import Algorithm, ClientMessage, Timer, decode_tensors, encode_tensors, micro_batch_loss


class FedKSeed(Algorithm):
    name = "fedkseed"

    def __init__(self, num_candidates: int = 4096, eps: float = 5e-4, lr: float = 3e-7, seed: int = 0,
                 distribution: str = "gaussian", backend: str = "auto", weighting: str = "samples"):
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1; got {num_candidates}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0; got {eps}")
        self.K, self.eps, self.lr, self.seed = num_candidates, eps, lr, seed
        self.distribution, self.backend, self.weighting = distribution, backend, weighting
        self.accumulated = torch.zeros(num_candidates, dtype=torch.float64)

    def _params(self, model) -> tuple[list[torch.nn.Parameter], list[int]]:
        params = self.trainable(model)
        return params, [p.numel() for p in params]

    def _step_along(self, params, sizes, k: int, alpha: float) -> None:
        fk.perturb_blocks_(params, sizes, self.seed, k, alpha, distribution=self.distribution, backend=self.backend)

    @torch.no_grad()
    def client_update(self, model, steps, round_index, client_id) -> ClientMessage:
        timer = Timer()
        params, sizes = self._params(model)
        start = [p.detach().clone() for p in params]
        picker = random.Random(f"fedkseed/{self.seed}/{round_index}/{client_id}")
        scalars = torch.zeros(self.K, dtype=torch.float64)
        losses = []
        model.eval()
        with timer("local"):
            for micro_batches in steps:
                k = picker.randrange(self.K)
                self._step_along(params, sizes, k, self.eps)
                plus = sum(float(micro_batch_loss(model, b)) for b in micro_batches) / len(micro_batches)
                self._step_along(params, sizes, k, -2 * self.eps)
                minus = sum(float(micro_batch_loss(model, b)) for b in micro_batches) / len(micro_batches)
                g = (plus - minus) / (2 * self.eps)
                self._step_along(params, sizes, k, self.eps - self.lr * g)
                scalars[k] += g
                losses.append((plus + minus) / 2)
        with timer("compress"):
            payload = encode_tensors({"scalars": scalars.float()}, {"algorithm": self.name, "round": str(round_index)})
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
        samples = sum(len(b["input_ids"]) for micro in steps for b in micro)
        return ClientMessage(payload, samples, sum(losses) / max(len(losses), 1), timer.seconds)

    def aggregate(self, messages: Sequence[ClientMessage], round_index: int) -> bytes:
        if not messages:
            raise ValueError("no client messages to aggregate")
        weights = [m.num_samples if self.weighting == "samples" else 1 for m in messages]
        mean = torch.zeros(self.K, dtype=torch.float64)
        for m, w in zip(messages, weights, strict=True):
            t, _ = decode_tensors(m.payload, {"algorithm": self.name, "round": str(round_index)})
            scalars = t["scalars"]
            if scalars.shape != (self.K,) or not bool(torch.isfinite(scalars).all()):
                raise ValueError(f"client scalars must be {self.K} finite numbers")
            mean += scalars.double() * (w / sum(weights))
        return encode_tensors({"scalars": mean.float()},
                              {"algorithm": self.name, "round": str(round_index), "kind": "global"})

    @torch.no_grad()
    def apply_(self, model, payload: bytes, round_index: int) -> None:
        t, _ = decode_tensors(payload, {"algorithm": self.name, "round": str(round_index), "kind": "global"})
        scalars = t["scalars"]
        params, sizes = self._params(model)
        for k in torch.nonzero(scalars).flatten().tolist():
            self._step_along(params, sizes, k, -self.lr * float(scalars[k]))
        self.accumulated += scalars.double()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"accumulated": self.accumulated}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"accumulated"} or tensors["accumulated"].shape != (self.K,):
            raise ValueError(f"FedKSeed checkpoint state must be 'accumulated' of shape ({self.K},)")
        self.accumulated = tensors["accumulated"].double()
