"""One Ferret client round on a real model, end to end, on the CPU.

Loads SmolLM2-135M-Instruct (embedded), takes a few SGD steps on instruction data,
compresses the update to K seeded-projection coefficients (one project_blocks launch),
rebuilds it from those K numbers alone (one reconstruct_blocks_ launch) and reports
what was sent, how close the rebuilt update is, and what each phase cost.

    python -m ferret_fl.kernel_demo [--budget 7800] [--steps 8] [--distribution gaussian]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import ferret_kernels as fk
from ferret_kernels import backends, plan

from .models import EMBEDDED_DEFAULT, load_causal_lm

SAMPLES = [
    ("Reverse the order of the words.", "cat sat the on mat", "mat on the sat cat"),
    ("Convert the number to words.", "42", "forty-two"),
    ("Give the capital city of the country.", "Japan", "Tokyo"),
    ("Write the word in upper case.", "federated", "FEDERATED"),
    ("Add the two numbers.", "17 and 25", "42"),
    ("Name the colour of the sky on a clear day.", "", "Blue"),
    ("Extract the year from the sentence.", "The treaty was signed in 1648 in Munster.", "1648"),
    ("Count the vowels in the word.", "banana", "3"),
]


def alpaca(instruction: str, inp: str) -> str:
    if inp:
        return ("Below is an instruction that describes a task, paired with an input that provides further "
                f"context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                f"{instruction}\n\n### Input:\n{inp}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def batch(tokenizer):
    """Token ids and labels with the prompt masked to -100 (loss on the response only)."""
    ids, labels = [], []
    for instruction, inp, out in SAMPLES:
        prompt = tokenizer(alpaca(instruction, inp))["input_ids"]
        target = tokenizer(out)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_ids = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, label_ids, mask


def loss_of(model, data) -> float:
    input_ids, labels, mask = data
    with torch.no_grad():
        return float(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_DEFAULT)
    p.add_argument("--budget", type=int, default=7800, help="K, coefficients sent (the paper's 7.8e3)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--distribution", default="gaussian", choices=fk.DISTRIBUTIONS)
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=2025)
    args = p.parse_args(argv)
    torch.manual_seed(0)

    t0 = time.perf_counter()
    print(f"[1/5] loading {args.model} ...", flush=True)
    model, tokenizer = load_causal_lm(args.model)
    params = [q for q in model.parameters() if q.requires_grad]
    d = sum(q.numel() for q in params)
    groups = plan.paper_blocks([q.numel() for q in params])
    sizes = [sum(params[i].numel() for i in g) for g in groups]
    backend = backends.resolve(args.backend, params[0].device)
    print(f"      {d:,} parameters in {len(params)} tensors -> {len(groups)} blocks; backend={backend} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)

    data = batch(tokenizer)
    start = [q.detach().clone() for q in params]
    loss0 = loss_of(model, data)
    print(f"[2/5] local training: {args.steps} SGD steps, lr {args.lr}", flush=True)
    opt = torch.optim.SGD(params, lr=args.lr)
    t = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        loss = model(input_ids=data[0], attention_mask=data[2], labels=data[1]).loss
        loss.backward()
        opt.step()
        print(f"      step {step + 1}/{args.steps} loss {loss.item():.4f}", flush=True)
    t_local = time.perf_counter() - t
    loss_local = loss_of(model, data)
    delta = [(s - q.detach()) for s, q in zip(start, params, strict=True)]

    print(f"[3/5] compress: K = {args.budget} coefficients over {len(groups)} blocks (K_l ~ |delta_l|)", flush=True)
    t = time.perf_counter()
    norms = [math.sqrt(sum(float(delta[i].double().pow(2).sum()) for i in g)) for g in groups]
    counts = plan.allocate(args.budget, plan.allocation_weights("norm", norms, sizes))
    ordered = [delta[i] for g in groups for i in g]
    gamma = fk.project_blocks(ordered, sizes, counts, args.seed, distribution=args.distribution, backend=backend)
    rho = fk.VARIANCE[args.distribution]
    scale = torch.cat([torch.full((c,), 1.0 / (rho * c)) for c in counts])
    gamma = gamma * scale
    t_compress = time.perf_counter() - t

    print("[4/5] rebuild the update from the seed and the K coefficients", flush=True)
    t = time.perf_counter()
    rebuilt = [torch.zeros_like(x) for x in ordered]
    fk.reconstruct_blocks_(rebuilt, sizes, counts, gamma, args.seed, distribution=args.distribution, backend=backend)
    t_rebuild = time.perf_counter() - t
    flat_true = torch.cat([x.reshape(-1).double() for x in ordered])
    flat_rebuilt = torch.cat([x.reshape(-1).double() for x in rebuilt])
    cosine = float(torch.dot(flat_true, flat_rebuilt) / (flat_true.norm() * flat_rebuilt.norm()))
    order = [i for g in groups for i in g]
    with torch.no_grad():
        for i, r in zip(order, rebuilt, strict=True):
            params[i].copy_(start[i] - r)
    loss_ferret = loss_of(model, data)

    print("[5/5] summary", flush=True)
    sent = args.budget * 4
    print(f"      bytes sent: {sent:,} (K float32) vs {d * 4:,} for the full update: {d * 4 / sent:,.0f}x less")
    print(f"      cos(rebuilt, true update) = {cosine:.4f}  (expected ~ sqrt(K_l/d_l) per block for one client)")
    print(f"      loss: start {loss0:.4f} | after local steps {loss_local:.4f} | after applying the rebuilt "
          f"update {loss_ferret:.4f}")
    print(f"      seconds: local {t_local:.1f} | compress {t_compress:.2f} | rebuild {t_rebuild:.2f} | "
          f"total {time.perf_counter() - t0:.1f}")
    print(f"      work: sum_l d_l K_l = {sum(s * c for s, c in zip(sizes, counts, strict=True)):.3g} element x bases per phase")


if __name__ == "__main__":
    main()
