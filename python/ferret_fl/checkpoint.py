"""Run checkpoints: weights and algorithm tensors in safetensors, the rest in JSON.

A checkpoint directory holds ``model.safetensors`` (the global weights after a round),
``algorithm.safetensors`` (server-side tensors such as FedKSeed's per-seed scalars or
Ferret's coefficient momentum) and ``state.json`` (round, config, metrics so far).
Each is written to a temporary file and renamed into place, and ``state.json`` goes
last, so a crash mid-write leaves the previous checkpoint intact. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "ferret-fl-checkpoint/1"


def _atomic(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save(directory: str, model: torch.nn.Module, algorithm_tensors: dict[str, torch.Tensor],
         state: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    _atomic(os.path.join(directory, "model.safetensors"), lambda p: save_file(weights, p, metadata={"format": FORMAT}))
    tensors = {k: v.detach().contiguous().cpu() for k, v in algorithm_tensors.items()}
    _atomic(os.path.join(directory, "algorithm.safetensors"),
            lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    payload = json.dumps({"format": FORMAT, **state}, indent=1, sort_keys=True)

    def write_state(path: str) -> None:
        with open(path, "w") as f:
            f.write(payload)

    _atomic(os.path.join(directory, "state.json"), write_state)


def exists(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "state.json"))


def load(directory: str, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load weights into ``model`` (checked name by name first); return (algorithm tensors, state)."""
    with open(os.path.join(directory, "state.json")) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{directory}/state.json is not a {FORMAT} checkpoint (format={state.get('format')!r})")
    weights = load_file(os.path.join(directory, "model.safetensors"))
    params = dict(model.named_parameters())
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in weights.items():
        if tensor.shape != params[name].shape or tensor.dtype != params[name].dtype:
            raise ValueError(f"checkpoint tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the model's is "
                             f"{tuple(params[name].shape)} {params[name].dtype}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    algorithm = load_file(os.path.join(directory, "algorithm.safetensors"))
    return algorithm, state
