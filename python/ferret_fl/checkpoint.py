"""Run checkpoints: weights and the server role's state in safetensors, the rest in JSON.

A checkpoint directory holds ``state.json`` (the finished round, the run config, and the
names of that round's two tensor files), ``model-<round>.safetensors`` (every parameter of
the global model after the round) and ``server-<round>.safetensors`` (the server role's
``state_dict``: the next round, plus FedKSeed's accumulated per-seed scalars, or Ferret's
Aggregator state with its coefficient momentum when momentum is on).
The metrics are not in the checkpoint: they live in the run's metrics.jsonl, whose rows
after the checkpoint's round a resumed run drops and recomputes.

The tensor files of a round are written first, then ``state.json`` is replaced
atomically to point at them (each file fsynced before its rename), and only then are
older rounds' files and temporaries of killed writers removed: a crash at any moment
leaves a ``state.json`` naming complete files (``tests/crash_resume.py`` kills runs to
prove it). Nothing is pickled.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = "ferret-fl-checkpoint/2"
STATE_FILE = "state.json"


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: str, write) -> None:
    """``write(tmp)``, then rename over ``path``; the data reaches the disk before the
    rename and the rename before return, so a power cut leaves the old or the new file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(os.path.dirname(path) or ".")


def write_bytes(path: str, data: bytes) -> None:
    """``data`` at ``path`` by the same rule as a checkpoint's files (a crash leaves the old or the new)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, write)


def save(directory: str, model: torch.nn.Module, server_state: dict[str, torch.Tensor],
         state: dict[str, Any]) -> None:
    """Write ``model``'s parameters, the server role's tensors and ``state`` (JSON, with an
    int ``round``) to ``directory``; the previous checkpoint stays valid until this one is."""
    os.makedirs(directory, exist_ok=True)
    files = {"model": f"model-{int(state['round']):06d}.safetensors",
             "server": f"server-{int(state['round']):06d}.safetensors"}
    weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in server_state.items()}
    for key, values in (("model", weights), ("server", tensors)):
        _atomic(os.path.join(directory, files[key]), lambda p, v=values: save_file(v, p, metadata={"format": FORMAT}))
    payload = json.dumps({"format": FORMAT, "files": files, **state}, indent=1, sort_keys=True)

    def write_state(path: str) -> None:
        with open(path, "w") as f:
            f.write(payload)

    _atomic(os.path.join(directory, STATE_FILE), write_state)
    for stale in glob.glob(os.path.join(directory, "*.safetensors")) + glob.glob(os.path.join(directory, "*.tmp-*")):
        if os.path.basename(stale) not in files.values():
            os.remove(stale)


def exists(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, STATE_FILE))


def read_state(directory: str) -> dict[str, Any]:
    """``state.json`` of the checkpoint in ``directory`` (format checked)."""
    with open(os.path.join(directory, STATE_FILE)) as f:
        state = json.load(f)
    if state.get("format") != FORMAT:
        raise ValueError(f"{directory}/{STATE_FILE} is not a {FORMAT} checkpoint (format={state.get('format')!r}): "
                         "start the run afresh in a new --output-dir")
    return state


def load(directory: str, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load weights into ``model`` (checked name by name first); return (server state tensors, state)."""
    state = read_state(directory)
    files = state["files"]
    weights = load_file(os.path.join(directory, files["model"]))
    params = dict(model.named_parameters())
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, tensor in weights.items():
        if tensor.shape != params[name].shape or tensor.dtype != params[name].dtype:
            raise ValueError(f"checkpoint tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, the model's is "
                             f"{tuple(params[name].shape)} {params[name].dtype}")
    server = load_file(os.path.join(directory, files["server"]))
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return server, state


def weights(directory: str) -> dict[str, torch.Tensor]:
    """The model weights saved in the checkpoint in ``directory``, by parameter name."""
    return load_file(os.path.join(directory, read_state(directory)["files"]["model"]))
