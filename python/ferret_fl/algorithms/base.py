"""The two roles every federated algorithm implements, and what they share.

An algorithm is a ``ServerRole`` and a ``ClientRole``. One round, as the simulation (and
a Flower ServerApp/ClientApp pair) drives them, with the model holding the global
weights w_r everywhere:

    announcement = server.announce(r)                       # round, seed, lr: to every client
    for each sampled client:                                # (one ClientApp process each)
        msg = client.train(model, steps, announcement, client_id=c, num_samples=n_c)
                                                            # model holds w_r again on return
    downlink = server.aggregate(r, [msg.payload, ...])      # bytes in, bytes out
    server.apply_(model, downlink, r)                       # w_r -> w_{r+1}
    client.apply_(model, downlink, r)                       # on every node: the same w_{r+1}

A client role is built from the run config and a node-local model alone (the deployment
engine starts a fresh ClientApp process per message), holds no state between rounds, and
learns everything round-specific from the ``Announcement``. A server role keeps the
round state, which ``state_dict`` returns as tensors (checkpoints are safetensors, never
pickle). Uploads and downlinks are the exact bytes that cross the network, so byte counts
are measured, not estimated; every upload carries its own sample count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..config import OPTIMIZERS, RunConfig
from ..models import response_loss

UINT64 = 2**64


@dataclass(frozen=True)
class Announcement:
    """What the server tells the clients of a round before they train.

    round: the round number (>= 1 in the simulation). seed: the uint64 seed of the round's
    shared randomness (Ferret's bases, FedKSeed's candidate directions). lr: the learning
    rate clients train with this round.
    """

    round: int
    seed: int
    lr: float

    def __post_init__(self):
        for name, high in (("round", 2**63), ("seed", UINT64)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < high:
                raise ValueError(f"Announcement.{name} must be an int in [0, {high}); got {value!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr)
                                                                                        and self.lr > 0):
            raise ValueError(f"Announcement.lr must be a positive finite number; got {self.lr!r}")

    def as_config(self) -> dict[str, int | float]:
        """Plain values (ints, a float) for a message's config record."""
        return {"round": self.round, "seed": self.seed, "lr": float(self.lr)}

    @classmethod
    def from_config(cls, values) -> Announcement:
        """Inverse of ``as_config`` (checked: a malformed record raises ValueError)."""
        missing = {"round", "seed", "lr"} - set(values)
        if missing:
            raise ValueError(f"announcement lacks {sorted(missing)}")
        return cls(int(values["round"]), int(values["seed"]), float(values["lr"]))


@dataclass
class ClientMessage:
    """What one client returns after a round: the upload and what the run records about it.

    payload: the bytes sent to the server (they carry the sample count the server weights
    by). num_samples: the client's number of training examples. train_loss: mean local
    loss. seconds: wall-clock per phase ("local", "compress").
    """

    payload: bytes
    num_samples: int
    train_loss: float
    seconds: dict[str, float] = field(default_factory=dict)


class ClientRole:
    """A client of one algorithm. Subclasses set ``name`` and implement ``train`` and ``apply_``."""

    name = "base"

    def __init__(self, cfg: RunConfig, model: torch.nn.Module):
        self.cfg = cfg

    @classmethod
    def prepare_model(cls, cfg: RunConfig, model: torch.nn.Module) -> torch.nn.Module:
        """The model this algorithm trains, made from the loaded one on every peer (server
        and nodes) before any role is built; deterministic in ``cfg``."""
        return model

    def use_cache(self, directory: str) -> None:
        """Where the role may keep what it derives from the model alone (not the weights'
        values) across processes: a Flower node's cache directory. Default: nothing kept."""

    def batch_shape(self, client_id: int, items: Sequence) -> tuple[int, int, int]:
        """(optimizer steps, micro-batches per step, examples per micro-batch) client
        ``client_id`` trains with, given its usable tokenized examples ``items``: the run's
        (local_steps, grad_accum, batch_size) unless the algorithm fits them to the client."""
        return self.cfg.local_steps, self.cfg.grad_accum, self.cfg.batch_size

    def train(self, model: torch.nn.Module, steps: Sequence[Sequence[dict]], announcement: Announcement, *,
              client_id: int, num_samples: int) -> ClientMessage:
        """Train from the weights ``model`` holds on ``steps`` (optimizer steps of micro-batches),
        return the upload; ``model`` holds its starting weights again on return."""
        raise NotImplementedError

    def apply_(self, model: torch.nn.Module, downlink: bytes, round_index: int) -> None:
        """Replay round ``round_index``'s downlink: w_r -> w_{r+1} in place."""
        raise NotImplementedError


