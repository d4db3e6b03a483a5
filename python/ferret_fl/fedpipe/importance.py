"""Which weight matrices get an adapter, and of what rank: importance from the gradient.

The measure. For a weight matrix W (out x in) with loss gradient G = dL/dW on a
micro-batch, one gradient step restricted to a rank-r subspace lowers the loss, to
first order, by at most lr * E(r) with

    E(r) = sigma_1(G)^2 + ... + sigma_r(G)^2       (the rank-r gradient energy)

(Eckart-Young: the best rank-r approximation of G keeps its top r singular values).
So E(r) says how much a rank-r adapter on W can do, and E(r) - E(r') what raising the
rank from r' to r adds; ``gradient_energy`` measures it on a few micro-batches and
averages over them.

The choice. A rank-r adapter on W costs r * (out + in) trainable parameters. Choosing a
rank for every candidate matrix (0: no adapter) to maximise the summed energy under a
parameter budget is a multiple-choice knapsack, solved exactly by dynamic programming
in ``select_adapters`` (costs in units of the gcd of the matrices' out + in).

How G is had without storing it: forward hooks keep each candidate layer's input,
backward hooks its output gradient; G = grad_out^T x is formed one layer at a time,
reduced to its singular values at once and dropped, so the extra memory is one matrix,
not a second copy of the model. No parameter needs a gradient: the embedding output is
made to require one so that the backward pass reaches every layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def candidate_layers(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """Linear layers of ``model`` whose name ends in one of ``targets`` (e.g. ``q_proj``), by
    full module name, in model order."""
    found = {name: m for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}
    if not found:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"fedpipe_targets {list(targets)} name no linear layer of the model; its linear layers end in "
                         f"{suffixes}")
    return found


def _energies(grad: torch.Tensor, ranks: Sequence[int]) -> np.ndarray:
    sigma2 = torch.linalg.svdvals(grad.double()).square()
    cumulative = torch.cumsum(sigma2, 0)
    return np.array([float(cumulative[min(r, len(cumulative)) - 1]) for r in ranks])


def gradient_energy(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                    layers: Mapping[str, torch.nn.Linear], ranks: Sequence[int]) -> dict[str, np.ndarray]:
    """E(r) for every layer of ``layers`` and every r of ``ranks``, averaged over ``batches``
    (micro-batches with input_ids, attention_mask, labels). Returns float64 arrays
    aligned with ``ranks``. The model's weights are not changed; no parameter gradient
    is kept."""
    if not batches:
        raise ValueError("gradient_energy needs at least one micro-batch")
    ranks = [int(r) for r in ranks]
    inputs: dict[str, torch.Tensor] = {}
    totals = {name: np.zeros(len(ranks)) for name in layers}
    handles = []

    def keep_input(name):
        def hook(module, args):
            inputs[name] = args[0].detach()
        return hook

    def score(name):
        def hook(module, grad_input, grad_output):
            x = inputs.pop(name)
            g = grad_output[0].detach()
            grad = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            totals[name] += _energies(grad, ranks)
        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(keep_input(name)))
        handles.append(layer.register_full_backward_hook(score(name)))
    embed = model.get_input_embeddings()
    device = embed.weight.device
    was_training = model.training
    needed = [p for p in model.parameters() if p.requires_grad]
    for p in needed:
        p.requires_grad_(False)  # else backward would fill a gradient as large as the model
    model.eval()
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            embeds = embed(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device))
            out.loss.backward()
            inputs.clear()
    finally:
        for h in handles:
            h.remove()
        for p in needed:
            p.requires_grad_(True)
        model.train(was_training)
    missing = [n for n, t in totals.items() if not t.any()]
    if len(missing) == len(totals):
        raise ValueError("no candidate layer received a gradient (are the micro-batches' labels all -100?)")
    return {name: t / len(batches) for name, t in totals.items()}


def select_adapters(energy: Mapping[str, np.ndarray], widths: Mapping[str, int], ranks: Sequence[int],
                    budget: int) -> dict[str, int]:
    """The rank of every layer (absent: no adapter) that maximises the summed energy
    ``energy[name][i]`` of rank ``ranks[i]`` with sum(rank * widths[name]) <= ``budget``
    trainable parameters (widths: out + in of each layer). Exact (dynamic programming over
    the budget in units of the widths' gcd); ties go to the smaller total cost, then to
    earlier layers."""
    names = list(energy)
    if set(widths) != set(names):
        raise ValueError("select_adapters: energy and widths must name the same layers")
    ranks = [int(r) for r in ranks]
    if not ranks or min(ranks) < 1 or sorted(set(ranks)) != ranks:
        raise ValueError(f"fedpipe_ranks must be distinct increasing ranks >= 1; got {ranks}")
    unit = math.gcd(*[int(widths[n]) for n in names])
    # a budget beyond every layer at the top rank buys nothing more
    capacity = min(int(budget), max(ranks) * sum(int(widths[n]) for n in names)) // unit
    if capacity < min(ranks) * min(widths[n] for n in names) // unit:
        return {}
    best = np.zeros(capacity + 1)
    choice = np.zeros((len(names), capacity + 1), dtype=np.int8)
    for i, name in enumerate(names):
        new, pick = best.copy(), np.full(capacity + 1, -1, dtype=np.int8)
        for j, r in enumerate(ranks):
            cost = r * int(widths[name]) // unit
            if cost > capacity:
                break
            candidate = np.full(capacity + 1, -np.inf)
            candidate[cost:] = best[:capacity + 1 - cost] + float(energy[name][j])
            better = candidate > new
            new[better], pick[better] = candidate[better], j
        best = new
        choice[i] = pick
    c = int(np.flatnonzero(best == best.max())[0])
    chosen: dict[str, int] = {}
    for i in range(len(names) - 1, -1, -1):
        j = int(choice[i, c])
        if j >= 0:
            chosen[names[i]] = ranks[j]
            c -= ranks[j] * int(widths[names[i]]) // unit
    return {n: chosen[n] for n in names if n in chosen}
