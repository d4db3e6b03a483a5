"""The node side of a round: load the cached model, catch up by replay, train, answer.

A ``Node`` is built per message (the deployment engine starts a fresh ClientApp process
for each): it loads the run's model with the weights of its cache (``cache.py``), or
the initial weights when there is none. ``catch_up`` replays the GlobalUpdates the
server sent, in order, from the weights each one starts from, then compares the
result's digest with the server's; only matching weights are saved. ``train`` trains
each requested client from those weights exactly as the in-process simulation does
(same batches, same seeds), so the uploads are the simulation's bytes.
"""

from __future__ import annotations

from .. import attacks
from ..algorithms import Announcement, build_client
from ..config import RunConfig
from ..simulation import client_steps, load_dataset, sample_clients, usable_examples
from . import cache, protocol
from .peer import build_model, weights_digest


class Node:
    """One node's model for one message. round: rounds applied; digest: of the weights."""

    def __init__(self, cfg: RunConfig, cache_path: str, partition_id: int, num_partitions: int,
                 device: str | None = None):
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition-id {partition_id} must be in [0, num-partitions={num_partitions})")
        self.cfg, self.path, self.device = cfg, cache_path, device
        self.partition_id, self.num_partitions = partition_id, num_partitions
        self.model, self.tokenizer = build_model(cfg, device)
        state = cache.load(cache_path, self.model)
        self.round = 0 if state is None else state["round"]
        self.digest = weights_digest(self.model)
        if state is not None and state["digest"] != self.digest:
            self._reset()  # a cache whose weights are not what it says is no cache
        self.client = self._client()

    def _client(self):
        client = build_client(self.cfg, self.model)
        client.use_cache(self.path)
        return client

    def _reset(self) -> None:
        self.model, self.tokenizer = build_model(self.cfg, self.device)
        self.client = self._client()
        self.round, self.digest = 0, weights_digest(self.model)

    def catch_up(self, target: int, replay_from: int, downlinks: list[bytes], expected: str) -> tuple[str, str, int]:
        """Reach the weights after ``target`` rounds by replaying ``downlinks`` (rounds
        replay_from .. target) from the cache. Returns (status, detail, rounds replayed)."""
        if len(downlinks) != target - replay_from + 1:
            return protocol.RESYNC, f"{len(downlinks)} GlobalUpdates for rounds {replay_from}..{target}", 0
        if not replay_from - 1 <= self.round <= target:
            if replay_from != 1:
                return (protocol.RESYNC, f"the cache holds round {self.round}; the replay starts after round "
                        f"{replay_from - 1}", 0)
            self._reset()  # ahead of the server (it resumed from an earlier checkpoint): start over
        replayed = 0
        try:
            for r in range(self.round + 1, target + 1):
                self.client.apply_(self.model, downlinks[r - replay_from], r)
                replayed += 1
        except ValueError as exc:  # MessageError included: e.g. weights not the update's start_digest
            return protocol.MISMATCH, f"replaying round {self.round + replayed + 1} refused: {exc}", replayed
        digest = weights_digest(self.model)
        if digest != expected:
            return (protocol.MISMATCH, f"after replaying to round {target} the weights' digest is {digest}, the "
                    f"server's {expected}", replayed)
        self.round, self.digest = target, digest
        if replayed:
            cache.save(self.path, self.model, self.round, self.digest)
        return protocol.OK, "", replayed

    def train(self, announcement: Announcement, clients: list[int]) -> dict:
        """Train each of ``clients`` from the current weights; their uploads and numbers."""
        from ..data import tokenize_examples

        foreign = [c for c in clients if c % self.num_partitions != self.partition_id]
        if foreign:
            raise ValueError(f"clients {foreign} are not hosted by partition {self.partition_id} of "
                             f"{self.num_partitions}")
        dataset = load_dataset(self.cfg)
        r = announcement.round
        # an experiment's attackers (byzantine_fraction) attack here exactly as in the simulation
        byzantine = attacks.attackers(self.cfg.seed, r, sample_clients(self.cfg, r, dataset.num_clients),
                                      self.cfg.byzantine_fraction)
        out = {protocol.UPLOADS: [], protocol.CLIENT_IDS: [], protocol.NUM_SAMPLES: [], protocol.TRAIN_LOSSES: [],
               protocol.SECONDS_LOCAL: 0.0, protocol.SECONDS_COMPRESS: 0.0}
        for c in clients:
            if not 0 <= c < dataset.num_clients:
                raise ValueError(f"client {c} does not exist: the data has {dataset.num_clients} clients")
            items = tokenize_examples(dataset.clients[c].examples, self.tokenizer, self.cfg.max_length)
            steps = client_steps(self.cfg, items, r, c, self.tokenizer.pad_token_id, self.client)
            msg = self.client.train(self.model, steps, announcement, client_id=c,
                                    num_samples=len(usable_examples(items)))
            if c in byzantine:
                msg.payload = attacks.corrupt(msg.payload, self.client.plan, self.cfg.attack, round_index=r,
                                              seed=self.cfg.seed, client_id=c, dtype=self.cfg.coefficient_dtype)
            out[protocol.UPLOADS].append(msg.payload)
            out[protocol.CLIENT_IDS].append(c)
            out[protocol.NUM_SAMPLES].append(msg.num_samples)
            out[protocol.TRAIN_LOSSES].append(float(msg.train_loss))
            out[protocol.SECONDS_LOCAL] += msg.seconds.get("local", 0.0)
            out[protocol.SECONDS_COMPRESS] += msg.seconds.get("compress", 0.0)
        return out
