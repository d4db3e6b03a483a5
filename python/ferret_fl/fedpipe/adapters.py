"""LoRA adapters of different ranks on different layers, and their exact aggregation.

Each client trains adapters (peft LoRA) on the layers and at the ranks it chose
(``importance.select_adapters``), every one with the same scaling s = lora_alpha /
lora_rank (alpha = s * r per layer), so a client's update of layer W is the dense
matrix s * B_i A_i (B_i: out x r_i, A_i: r_i x in), and zero on layers it left out.

Aggregation: the weighted mean of the clients' dense updates, sum_i w_i s B_i A_i, is
itself a product of stacked factors,

    [w_1 s B_1 | w_2 s B_2 | ...]  @  [A_1; A_2; ...]      (out x R) @ (R x in), R = sum r_i

so the server sends the stacked factors (as many numbers as the uploads together), or,
for a layer where R (out + in) > out x in (many clients), that product itself as one dense
float32 matrix, so no layer's downlink grows past FedAvg's; every peer merges them into
its full-precision weights: exactly FedAvg of the clients'
updates, with no rank truncation, no zero-padding and no averaging of A and B apart
(whose product is not the mean of the products). A client that left a layer out counts
as a zero update there, as it would under FedAvg. Merging keeps the model a plain model
(no adapter at inference, FedPipe's "no added latency") and lets the next round's
clients choose afresh.

Merging is bit-reproducible on any device: the product is accumulated in float64 one
rank-1 term at a time in stack order (elementwise multiply, then add: no BLAS reduction
order, no fused multiply-add), scaled by the server lr, added to the float64 weight and
rounded once to the weight's dtype. A dense layer's product is accumulated the same way
on the server and rounded to float32 for the wire; every peer adds those same numbers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

# Tensor name suffixes of an upload (per adapted layer) and of a downlink (per merged layer).
UPLOAD_A, UPLOAD_B = ".lora_A", ".lora_B"
STACK_A, STACK_B, DENSE = ".A", ".B", ".dense"


def attach(model: torch.nn.Module, ranks: Mapping[str, int], scaling: float, dropout: float = 0.0):
    """``model`` (its weights frozen) with a LoRA adapter of rank ``ranks[name]`` on each
    named linear layer, alpha = scaling * rank; peft's init (A random from torch's
    generator, B = 0), so seed the generator first for a reproducible init."""
    from peft import LoraConfig, get_peft_model

    names = list(ranks)
    first = int(ranks[names[0]])
    config = LoraConfig(r=first, lora_alpha=scaling * first, lora_dropout=dropout, target_modules=names,
                        rank_pattern={re.escape(n): int(r) for n, r in ranks.items()},
                        alpha_pattern={re.escape(n): scaling * int(r) for n, r in ranks.items()},
                        bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, config)


def adapter_factors(peft_model, ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The trained factors as upload tensors: ``<layer>.lora_A`` (r x in) and ``<layer>.lora_B``
    (out x r), float32, by the layer's name in the un-wrapped model."""
    out: dict[str, torch.Tensor] = {}
    modules = dict(peft_model.named_modules())
    for name in ranks:
        layer = modules[f"base_model.model.{name}"]
        out[name + UPLOAD_A] = layer.lora_A["default"].weight.detach().float().cpu().contiguous()
        out[name + UPLOAD_B] = layer.lora_B["default"].weight.detach().float().cpu().contiguous()
    return out


def check_upload(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], ranks: Sequence[int],
                 max_params: int, what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) by layer from an upload's tensors, checked: known layers, both factors, ranks
    among ``ranks``, matching shapes, finite, at most ``max_params`` in all. ValueError otherwise."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix in (UPLOAD_A, UPLOAD_B):
            if key.endswith(suffix) and key[:-len(suffix)] in shapes:
                layers.setdefault(key[:-len(suffix)], {})[suffix] = t
                break
        else:
            raise ValueError(f"{what}: tensor {key!r} is not an adapter factor of a candidate layer")
    if not layers:
        raise ValueError(f"{what} holds no adapter")
    out, total = {}, 0
    for name, pair in layers.items():
        if set(pair) != {UPLOAD_A, UPLOAD_B}:
            raise ValueError(f"{what}: layer {name} lacks one of its two factors")
        a, b = pair[UPLOAD_A], pair[UPLOAD_B]
        out_f, in_f = shapes[name]
        r = a.shape[0] if a.dim() == 2 else -1
        if r not in ranks or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise ValueError(f"{what}: layer {name} has factors {tuple(a.shape)} and {tuple(b.shape)}; expected "
                             f"(r, {in_f}) and ({out_f}, r) with r in {list(ranks)}")
        if a.dtype != torch.float32 or b.dtype != torch.float32:
            raise ValueError(f"{what}: layer {name}'s factors must be float32")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"{what}: layer {name}'s factors are not finite (the client diverged)")
        total += r * (in_f + out_f)
        out[name] = (a, b)
    if total > max_params:
        raise ValueError(f"{what}: {total} adapter parameters, more than the {max_params} a client may train")
    return out


