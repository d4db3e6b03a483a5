"""FedPipe (Fang et al., arXiv 2404.06448): an automated federated PEFT pipeline.

Every round, each client, from its resource profile and its own data:

1. plans its configuration (``fedpipe.planner``): examples per step from its speed, then
   base precision (none / int8 / int4), micro-batch and adapter budget from its memory;
2. quantises a training copy of the frozen base to that precision (``fedpipe.quantize``);
3. scores every candidate weight matrix by the rank-r energy of its gradient on its first
   micro-batches and chooses the layers and per-layer ranks that maximise it under its
   budget (``fedpipe.importance``);
4. trains LoRA adapters there (peft), with the run's optimizer, and uploads their factors.

The server averages the clients' updates exactly, as stacked factors, and every peer
merges them into its full-precision weights (``fedpipe.adapters``): the global model
stays a plain model, and the next round's clients choose again from where it is.

Where this follows the paper and where it chooses (the paper's text gives the pipeline's
four stages and an integer program over batch size, ranks and trainable weights; the
formulas here are this project's, each said in its module): importance is the
first-order loss decrease a rank-r step could reach (gradient SVD), rather than a
sensitivity score; the per-client program is solved exactly by enumeration and dynamic
programming; heterogeneous ranks are aggregated by stacking, which is exact, instead of
zero-padding, which is not; quantisation is optimum-quanto's int8 / int4 (the paper
names NormalFloat; NF4 needs bitsandbytes and a GPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence

import torch

from ..fedpipe import adapters, importance, planner, quantize
from ..fedpipe.spec import parse_list, parse_precisions, parse_ranks
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
from .fedit import LORA_DROPOUT  # FedIT's, so that the two adapter methods differ only where FedPipe differs

MEMORY_FILE = "fedpipe-memory.json"


class _Settings:
    """What server and clients both derive from the run config and the model."""

    def __init__(self, cfg, model):
        self.targets = parse_list(cfg.fedpipe_targets, "fedpipe_targets")
        self.layers = importance.candidate_layers(model, self.targets)
        self.shapes = {n: (m.out_features, m.in_features) for n, m in self.layers.items()}
        self.widths = {n: out_f + in_f for n, (out_f, in_f) in self.shapes.items()}  # parameters per rank
        self.ranks = parse_ranks(cfg.fedpipe_ranks)
        self.scaling = cfg.lora_alpha / cfg.lora_rank
        self.max_params = int(cfg.fedpipe_adapter_budget * sum(p.numel() for p in model.parameters()))
        if self.max_params < self.ranks[0] * min(self.widths.values()):
            raise ValueError(f"fedpipe_adapter_budget={cfg.fedpipe_adapter_budget} allows {self.max_params} adapter "
                             "parameters, fewer than the smallest adapter (least rank on the narrowest layer): raise it")


def _global_expected(round_index: int) -> dict[str, str]:
    return {"algorithm": FedPipeServer.name, "round": str(round_index), "kind": "global"}


def replay(settings: _Settings, model: torch.nn.Module, downlink: bytes, round_index: int) -> None:
    """Merge round ``round_index``'s stacked factors into ``model``'s weights."""
    stacked, metadata = decode_tensors(downlink, _global_expected(round_index))
    try:
        lr = float(metadata.get("server_lr", ""))
    except ValueError:
        raise ValueError("fedpipe downlink has no valid server_lr: the message is corrupted") from None
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"fedpipe downlink's server_lr {lr!r} is not a positive finite number")
    adapters.check_stacked(stacked, settings.shapes, f"round {round_index} downlink")
    layers = importance.candidate_layers(model, settings.targets)
    if {n: (m.out_features, m.in_features) for n, m in layers.items()} != settings.shapes:
        raise ValueError("fedpipe downlink: the model's candidate layers are not the run's")
    adapters.merge_(layers, stacked, lr)


class FedPipeClient(ClientRole):
    name = "fedpipe"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.settings = _Settings(cfg, model)
        self.profiles = planner.parse_profiles(cfg.fedpipe_profiles)
        self.precisions = parse_precisions(cfg.fedpipe_precisions)
        self._model = model
        self._memory: planner.MemoryModel | None = None
        self._memory_file: str | None = None
        self._setups: dict[int, planner.ClientSetup] = {}

    def use_cache(self, directory: str) -> None:
        """Keep the memory model in ``directory`` (``MEMORY_FILE``): a Flower deployment starts a
        process per message, and measuring it again costs seconds each time."""
        self._memory_file = os.path.join(directory, MEMORY_FILE)

    def _memory_key(self) -> str:
        """What the memory model depends on: the architecture, the candidate layers, the settings
        that size it, and the torch build that allocates (not the weights' values)."""
        shapes = sorted(self.settings.shapes.items())
        arch = self._model.config.to_json_string(use_diff=False) if hasattr(self._model, "config") else ""
        return json.dumps([torch.__version__, str(self._model.get_input_embeddings().weight.device),
                           hashlib.sha256(arch.encode()).hexdigest(), shapes, self.precisions, self.cfg.optimizer,
                           self.settings.max_params, self.settings.ranks[0]])

    def memory_model(self) -> planner.MemoryModel:
        """The model's memory facts: measured once (one probe per precision) and kept for the
        process, and in the node's cache when ``use_cache`` named one."""
        if self._memory is None and self._memory_file and os.path.isfile(self._memory_file):
            with open(self._memory_file) as f:
                self._memory = planner.memory_model_from_json(f.read(), self._memory_key())
        if self._memory is None:
            self._memory = planner.build_memory_model(
                self._model, self.settings.layers, self.precisions, optimizer=self.cfg.optimizer,
                max_adapter_budget=self.settings.max_params, min_rank=self.settings.ranks[0])
            if self._memory_file:
                os.makedirs(os.path.dirname(self._memory_file), exist_ok=True)
                tmp = f"{self._memory_file}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(planner.memory_model_to_json(self._memory, self._memory_key()))
                os.replace(tmp, self._memory_file)
        return self._memory

    def setup(self, client_id: int, tokens: int) -> planner.ClientSetup:
        """Client ``client_id``'s configuration for micro-batches of up to ``tokens`` tokens."""
        return planner.plan_client(planner.profile_of(self.profiles, client_id), self.memory_model(),
                                   precisions=self.precisions, tokens=tokens,
                                   reference_examples=self.cfg.batch_size * self.cfg.grad_accum)

    def batch_shape(self, client_id, items):
        setup = self.setup(client_id, max(len(it.input_ids) for it in items))
        self._setups[client_id] = setup
        return self.cfg.local_steps, setup.grad_accum, setup.micro_batch

    def train(self, model, steps, announcement, *, client_id, num_samples) -> ClientMessage:
        timer = Timer()
        setup = self._setups.pop(client_id, None) or self.setup(
            client_id, max(int(mb["input_ids"].shape[1]) for step in steps for mb in step))
        with timer("local"):
            with timer("quantize"):
                twin = quantize.quantized_copy(model, setup.precision, self.settings.layers)
            with timer("score"):
                scoring = [mb for step in steps for mb in step][:self.cfg.fedpipe_score_batches]
                layers = importance.candidate_layers(twin, self.settings.targets)
                energy = importance.gradient_energy(twin, scoring, layers, self.settings.ranks)
                chosen = importance.select_adapters(energy, self.settings.widths, self.settings.ranks,
                                                    setup.adapter_budget)
            device = next(twin.parameters()).device
            with seeded_torch(derived_seed(self.cfg.seed, f"lora-init/{announcement.round}/{client_id}"), device):
                peft_model = adapters.attach(twin, chosen, self.settings.scaling, LORA_DROPOUT)
            params = [p for _, p in trainable(peft_model)]
            with seeded_torch(derived_seed(self.cfg.seed, f"local/{announcement.round}/{client_id}"), device):
                loss = local_sgd(peft_model, params, steps, optimizer=self.cfg.optimizer, lr=announcement.lr,
                                 max_grad_norm=self.cfg.max_grad_norm)
        with timer("compress"):
            factors = adapters.adapter_factors(peft_model, chosen)
            metadata = {**upload_metadata(self.name, announcement.round, num_samples), **setup.as_metadata(),
                        "adapter_params": str(sum(r * self.settings.widths[n] for n, r in chosen.items()))}
            payload = encode_tensors(factors, metadata)
        del peft_model, twin
        return ClientMessage(payload, num_samples, loss, timer.seconds)

    def apply_(self, model, downlink, round_index) -> None:
        replay(self.settings, model, downlink, round_index)


class FedPipeServer(ServerRole):
    """Checks each upload's factors (layers, ranks, shapes, the adapter budget), averages the
    clients' updates exactly as stacked factors, weighted by ``weighting``."""

    name = "fedpipe"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.settings = _Settings(cfg, model)
        self.server_lr = cfg.fedavg_server_lr

    def aggregate(self, round_index: int, uploads: Sequence[bytes], *, client_ids=None, skip_refused=False) -> bytes:
        self.check_round(round_index)

        def admit(client_id, payload):
            tensors, samples = decode_upload(payload, self.name, round_index)
            return adapters.check_upload(tensors, self.settings.shapes, self.settings.ranks, self.settings.max_params,
                                         f"round {round_index} upload of client {client_id}"), samples

        decoded = self.admit_each(round_index, uploads, client_ids, skip_refused, admit)
        weights = client_weights([s for _, s in decoded], self.cfg.weighting)
        stacked = adapters.stack([f for f, _ in decoded], weights, self.settings.scaling, list(self.settings.shapes))
        downlink = encode_tensors(stacked, {**_global_expected(round_index), "server_lr": repr(self.server_lr)})
        self._round += 1
        return downlink

    def apply_(self, model, downlink, round_index) -> None:
        replay(self.settings, model, downlink, round_index)
