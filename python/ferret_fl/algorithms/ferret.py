"""Ferret (Shu et al., ICML 2025) on the ferret_kernels API.

Clients take ordinary first-order steps, then send K seeded-projection coefficients of
their update (one ``project_blocks`` launch); the server merges the coefficients of
the round (all clients share the round's seed) and every client replays the merged
``GlobalUpdate`` to reach the new global weights (one ``reconstruct_blocks_`` launch).
The server learning rate may decay geometrically per round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ferret_kernels import Aggregator, FerretPlan, round_seed, wire

from .base import Algorithm, ClientMessage, LocalConfig, Timer, local_sgd

_WIRE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class Ferret(Algorithm):
    name = "ferret"

    def __init__(self, model, local: LocalConfig, *, budget: int, server_lr: float, server_lr_decay: float = 1.0,
                 distribution: str = "gaussian", allocation: str = "norm", scale: str = "unbiased",
                 coefficient_dtype: str = "float32", backend: str = "auto", seed: int = 0):
        if coefficient_dtype not in _WIRE_DTYPES:
            raise ValueError(f"coefficient_dtype must be one of {sorted(_WIRE_DTYPES)}; got {coefficient_dtype!r}")
        self.local = local
        self.plan = FerretPlan.from_model(model, budget, distribution=distribution, allocation=allocation,
                                          scale=scale, backend=backend)
        self.server_lr, self.server_lr_decay = server_lr, server_lr_decay
        self.wire_dtype = _WIRE_DTYPES[coefficient_dtype]
        self.base_seed = seed
        self._server_update = None

    def seed_for(self, round_index: int) -> int:
        return round_seed(self.base_seed, round_index)

    def client_update(self, model, steps, round_index, client_id) -> ClientMessage:
        timer = Timer()
        samples = sum(len(b["input_ids"]) for micro in steps for b in micro)
        with timer("local"):
            cr = self.plan.client_round(model, round=round_index, seed=self.seed_for(round_index),
                                        num_samples=samples).begin()
            try:
                loss = local_sgd(model, self.plan.parameters(model), steps, self.local)
            except BaseException:
                cr.discard()
                raise
        with timer("compress"):
            update = cr.compress()
            payload = wire.encode_client_update(update, dtype=self.wire_dtype)
        return ClientMessage(payload, samples, loss, timer.seconds)

    def aggregate(self, messages: Sequence[ClientMessage], round_index: int) -> bytes:
        slr = self.server_lr * self.server_lr_decay ** (round_index - 1)
        agg = Aggregator(self.plan, round=round_index, base_seed=self.base_seed, server_lr=slr,
                         wire_dtype=self.wire_dtype)
        for m in messages:
            agg.add(wire.decode_client_update(m.payload, self.plan, round=round_index))
        self._server_update = agg.aggregate()
        return wire.encode_global_update(self._server_update, dtype=self.wire_dtype)

    def apply_(self, model, payload: bytes, round_index: int) -> None:
        """Replay the downlink as a client does, after checking it carries exactly what
        the server aggregated (the condition for every replica to reach the same bits)."""
        replay = wire.decode_global_update(payload, self.plan, round=round_index)
        server = self._server_update
        if server is not None and server.round == round_index:
            same = (replay.seeds == server.seeds and replay.counts == server.counts
                    and replay.server_lr == server.server_lr
                    and all(torch.equal(a, b) for a, b in zip(replay.coefficients, server.coefficients, strict=True)))
            if not same:
                raise RuntimeError(f"round {round_index}: the encoded GlobalUpdate differs from what the server "
                                   "aggregated; clients would diverge from the server")
        replay.apply_(model)