def stack(clients: Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]], weights: Sequence[float],
          scaling: float, order: Sequence[str]) -> dict[str, torch.Tensor]:
    """Downlink tensors for every layer of ``order`` some client adapted, clients in the order
    given: ``<layer>.B`` = [w_i s B_i ...] (out x R) and ``<layer>.A`` = [A_i; ...] (R x in),
    or ``<layer>.dense`` = B @ A (out x in, float32) where that has fewer numbers."""
    out: dict[str, torch.Tensor] = {}
    for name in order:
        pairs = [(w, c[name]) for c, w in zip(clients, weights, strict=True) if name in c]
        if not pairs:
            continue
        b = torch.cat([b * float(w * scaling) for w, (_, b) in pairs], 1).contiguous()
        a = torch.cat([a for _, (a, _) in pairs], 0).contiguous()
        if a.shape[0] * (b.shape[0] + a.shape[1]) > b.shape[0] * a.shape[1]:
            out[name + DENSE] = product64(b, a).float()
        else:
            out[name + STACK_B], out[name + STACK_A] = b, a
    return out


def product64(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B @ A in float64, one rank-1 term at a time in stack order (the same bits on any device)."""
    b, a = b.to(torch.float64), a.to(b.device, torch.float64)
    out = torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64, device=b.device)
    for k in range(a.shape[0]):
        out.add_(torch.mul(b[:, k:k + 1], a[k:k + 1, :]))
    return out


def merge_(layers: Mapping[str, torch.nn.Linear], stacked: Mapping[str, torch.Tensor], lr: float) -> None:
    """W <- W + lr * B @ A (or + lr * dense) for every layer of the downlink, reproducibly (module doc)."""
    with torch.no_grad():
        for name, layer in layers.items():
            w = layer.weight
            if name + DENSE in stacked:
                delta = stacked[name + DENSE].to(w.device, torch.float64)
            elif name + STACK_B in stacked:
                delta = product64(stacked[name + STACK_B].to(w.device), stacked[name + STACK_A].to(w.device))
            else:
                continue
            w.copy_(torch.add(w.double(), torch.mul(delta, float(lr))).to(w.dtype))


def check_stacked(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], what: str) -> None:
    """A downlink's layers: known, each either both stacked factors or one dense update,
    matching shapes, finite."""
    dense = {k[:-len(DENSE)] for k in tensors if k.endswith(DENSE)}
    names = {k[:-len(STACK_A)] for k in tensors if k.endswith(STACK_A)} | {
        k[:-len(STACK_B)] for k in tensors if k.endswith(STACK_B)}
    unknown = sorted((names | dense) - set(shapes))
    if unknown or len(tensors) != 2 * len(names) + len(dense):
        raise ValueError(f"{what} names tensors that are not stacked factors or dense updates of candidate layers: "
                         f"{unknown or sorted(tensors)}")
    both = sorted(names & dense)
    if both:
        raise ValueError(f"{what}: layers {both} have both stacked factors and a dense update")
    for name in dense:
        d = tensors[name + DENSE]
        if d.dtype != torch.float32 or tuple(d.shape) != tuple(shapes[name]):
            raise ValueError(f"{what}: layer {name}'s dense update is {d.dtype} {tuple(d.shape)}, not float32 "
                             f"{tuple(shapes[name])}")
        if not bool(torch.isfinite(d).all()):
            raise ValueError(f"{what}: layer {name}'s dense update is not finite")
    for name in names:
        a, b = tensors.get(name + STACK_A), tensors.get(name + STACK_B)
        if a is None or b is None:
            raise ValueError(f"{what}: layer {name} lacks one of its two factors")
        out_f, in_f = shapes[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise ValueError(f"{what}: layer {name} has factors {tuple(b.shape)} @ {tuple(a.shape)}, not "
                             f"({out_f}, R) @ (R, {in_f})")
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(f"{what}: layer {name}'s factors are not finite")
