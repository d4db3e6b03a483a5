"""Each client's configuration from its resources: base precision, micro-batch, adapter budget.

A client profile is (memory in MB, relative speed). Client c has profile c mod n of the
run's ``fedpipe_profiles`` ("MB:SPEED,..."), so every peer knows every client's profile
from the run config alone.

Time. Every client gets the same wall-clock for its local work: the reference device
(speed 1) takes ``local_steps`` optimizer steps of E = batch_size * grad_accum examples;
a client of speed s takes the same number of steps of max(1, round(E * s)) examples, so
a slow client sees fewer examples instead of holding the round up.

Memory. A client's training footprint is modelled as

    base(precision) + activations(micro-batch, tokens) + adapter state(budget)

- base: the candidate linear layers at the precision (``quantize.linear_bytes``,
  measured on one layer of each shape) plus every other parameter and buffer as is;
- activations: the peak of live tensor bytes over one forward and backward of a
  micro-batch, above what was live before: saved activations plus the transients (logits,
  their gradient, dequantised weights), as torch's profiler counts allocations (measured
  once per model and precision by ``activation_profile`` at three sequence lengths, fitted
  by a + b T + c T^2, times the micro-batch);
- adapter state: trainable parameters x (weight + gradient + optimizer moments) bytes.

The choice (an integer program over a small grid, solved by enumeration, so exactly):
among precisions (``fedpipe_precisions``) and micro-batches (divisors of the client's
examples per step, gradient accumulation making up the rest) whose footprint fits,
maximise the adapter budget (capped at ``fedpipe_adapter_budget`` x the model's
parameters); among equal budgets prefer the better precision, then the larger
micro-batch (fewer accumulation passes). So a client quantises only as far as it must to
train the full adapter budget, and trains a smaller one only where even int4 leaves too
little memory. A client whose smallest configuration does not fit is refused with the
memory it would need.

The footprint counts tensor bytes, what torch allocates, and a profile's MB are tensor
memory, not the device's RAM. Measured by ``benchmarks/bench_fedpipe.py`` on SmolLM2-135M
(``FedPipeClient.train`` on one step of one example), the prediction is 10-19% under the
peak of live tensor bytes at 128 tokens and 26-28% under at 745 (the round holds more at
once than one probe pass); the process's peak RSS is 1.3-2.1x the prediction, by what
glibc's allocator keeps after quantising and between passes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import quantize

MB = 2**20
# Bytes per trainable adapter parameter besides its fp32 value and gradient: AdamW's two
# moments (fp32); plain SGD keeps none.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 0}
# Sequence lengths of the activation probe: short enough to run in a second on a CPU,
# three of them to fit the quadratic term eager attention may add.
PROBE_TOKENS = (32, 64, 128)


@dataclass(frozen=True)
class Profile:
    """A client's resources: memory for training (bytes) and speed relative to the reference device."""

    memory_bytes: int
    speed: float


def parse_profiles(spec: str) -> list[Profile]:
    """``"MB:SPEED,MB:SPEED,..."`` -> profiles (client c gets entry c mod len)."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        memory, sep, speed = item.partition(":")
        try:
            profile = Profile(int(float(memory) * MB), float(speed) if sep else 1.0)
        except ValueError:
            raise ValueError(f"fedpipe_profiles entries are MB:SPEED (e.g. 2500:1,900:0.5); got {item!r}") from None
        if profile.memory_bytes <= 0 or not (math.isfinite(profile.speed) and profile.speed > 0):
            raise ValueError(f"fedpipe_profiles entry {item!r}: memory and speed must be > 0")
        out.append(profile)
    if not out:
        raise ValueError("fedpipe_profiles must list at least one MB:SPEED entry")
    return out


def profile_of(profiles: Sequence[Profile], client_id: int) -> Profile:
    return profiles[int(client_id) % len(profiles)]


@dataclass(frozen=True)
class ClientSetup:
    """What a client trains with. adapter_budget: trainable parameters; predicted_bytes: the
    memory model's footprint by part (base, activations, adapters, total)."""

    precision: str
    micro_batch: int
    grad_accum: int
    examples_per_step: int
    adapter_budget: int
    predicted_bytes: dict

    def as_metadata(self) -> dict[str, str]:
        return {f"setup_{k}": str(v) for k, v in asdict(self).items() if k != "predicted_bytes"} | {
            "setup_predicted_bytes": str(self.predicted_bytes["total"])}


@dataclass(frozen=True)
class ActivationProfile:
    """Saved-tensor bytes of one sequence of T tokens: a + b T + c T^2."""

    a: float
    b: float
    c: float

    def bytes(self, tokens: int, micro_batch: int) -> int:
        return int(micro_batch * max(0.0, self.a + self.b * tokens + self.c * tokens * tokens))


def peak_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Peak live tensor bytes, above those live at the start, of one forward and backward of a
    sequence of ``tokens`` tokens through ``model`` (its parameters as they are: a frozen base
    keeps no gradient), from the allocation events of torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    device = model.get_input_embeddings().weight.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ids = torch.full((1, tokens), 1, dtype=torch.long, device=device)
    with profile(activities=activities, profile_memory=True) as prof:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        del embeds
    return profiled_peak(prof, device.type)


