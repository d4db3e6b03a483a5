"""The frozen base in lower precision, per client: optimum-quanto int8 / int4 weights.

A client that cannot hold the base model in its own dtype trains its adapters over a
quantised copy of the candidate linear layers (QLoRA's idea): the weights it keeps
frozen are int8 (per output row scale) or int4 (groups of <= 128 inputs with scale and
shift), dequantised on the fly in each forward; adapters, activations, embeddings and
norms stay in the model's dtype. optimum-quanto runs on the CPU and on CUDA alike
(torchao's int4 and bitsandbytes need a GPU); its ``QLinear`` is an ``nn.Linear``, so
peft's LoRA wraps it like any linear layer.

The quantised copy is for training only: every peer keeps the weights in full
precision, because the downlink's update must land on exactly the server's weights.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable

import torch

# Precisions a client's frozen base may take, best first ("none": the model's own dtype).
PRECISIONS = ("none", "int8", "int4")


def _qtype(precision: str):
    try:
        from optimum import quanto
    except ImportError as exc:
        raise ImportError(f"a {precision} frozen base needs optimum-quanto: pip install optimum-quanto "
                          "(the project's `fedpipe` extra), or leave it out of fedpipe_precisions") from exc
    return {"int8": quanto.qint8, "int4": quanto.qint4}[precision]


def check_precisions(precisions: Iterable[str]) -> tuple[str, ...]:
    out = tuple(precisions)
    bad = [p for p in out if p not in PRECISIONS]
    if not out or bad or len(set(out)) != len(out):
        raise ValueError(f"fedpipe_precisions must be distinct entries of {list(PRECISIONS)}; got {list(out)}")
    return out


def quantized_copy(model: torch.nn.Module, precision: str, layer_names: Iterable[str]) -> torch.nn.Module:
    """A copy of ``model`` whose layers ``layer_names`` hold ``precision`` weights (frozen);
    ``precision="none"`` is a plain deep copy. The original is not touched, and the copy never
    holds those layers in full precision (each is quantised from the original's weight), so
    making it costs the quantised size, not a second full-precision model."""
    if precision == "none":
        return copy.deepcopy(model)
    from optimum.quanto.nn import quantize_module

    qtype = _qtype(precision)
    originals = {name: model.get_submodule(name) for name in layer_names}
    twin = copy.deepcopy(model, {id(layer.weight): None for layer in originals.values()})
    for name, layer in originals.items():
        qlayer = quantize_module(layer, weights=qtype)
        if layer.bias is not None:
            qlayer.bias = torch.nn.Parameter(layer.bias.detach().clone())  # not shared with the original
        qlayer.freeze()
        qlayer.name = name
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, qlayer)
    return twin


def add_storages(t: torch.Tensor, seen: dict[int, int]) -> None:
    """Record in ``seen`` (address -> bytes) the storages behind ``t``; a quantised tensor
    by the storages of its parts (int data, scales, shifts)."""
    if isinstance(t, torch.nn.Parameter):
        t = t.data
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            add_storages(getattr(t, name), seen)
        return
    storage = t.untyped_storage()
    seen[storage.data_ptr()] = storage.nbytes()


def storage_sizes(module: torch.nn.Module) -> dict[int, int]:
    """Bytes of each storage behind a module's parameters and buffers, by address."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        add_storages(t, seen)
    return seen


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, shared storages counted once."""
    return sum(storage_sizes(module).values())


@functools.lru_cache(maxsize=64)
def linear_bytes(out_features: int, in_features: int, precision: str, dtype: torch.dtype) -> int:
    """Bytes one bias-free linear layer of this shape holds at ``precision``, measured by
    quantising one (quanto's layout decides the scales' count, so it is not modelled)."""
    layer = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
    if precision == "none":
        return tensor_bytes(layer)
    from optimum.quanto import freeze, quantize

    holder = torch.nn.Sequential(layer)
    quantize(holder, weights=_qtype(precision))
    freeze(holder)
    return tensor_bytes(holder)