class ServerRole:
    """The server of one algorithm. ``round`` is the next round to announce and aggregate
    (rounds run in order); subclasses implement ``aggregate`` and ``apply_``."""

    name = "base"

    def __init__(self, cfg: RunConfig, model: torch.nn.Module):
        self.cfg = cfg
        self._round = 1
        self.refusals: list[dict] = []

    @property
    def round(self) -> int:
        return self._round

    def check_round(self, round_index: int) -> None:
        if round_index != self.round:
            raise ValueError(f"{self.name} server: round {round_index} requested but the server is at round "
                             f"{self.round} (rounds run in order; resume from a checkpoint to start elsewhere)")

    def announce(self, round_index: int) -> Announcement:
        self.check_round(round_index)
        return Announcement(round_index, self.cfg.seed, self.cfg.lr)

    def aggregate(self, round_index: int, uploads: Sequence[bytes], *, client_ids: Sequence | None = None,
                  skip_refused: bool = False) -> bytes:
        """The round's downlink from its clients' uploads; advances ``round``.

        client_ids: who sent each upload (default: its position), for refusal records.
        skip_refused: refuse a bad upload alone - record it in ``refusals`` (dicts of
        round, client_id, reason, detail) and go on with the others, as a deployment
        must - instead of raising (the simulation, whose uploads all come from itself).
        Raises ValueError when no upload is accepted; the server is then unchanged."""
        raise NotImplementedError

    def admit_each(self, round_index: int, uploads: Sequence[bytes], client_ids: Sequence | None,
                   skip_refused: bool, admit: Callable[[object, bytes], object]) -> list:
        """``admit(client_id, payload)`` of every upload, in order; with ``skip_refused`` a
        ValueError (MessageError included) refuses that upload only and is recorded in
        ``refusals``. Raises ValueError when nothing is admitted."""
        ids = list(range(len(uploads))) if client_ids is None else list(client_ids)
        if len(ids) != len(uploads):
            raise ValueError(f"client_ids has {len(ids)} entries for {len(uploads)} uploads")
        self.refusals = []
        admitted = []
        for client_id, payload in zip(ids, uploads, strict=True):
            try:
                admitted.append(admit(client_id, payload))
            except ValueError as exc:
                if not skip_refused:
                    raise
                self.refusals.append(refusal(round_index, client_id, exc))
        if not admitted:
            reasons = "; ".join(f"client {r['client_id']}: {r['detail']}" for r in self.refusals)
            raise ValueError(f"no client uploads to aggregate in round {round_index}" + (f" ({reasons})" if reasons else ""))
        return admitted

    def apply_(self, model: torch.nn.Module, downlink: bytes, round_index: int) -> None:
        """Apply the downlink to the server's model exactly as every client replays it."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The round state as tensors (safetensors-ready)."""
        return {"round": torch.tensor(self.round, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict`` output; checked first, nothing changes on a bad dict."""
        self._round = load_round(state, self.name, set())


def refusal(round_index: int, client_id, exc: ValueError) -> dict:
    """A refused upload as ``ServerRole.refusals`` lists it (the library's record shape)."""
    return {"round": round_index, "client_id": client_id, "reason": getattr(exc, "reason", "invalid"),
            "detail": str(exc)}


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the parameters an algorithm trains, in model order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def load_round(state: dict[str, torch.Tensor], name: str, others: set[str]) -> int:
    """The ``round`` entry of a server state dict whose other keys must be ``others``."""
    if not isinstance(state, dict) or set(state) != {"round"} | others:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{name} server state must have keys {sorted({'round'} | others)}; got {got}")
    r = state["round"]
    if not isinstance(r, torch.Tensor) or r.dtype != torch.int64 or r.dim() != 0 or int(r) < 0:
        raise ValueError(f"{name} server state['round'] must be a 0-d int64 tensor >= 0")
    return int(r)


def derived_seed(seed: int, name: str) -> int:
    """A 63-bit torch seed determined by (seed, name) in any process (sha256, not ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"ferret-fl/{seed}/{name}".encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded_torch(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with torch's generators (CPU, and ``device``'s if CUDA) seeded, then
    restore them: dropout and random inits come out the same in every process."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def micro_batch_loss(model, batch: dict) -> torch.Tensor:
    return response_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def local_sgd(model, params: list[torch.nn.Parameter], steps: Sequence[Sequence[dict]], *, optimizer: str, lr: float,
              max_grad_norm: float | None = None) -> float:
    """First-order local training: one optimizer step per entry of ``steps``, gradients
    accumulated over its micro-batches (clipped to ``max_grad_norm`` when given).
    Returns the mean micro-batch loss."""
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {optimizer!r}")
    model.train()
    losses = []
    for micro_batches in steps:
        opt.zero_grad(set_to_none=True)
        for batch in micro_batches:
            loss = micro_batch_loss(model, batch) / len(micro_batches)
            loss.backward()
            losses.append(loss.item() * len(micro_batches))
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(losses) / max(len(losses), 1)


class Timer:
    """Accumulates wall-clock seconds per phase name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


def encode_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Named tensors and string metadata as safetensors bytes (never pickle)."""
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


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


def upload_metadata(name: str, round_index: int, num_samples: int) -> dict[str, str]:
    """Metadata of a client upload of algorithm ``name`` (the baselines' safetensors messages)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1 (the client's number of examples); got {num_samples!r}")
    return {"algorithm": name, "round": str(round_index), "kind": "client", "num_samples": str(num_samples)}


def decode_upload(payload: bytes, name: str, round_index: int) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors, num_samples) of a client upload made with ``upload_metadata``."""
    tensors, metadata = decode_tensors(payload, {"algorithm": name, "round": str(round_index), "kind": "client"})
    samples = metadata.get("num_samples", "")
    if not samples.isdigit() or int(samples) < 1:
        raise ValueError(f"message field 'num_samples' is {samples!r}, expected an integer >= 1")
    return tensors, int(samples)


def client_weights(samples: Sequence[int], weighting: str) -> list[float]:
    """Per-client weights summing to 1: by number of examples, or equal."""
    if not samples:
        raise ValueError("no client uploads to aggregate")
    raw = [float(s) if weighting == "samples" else 1.0 for s in samples]
    total = sum(raw)
    return [w / total for w in raw]
