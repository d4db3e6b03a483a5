"""Ferret (Shu et al., ICML 2025) on the ferret_kernels API.

Clients take ordinary first-order steps, then send K seeded-projection coefficients of
their update (one ``project_blocks`` launch) under the seed the server announced; the
server merges the round's coefficients in one ``Aggregator`` kept for the whole run (so
momentum, clipping and the fixed seed pool carry across rounds), and every peer replays
the merged ``GlobalUpdate`` to reach the new global weights (one ``reconstruct_blocks_``
launch). The server learning rate may decay geometrically per round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ferret_kernels import Aggregator, FerretPlan, MessageError, wire

from .base import (
    Announcement,
    ClientMessage,
    ClientRole,
    ServerRole,
    Timer,
    derived_seed,
    local_sgd,
    seeded_torch,
)


def build_plan(cfg, model) -> FerretPlan:
    """The plan every peer builds from the run config and its copy of the model."""
    return FerretPlan.from_model(model, cfg.budget, distribution=cfg.distribution, allocation=cfg.allocation,
                                 scale=cfg.scale, backend=cfg.backend)


class FerretClient(ClientRole):
    name = "ferret"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.plan = build_plan(cfg, model)

    def train(self, model, steps, announcement, *, client_id, num_samples) -> ClientMessage:
        timer = Timer()
        params = self.plan.parameters(model)
        with timer("local"):
            cr = self.plan.client_round(model, round=announcement.round, seed=announcement.seed,
                                        num_samples=num_samples).begin()
            try:
                with seeded_torch(derived_seed(self.cfg.seed, f"local/{announcement.round}/{client_id}"),
                                  params[0].device):
                    loss = local_sgd(model, params, steps, optimizer=self.cfg.optimizer, lr=announcement.lr,
                                     max_grad_norm=self.cfg.max_grad_norm)
            except BaseException:
                cr.discard()
                raise
        with timer("compress"):
            update = cr.compress()
            payload = wire.encode_client_update(update, dtype=self.cfg.coefficient_dtype)
        return ClientMessage(payload, num_samples, loss, timer.seconds)

    def apply_(self, model, downlink, round_index) -> None:
        wire.decode_global_update(downlink, self.plan, round=round_index).apply_(model)


class FerretServer(ServerRole):
    """Ferret's server: one ``Aggregator`` for the run. ``last_update`` is the GlobalUpdate
    of the latest aggregated round (what ``apply_`` checks the downlink against)."""

    name = "ferret"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.plan = build_plan(cfg, model)
        self.model = model
        self.aggregator = self._new_aggregator()
        self.last_update = None

    def _new_aggregator(self) -> Aggregator:
        cfg = self.cfg
        return Aggregator(self.plan, round=1, base_seed=cfg.seed, seed_schedule=cfg.seed_schedule,
                          weighting=cfg.weighting, server_lr=cfg.server_lr, momentum=cfg.server_momentum,
                          clip_norm=cfg.clip_norm, clip=cfg.clip, wire_dtype=wire.DTYPES[cfg.coefficient_dtype],
                          max_step=cfg.max_step, influence_cap=cfg.influence_cap, sample_cap=cfg.sample_cap,
                          aggregation=cfg.aggregation, trim_fraction=cfg.trim_fraction, norm_bound=cfg.norm_bound)

    @property
    def round(self) -> int:
        return self.aggregator.round

    def server_lr(self, round_index: int) -> float:
        return self.cfg.server_lr * self.cfg.server_lr_decay ** (round_index - 1)

    def announce(self, round_index: int) -> Announcement:
        self.check_round(round_index)
        return Announcement(round_index, self.aggregator.seed, self.cfg.lr)

    def aggregate(self, round_index: int, uploads: Sequence[bytes], *, client_ids=None, skip_refused=False) -> bytes:
        """The merged GlobalUpdate's bytes; it names the server model's weights (which are
        the round's starting weights until ``apply_``) as its start_digest, so a peer
        holding other weights refuses it."""
        self.check_round(round_index)

        def admit(client_id, payload):
            try:
                update = wire.decode_client_update(payload, self.plan, round=round_index)
            except MessageError as exc:
                self.aggregator.record_refusal(exc, client_id=client_id)
                raise
            self.aggregator.add(update, client_id=client_id)

        before = self.state_dict()
        try:
            self.admit_each(round_index, uploads, client_ids, skip_refused, admit)
            update = self.aggregator.aggregate(server_lr=self.server_lr(round_index),
                                               start_digest=self.plan.digest(self.model))
            downlink = wire.encode_global_update(update, dtype=self.cfg.coefficient_dtype)
        except BaseException:
            # a refused round leaves the server as it was, so the round can be retried
            self.aggregator = self._new_aggregator()
            self.load_state_dict(before)
            raise
        self.last_update = update
        self.refusals = list(self.aggregator.last_report["refusals"])
        return downlink

    def apply_(self, model, downlink, round_index) -> None:
        """Replay the downlink as a client does, after checking it carries exactly what
        the server aggregated (the condition for every replica to reach the same bits)."""
        replay = wire.decode_global_update(downlink, self.plan, round=round_index)
        server = self.last_update
        if server is not None and server.round == round_index:
            same = (replay.seeds == server.seeds and replay.counts == server.counts
                    and replay.server_lr == server.server_lr
                    and all(torch.equal(a, b) for a, b in zip(replay.coefficients, server.coefficients, strict=True)))
            if not same:
                raise RuntimeError(f"round {round_index}: the encoded GlobalUpdate differs from what the server "
                                   "aggregated; clients would diverge from the server")
        replay.apply_(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.aggregator.state_dict()

    def load_state_dict(self, state) -> None:
        self.aggregator.load_state_dict(state)
