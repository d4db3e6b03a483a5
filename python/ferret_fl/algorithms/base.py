"""The interface every federated algorithm implements, and the shared local SGD loop.

One round, as the simulation drives it (the model holds the global weights w_r):

    for each sampled client:  msg = algo.client_update(model, steps, round, client)
                              (on return the model holds w_r again)
    global = algo.aggregate(messages, round)      # bytes, what the server sends back
    algo.apply_(model, global, round)             # w_r -> w_{r+1}, as every client replays it

Messages are the exact bytes that would cross the network, so byte counts are measured,
not estimated. Algorithms keep any server state as tensors (for checkpoints).
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class ClientMessage:
    """What one client uploads after a round, plus what the simulation records about it."""

    payload: bytes
    num_samples: int
    train_loss: float
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LocalConfig:
    """Local training settings shared by the first-order algorithms."""

    lr: float = 1e-4
    optimizer: str = "sgd"
    max_grad_norm: float | None = None


class Algorithm:
    """Base class: subclasses set ``name`` and implement the four round methods."""

    name = "base"

    def prepare(self, model):
        """The model the algorithm trains (FedIT wraps it with LoRA adapters)."""
        return model

    def client_update(self, model, steps: Sequence[Sequence[dict]], round_index: int, client_id: int) -> ClientMessage:
        raise NotImplementedError

    def aggregate(self, messages: Sequence[ClientMessage], round_index: int) -> bytes:
        raise NotImplementedError

    def apply_(self, model, payload: bytes, round_index: int) -> None:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{self.name} keeps no server state, but the checkpoint has {sorted(tensors)}")

    def trainable(self, model) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]


def micro_batch_loss(model, batch: dict) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                 labels=batch["labels"].to(device)).loss


def local_sgd(model, params: list[torch.nn.Parameter], steps: Sequence[Sequence[dict]], cfg: LocalConfig) -> float:
    """First-order local training: one optimizer step per entry of ``steps``, gradients
    accumulated over its micro-batches. Returns the mean micro-batch loss."""
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    else:
        raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {cfg.optimizer!r}")
    model.train()
    losses = []
    for micro_batches in steps:
        opt.zero_grad(set_to_none=True)
        for batch in micro_batches:
            loss = micro_batch_loss(model, batch) / len(micro_batches)
            loss.backward()
            losses.append(loss.item() * len(micro_batches))
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(losses) / max(len(losses), 1)


class Timer:
    """Accumulates wall-clock seconds per phase name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] = timer.seconds.get(phase, 0.0) + time.perf_counter() - self.t0

        return _Phase()


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Named tensors and string metadata as safetensors bytes (never pickle)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def weighted_mean_payload(messages: Sequence[ClientMessage], weights: Sequence[float], name: str,
                          round_index: int) -> bytes:
    """The float32 weighted mean, tensor by tensor, of the clients' named tensors, encoded
    as the round's global message. ``weights`` are normalised to sum to 1."""
    if not messages:
        raise ValueError("no client messages to aggregate")
    total = float(sum(weights))
    mean: dict[str, torch.Tensor] = {}
    for m, w in zip(messages, weights, strict=True):
        tensors, _ = decode_tensors(m.payload, {"algorithm": name, "round": str(round_index)})
        if mean and set(tensors) != set(mean):
            raise ValueError(f"round {round_index}: client messages name different tensors")
        for key, t in tensors.items():
            mean.setdefault(key, torch.zeros(t.shape, dtype=torch.float32)).add_(t.float(), alpha=w / total)
    return encode_tensors(mean, {"algorithm": name, "round": str(round_index), "kind": "global"})


def payload_metadata(payload: bytes) -> dict[str, str]:
    """The string metadata in a safetensors payload's JSON header."""
    if len(payload) < 8:
        raise ValueError("message is shorter than a safetensors header")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > len(payload) - 8:
        raise ValueError("message header length exceeds the message: truncated")
    return dict(json.loads(payload[8:8 + n]).get("__metadata__") or {})


def decode_tensors(payload: bytes, expected: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Inverse of ``encode_tensors``; refuses a payload whose metadata differs from ``expected``."""
    from safetensors.torch import load

    if not isinstance(payload, (bytes, bytearray)):
        raise TypeError(f"payload must be bytes; got {type(payload).__name__}")
    try:
        metadata = payload_metadata(bytes(payload))
        tensors = load(bytes(payload))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt message
        raise ValueError(f"message is not a valid safetensors payload ({exc})") from exc
    for key, value in expected.items():
        if metadata.get(key) != value:
            raise ValueError(f"message field {key!r} is {metadata.get(key)!r}, expected {value!r}")
    return tensors, metadata