def profiled_peak(prof, device_type: str = "cpu") -> int:
    """Peak of live tensor bytes on ``device_type`` ("cpu" or "cuda") over a
    ``torch.profiler.profile(profile_memory=True)`` run, above those live when it began."""
    kind = torch._C._autograd.DeviceType.CUDA if device_type == "cuda" else torch._C._autograd.DeviceType.CPU
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == kind), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def activation_profile(model: torch.nn.Module) -> ActivationProfile:
    """Fit a + b T + c T^2 to ``peak_bytes`` at PROBE_TOKENS tokens. ``model`` as it will
    train: frozen base, quantised or not."""
    was = model.training
    model.train()
    with torch.enable_grad():
        sizes = [peak_bytes(model, t) for t in PROBE_TOKENS]
    model.train(was)
    t = np.array(PROBE_TOKENS, dtype=float)
    a, b, c = np.linalg.solve(np.stack([np.ones_like(t), t, t * t], 1), np.array(sizes, dtype=float))
    return ActivationProfile(float(a), float(b), float(c))


@dataclass
class MemoryModel:
    """The per-precision numbers the planner needs about one model (see the module doc)."""

    base_bytes: dict[str, int]  # precision -> frozen base bytes
    activations: dict[str, ActivationProfile]  # precision -> forward-and-backward peak profile
    adapter_param_bytes: int  # bytes per trainable adapter parameter
    max_adapter_budget: int  # trainable parameters the run allows a client
    min_adapter_cost: int  # parameters of the smallest adapter (least rank on the narrowest layer)

    def footprint(self, precision: str, micro_batch: int, tokens: int, budget: int) -> dict:
        parts = {"base": self.base_bytes[precision],
                 "activations": self.activations[precision].bytes(tokens, micro_batch),
                 "adapters": budget * self.adapter_param_bytes}
        return {**parts, "total": sum(parts.values())}


def build_memory_model(model: torch.nn.Module, layers: Mapping[str, torch.nn.Linear], precisions: Sequence[str], *,
                       optimizer: str, max_adapter_budget: int, min_rank: int) -> MemoryModel:
    """Measure ``model``'s memory facts at each precision (one quantised copy each for the
    activation probe). Deterministic in the model's architecture, not its weights' values."""
    rest = quantize.tensor_bytes(model) - sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    dtype = next(iter(layers.values())).weight.dtype
    base, acts = {}, {}
    for precision in precisions:
        base[precision] = rest + sum(quantize.linear_bytes(m.out_features, m.in_features, precision, dtype)
                                     for m in layers.values())
        twin = quantize.quantized_copy(model, precision, layers)
        for p in twin.parameters():
            p.requires_grad_(False)
        acts[precision] = activation_profile(twin)
        del twin
    return MemoryModel(base, acts, 8 + OPTIMIZER_STATE_BYTES[optimizer], int(max_adapter_budget),
                       min_rank * min(m.in_features + m.out_features for m in layers.values()))


def memory_model_to_json(memory: MemoryModel, key: str) -> str:
    """``memory`` as JSON (an explicit format: it may cross processes and nodes), tagged with
    ``key``, the description of what it was measured for."""
    return json.dumps({"key": key, **asdict(memory)}, sort_keys=True)


def memory_model_from_json(text: str, key: str) -> MemoryModel | None:
    """The MemoryModel saved by ``memory_model_to_json`` for ``key``; None when ``text`` is not
    one, or was measured for something else (then it is measured again)."""
    try:
        data = json.loads(text)
        if data.pop("key") != key:
            return None
        acts = {p: ActivationProfile(**{k: float(v[k]) for k in ("a", "b", "c")})
                for p, v in data.pop("activations").items()}
        ints = {k: int(data[k]) for k in ("adapter_param_bytes", "max_adapter_budget", "min_adapter_cost")}
        return MemoryModel({str(p): int(v) for p, v in data["base_bytes"].items()}, acts, **ints)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def examples_per_step(speed: float, reference_examples: int) -> int:
    return max(1, round(reference_examples * speed))


def plan_client(profile: Profile, memory: MemoryModel, *, precisions: Sequence[str], tokens: int,
                reference_examples: int) -> ClientSetup:
    """The configuration of a client of ``profile`` whose longest micro-batch has ``tokens``
    tokens (module doc: the objective and the tie-breaks). Raises ValueError, with the
    memory the smallest configuration needs, when nothing fits."""
    n = examples_per_step(profile.speed, reference_examples)
    best, best_key = None, None
    for rank_p, precision in enumerate(precisions):
        for b in [d for d in range(n, 0, -1) if n % d == 0]:
            fixed = memory.footprint(precision, b, tokens, 0)["total"]
            budget = min(memory.max_adapter_budget, (profile.memory_bytes - fixed) // memory.adapter_param_bytes)
            if budget < memory.min_adapter_cost:
                continue
            key = (budget, -rank_p, b)
            if best_key is None or key > best_key:
                best_key = key
                best = ClientSetup(precision, b, n // b, n, int(budget),
                                   memory.footprint(precision, b, tokens, int(budget)))
    if best is None:
        need = min(memory.footprint(p, 1, tokens, memory.min_adapter_cost)["total"] for p in precisions)
        raise ValueError(f"a client with {profile.memory_bytes / MB:.0f} MB cannot train even the smallest adapter "
                         f"({memory.min_adapter_cost} parameters) at {tokens} tokens with precisions {list(precisions)}: "
                         f"it needs {need / MB:.0f} MB; raise its memory in fedpipe_profiles or lower max_length"
                         + ("" if "int4" in precisions else ", or allow int4 in fedpipe_precisions"))
    return best
